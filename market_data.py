"""market_data.py: the MarketCL stream (the course report's section 8), from minute bars.

    python market_data.py --dataset market --source DIR   # your CSVs of minute bars
    python market_data.py --dataset market-synthetic      # generated CSVs (the default)
    python market_data.py --dataset market-synthetic --seed 3 --samples-per-day 4

Each command prints a summary of the stream (per symbol: incomplete days
skipped, the history-only first day, days with samples, samples; then the
class balance of every label head) and how long loading took; a problem with
the data prints one line "error: ..." and exits 1.

MarketCL is not a list of tasks but a stream of days: every stock symbol is a
task, met again every day. The data are minute bars (open, high, low, close,
volume) of stocks in CSV files, one file per symbol or one for several, with
the header datetime,symbol,open,high,low,close,volume; the course used NSE
stocks. "market" reads your files (--source, a file or a folder);
"market-synthetic" writes a seeded synthetic market in the same layout to
<data_dir>/market-synthetic-seed<S>/ and reads it with the same loader.

Public interface:
    load_market(source, *, seed, samples_per_day=16, session=("09:15", "15:29"),
                symbols=None, device="cpu") -> MarketStream
        MarketStream.splits[d][s] holds symbol s's samples of day d: a
        data.Split whose x is a data.Sequences (the day's features up to a
        sampled minute, zero-padded) and whose y holds one label per
        (target, stop) pair of MARKET_LABEL_PAIRS.
    write_synthetic_market(folder, *, seed, ...) -> list of the CSV paths
    read_market_csv, market_session_days, market_features, market_labels,
    market_sample_minutes: the steps of load_market, one function each.
    MARKET_DATASETS, MARKET_FEATURE_NAMES, MARKET_LABEL_PAIRS,
    MARKET_NUM_CLASSES, market_synthetic_folder: what the training code needs.
Every problem with the data raises data.DataError, naming the file, the line
and the problem.

data.py knows nothing of this module (imports run one way: this one imports
data.py); deleting it leaves the image datasets working.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import re
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view

from data import (DataError, Sequences, Split, add_data_arguments, data_dir_or_default,
                  positive_int, print_error)

MARKET_DATASETS = ("market", "market-synthetic")                   # load_market
MARKET_COLUMNS = ("datetime", "symbol", "open", "high", "low", "close", "volume")
MARKET_SESSION = ("09:15", "15:29")     # NSE regular session: 375 one-minute bars
MARKET_SAMPLES_PER_DAY = 16             # our choice: one sample from each sixteenth of the day
# (target, stop) of a long entry, in this order, one label head each (report, section 8).
MARKET_LABEL_PAIRS = [(0.02, 0.01), (0.01, 0.005), (0.01, 0.02), (0.005, 0.01)]
MARKET_NUM_CLASSES = 4                  # 0 stop first, 1 ends not above, 2 ends above, 3 target first
MARKET_EPS = 1e-12                      # a smaller denominator counts as 0 (features are ~1 in scale)
MARKET_MAX_LINE = 64 * 1024             # bytes per CSV line; a row of minute bars takes under 100
MARKET_BLOCK = 100_000                  # CSV rows converted to arrays at a time

# The feature columns, in order; market_features defines each.
MARKET_FEATURE_NAMES = [
    "open_rel", "high_rel", "low_rel", "close_rel",
    "log_return_1", "log_return_5", "log_return_15", "bar_range",
    "volume_ratio_15", "volume_ratio_60", "sma_ratio_5", "sma_ratio_15", "sma_ratio_60",
    "rsi_14", "bollinger_position", "bollinger_width", "macd", "macd_signal", "macd_hist",
    "vwap_ratio", "from_day_high", "from_day_low",
    "prev_open", "prev_high", "prev_low", "prev_close", "time_of_day",
]
# market-synthetic is written to <data_dir>/market-synthetic-seed<S>/ (one
# folder per seed, so streams of different seeds never mix), or, for another
# number of symbols than the default 6, to ...-seed<S>-<N>symbols/: a folder
# holds one stream only, since the loader reads every CSV in it.
MARKET_SYNTHETIC_SYMBOLS = 6


def market_synthetic_folder(seed: int, num_symbols: int = MARKET_SYNTHETIC_SYMBOLS) -> str:
    """The folder name (under the data folder) of market-synthetic's CSVs."""
    return f"market-synthetic-seed{seed}" + ("" if num_symbols == MARKET_SYNTHETIC_SYMBOLS
                                             else f"-{num_symbols}symbols")


# ---------------------------------------------------------------------------
# MarketCL: reading and validating CSV files of minute bars
# ---------------------------------------------------------------------------

def _csv_fail(path, line, problem: str):
    raise DataError(f"{path}, line {line}: {problem}")


def _csv_first_bad(path, lines, bad: np.ndarray, problem):
    """Stop at the first row where `bad` holds; `problem(k)` describes row k."""
    if bad.any():
        k = int(np.argmax(bad))
        _csv_fail(path, lines[k], problem(k))


def _parse_times(path, lines, text: np.ndarray) -> np.ndarray:
    """(N,) strings -> (N,) datetime64[m]; fast path for all rows at once."""
    # Only "YYYY-MM-DD HH:MM" or "YYYY-MM-DD HH:MM:SS": numpy would also take a
    # bare date (as midnight) or a time-zone suffix (converted to UTC).
    bad = ~np.isin(np.char.str_len(text), (16, 19))
    if not bad.any():
        try:
            seconds = text.astype("datetime64[s]")
        except ValueError:          # find the culprit row by row
            bad = np.array([not _parses(lambda t: np.datetime64(t, "s"), t) for t in text])
    _csv_first_bad(path, lines, bad, lambda k: f"cannot parse the time {text[k]!r}, "
                   "expected YYYY-MM-DD HH:MM:SS")
    minutes = seconds.astype("datetime64[m]")
    _csv_first_bad(path, lines, minutes != seconds,
                   lambda k: f"the time {text[k]!r} is not on a whole minute")
    return minutes


def _parses(convert, text: str) -> bool:
    """Whether convert(text) succeeds: used only to find the row a whole-column
    conversion failed on, so the message can name its line."""
    try:
        convert(text)
        return True
    except ValueError:
        return False


def _parse_numbers(path, lines, name: str, text: np.ndarray) -> np.ndarray:
    """(N,) strings -> (N,) float64, finite; prices positive, volume >= 0."""
    try:
        values = text.astype(np.float64)
    except ValueError:
        bad = np.array([not _parses(float, t) for t in text])
        _csv_first_bad(path, lines, bad,
                       lambda k: f"cannot parse the {name} {text[k]!r} as a number")
    _csv_first_bad(path, lines, np.isnan(values), lambda k: f"the {name} is NaN")
    _csv_first_bad(path, lines, ~np.isfinite(values),
                   lambda k: f"the {name} {text[k]!r} is not finite")
    if name == "volume":
        _csv_first_bad(path, lines, values < 0, lambda k: f"negative volume {text[k]!r}")
    else:
        _csv_first_bad(path, lines, values <= 0,
                       lambda k: f"non-positive price: {name} {text[k]!r}")
    return values


def _csv_lines(path: Path, f):
    """The lines of the binary file f as text, one at a time. Each line is
    read with a bound (MARKET_MAX_LINE bytes, its line end included), so a
    runaway line stops with its number instead of filling the memory, and
    decoded on its own, so a byte that is not UTF-8 is reported on its line.
    A UTF-8 byte-order mark (spreadsheets write one) is dropped. Lines end in
    \\n or \\r\\n; a bare \\r (the old Mac format) is refused."""
    for number, raw in enumerate(iter(lambda: f.readline(MARKET_MAX_LINE + 1), b""), start=1):
        if re.search(rb"\r(?=[^\n])", raw):
            _csv_fail(path, number, "a line ends in a bare carriage return (the old Mac format); "
                      "save the file with \\n or \\r\\n line ends")
        if len(raw) > MARKET_MAX_LINE:
            _csv_fail(path, number, f"longer than {MARKET_MAX_LINE} bytes; a row of minute bars is "
                      "one short line (is this a CSV file of minute bars?)")
        try:
            yield raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as err:
            _csv_fail(path, number, f"byte {err.start + 1} of the line ({raw[err.start:err.start + 1]!r}) "
                      "is not UTF-8 text; save the file as UTF-8")


def _market_rows(path: Path, text: dict[str, np.ndarray], lines: np.ndarray):
    """One block of rows as strings per column -> times (N,), ohlcv (N, 5),
    symbols (N,), every value checked; `lines` names the rows in messages."""
    times = _parse_times(path, lines, text["datetime"])
    ohlcv = np.stack([_parse_numbers(path, lines, name, text[name])
                      for name in MARKET_COLUMNS[2:]], axis=1)         # (N, 5)
    high, low = ohlcv[:, 1], ohlcv[:, 2]
    _csv_first_bad(path, lines, high < low,
                   lambda k: f"the high {text['high'][k]} is below the low {text['low'][k]}")
    return times, ohlcv, np.char.strip(text["symbol"])


def read_market_csv(path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Read one CSV of minute bars: {symbol: (times (N,) datetime64[m], ohlcv (N, 5) float64)}.

    Rows of each symbol keep their file order, which must be strictly
    increasing in time (no duplicate minute, never backwards). The file is
    streamed: read row by row, converted to arrays every MARKET_BLOCK rows.
    """
    path = Path(path)
    blocks = []                     # (times, ohlcv, symbols, lines) per block of rows

    def convert(rows, lines):
        lines = np.array(lines, dtype=np.int64)
        text = {name: np.array(column) for name, column in zip(MARKET_COLUMNS, zip(*rows))}
        blocks.append((*_market_rows(path, text, lines), lines))

    with open(path, "rb") as f:
        reader = csv.reader(_csv_lines(path, f))
        try:
            header = [name.strip().lower() for name in next(reader, [])]
            missing = [name for name in MARKET_COLUMNS if name not in header]
            if missing:
                _csv_fail(path, 1, f"missing column(s) {', '.join(missing)}; "
                          f"the header must name {','.join(MARKET_COLUMNS)}")
            wanted = [header.index(name) for name in MARKET_COLUMNS]
            rows, lines = [], []
            for row in reader:
                if not row:             # csv yields [] for a blank line
                    continue
                if len(row) != len(header):
                    _csv_fail(path, reader.line_num, f"{len(row)} fields, the header has {len(header)}")
                rows.append([row[i] for i in wanted])
                lines.append(reader.line_num)
                if len(rows) == MARKET_BLOCK:
                    convert(rows, lines)
                    rows, lines = [], []
        except csv.Error as err:        # e.g. a quoted field over the csv module's size limit
            _csv_fail(path, reader.line_num, str(err))
    if rows:
        convert(rows, lines)
    if not blocks:
        return {}
    times, ohlcv, symbols, lines = (np.concatenate(parts) for parts in zip(*blocks))

    bars = {}
    for symbol in np.unique(symbols):
        rows_of_symbol = np.flatnonzero(symbols == symbol)             # file order
        t = times[rows_of_symbol]
        step = np.diff(t).astype(np.int64)                              # minutes between rows
        if (step <= 0).any():
            k = int(np.argmax(step <= 0))
            line, earlier = lines[rows_of_symbol[k + 1]], lines[rows_of_symbol[k]]
            if step[k] == 0:
                _csv_fail(path, line,
                          f"duplicate minute {t[k + 1]} for {symbol} (also on line {earlier})")
            _csv_fail(path, line, f"time goes backwards for {symbol}: {t[k + 1]} after {t[k]} "
                      f"(line {earlier}); rows must be in time order")
        bars[str(symbol)] = (t, ohlcv[rows_of_symbol])
    return bars


def _session_minutes(session: tuple[str, str]) -> tuple[int, int]:
    """("09:15", "15:29") -> (555, 929): first and last minute after midnight, inclusive."""
    start, end = (int(hh) * 60 + int(mm) for hh, mm in (t.split(":") for t in session))
    if end < start:
        raise ValueError(f"session {session} ends before it starts")
    return start, end


def market_session_days(times: np.ndarray, ohlcv: np.ndarray, session=MARKET_SESSION):
    """Keep the complete session days of one symbol.

    times (N,) datetime64[m] strictly increasing, ohlcv (N, 5).
    Returns dates (D,) datetime64[D] of the complete days, bars (D, L, 5) with
    L = session length, and the dates present in the input that lack some
    session minute (skipped). Rows outside the session are dropped.
    """
    start, end = _session_minutes(session)
    length = end - start + 1
    day = times.astype("datetime64[D]")
    minute = (times - day).astype(np.int64)                # minutes after midnight
    in_session = (minute >= start) & (minute <= end)
    dates, counts = np.unique(day[in_session], return_counts=True)
    # Times are strictly increasing, so length rows inside the session are
    # exactly the minutes start..end of that day, in order.
    complete = dates[counts == length]
    skipped = np.setdiff1d(np.unique(day), complete)
    keep = in_session & np.isin(day, complete)
    return complete, ohlcv[keep].reshape(len(complete), length, 5), skipped


# ---------------------------------------------------------------------------
# MarketCL: features (causal) and labels (look ahead to the end of the day, by design)
# ---------------------------------------------------------------------------

def _trailing(x: np.ndarray, window: int) -> np.ndarray:
    """(D, L) -> (D, L, window): values at minutes m-window+1..m, NaN before minute 0."""
    pad = np.full(x.shape[:-1] + (window - 1,), np.nan)
    return sliding_window_view(np.concatenate([pad, x], axis=-1), window, axis=-1)


def _ratio(numerator, denominator, fallback) -> np.ndarray:
    """numerator / denominator, `fallback` where |denominator| <= MARKET_EPS."""
    numerator, denominator = np.broadcast_arrays(numerator, denominator)
    out = np.full(numerator.shape, fallback, dtype=np.float64)
    return np.divide(numerator, denominator, out=out, where=np.abs(denominator) > MARKET_EPS)


def _ema(x: np.ndarray, span: int) -> np.ndarray:
    """Exponential moving average along the last axis, started at the first value."""
    alpha = 2.0 / (span + 1)
    out = np.empty_like(x)
    out[..., 0] = x[..., 0]
    for m in range(1, x.shape[-1]):
        out[..., m] = alpha * x[..., m] + (1 - alpha) * out[..., m - 1]
    return out


def market_features(bars: np.ndarray, previous: np.ndarray) -> np.ndarray:
    """Per-minute features of D symbol-days, in the order of MARKET_FEATURE_NAMES.

    bars: (D, L, 5) open, high, low, close, volume of each session minute.
    previous: (D, 4) open, high, low, close of each day's previous complete day.
    Returns (D, L, F) float64, finite for positive prices and volumes >= 0.

    Notation for one symbol-day: O, H, L, C, V the minute's open, high, low,
    close, volume; m = 0..L-1 the session minute; c0 = C[0] the day's first
    close; C[-1] := O[0] (the day's first open stands in for the close before
    minute 0). "over w min" means over minutes max(0, m-w+1)..m: during the
    warm-up the window holds what exists so far.

    open_rel, high_rel,   O[m] / c0 - 1, H[m] / c0 - 1,
    low_rel, close_rel    L[m] / c0 - 1, C[m] / c0 - 1
    log_return_k          log(C[m] / C[max(m-k, -1)]) for k = 1, 5, 15
    bar_range             log(H[m] / L[m])
    volume_ratio_w        V[m] / mean of V over w min, w = 15, 60; 1 if that mean is 0
    sma_ratio_w           C[m] / mean of C over w min - 1, w = 5, 15, 60
    rsi_14                G / (G + Lo), G and Lo the sums of the gains and of the
                          losses C[k] - C[k-1] over 14 min; 0.5 if both are 0
    bollinger_position    %B = (C[m] - mean20) / (4 std20) + 0.5, mean20 and std20
                          (population) of C over 20 min: 0 / 1 at the lower /
                          upper band; 0.5 if std20 = 0
    bollinger_width       4 std20 / mean20
    macd                  (EMA12 - EMA26) / C[m], EMA_n[0] = C[0],
                          EMA_n[m] = a C[m] + (1 - a) EMA_n[m-1], a = 2 / (n + 1)
    macd_signal           EMA9 of macd
    macd_hist             macd - macd_signal
    vwap_ratio            C[m] / VWAP[m] - 1, VWAP = mean of (H + L + C) / 3 over
                          minutes 0..m weighted by V; 0 while no volume traded
    from_day_high         C[m] / max(H[0..m]) - 1   (<= 0)
    from_day_low          C[m] / min(L[0..m]) - 1   (>= 0)
    prev_open, prev_high, the previous complete day's first open, highest high,
    prev_low, prev_close  lowest low, last close, each / c0 - 1 (constant all day)
    time_of_day           m / (L - 1): 0 at the first minute, 1 at the last
    """
    o, h, low, c, v = np.moveaxis(bars, -1, 0)                     # each (D, L)
    length = c.shape[-1]
    c0 = c[:, :1]                                                   # (D, 1) first close
    # before[:, j] is the close of minute j-1, with the day's first open before minute 0.
    before = np.concatenate([o[:, :1], c], axis=1)                  # (D, L+1)
    minute = np.arange(length)
    rel = c / c0                                                    # (D, L) scale-free close

    f = {"open_rel": o / c0 - 1, "high_rel": h / c0 - 1, "low_rel": low / c0 - 1,
         "close_rel": rel - 1, "bar_range": np.log(h / low)}
    for k in (1, 5, 15):
        f[f"log_return_{k}"] = np.log(c / before[:, np.maximum(minute - k + 1, 0)])
    for w in (15, 60):
        f[f"volume_ratio_{w}"] = _ratio(v, np.nanmean(_trailing(v, w), axis=-1), 1.0)
    for w in (5, 15, 60):
        f[f"sma_ratio_{w}"] = _ratio(rel, np.nanmean(_trailing(rel, w), axis=-1), 1.0) - 1

    change = c - before[:, :-1]                                     # (D, L) C[m] - C[m-1]
    gains = np.nansum(_trailing(np.maximum(change, 0), 14), axis=-1)
    losses = np.nansum(_trailing(np.maximum(-change, 0), 14), axis=-1)
    f["rsi_14"] = _ratio(gains, gains + losses, 0.5)

    window20 = _trailing(rel, 20)                                   # (D, L, 20)
    mean20, std20 = np.nanmean(window20, axis=-1), np.nanstd(window20, axis=-1)
    # A flat window has std 0 up to rounding (~1e-16), below MARKET_EPS: %B is then 0.5.
    f["bollinger_position"] = _ratio(rel - mean20, 4 * std20, 0.0) + 0.5
    f["bollinger_width"] = 4 * std20 / mean20

    f["macd"] = (_ema(rel, 12) - _ema(rel, 26)) / rel
    f["macd_signal"] = _ema(f["macd"], 9)
    f["macd_hist"] = f["macd"] - f["macd_signal"]

    typical = (h + low + c) / (3 * c0)
    volume_so_far = np.cumsum(v, axis=-1)
    vwap = _ratio(np.cumsum(typical * v, axis=-1), volume_so_far, np.nan)
    f["vwap_ratio"] = np.where(volume_so_far > 0, _ratio(rel, vwap, 1.0) - 1, 0.0)
    f["from_day_high"] = c / np.maximum.accumulate(h, axis=-1) - 1
    f["from_day_low"] = c / np.minimum.accumulate(low, axis=-1) - 1

    for j, name in enumerate(("prev_open", "prev_high", "prev_low", "prev_close")):
        f[name] = np.broadcast_to(previous[:, j:j + 1] / c0 - 1, c.shape)
    f["time_of_day"] = np.broadcast_to(minute / max(length - 1, 1), c.shape)
    return np.stack([f[name] for name in MARKET_FEATURE_NAMES], axis=-1)


def _day_summary(bars: np.ndarray) -> np.ndarray:
    """(D, L, 5) -> (D, 4): each day's first open, highest high, lowest low, last close."""
    return np.stack([bars[:, 0, 0], bars[:, :, 1].max(1), bars[:, :, 2].min(1), bars[:, -1, 3]],
                    axis=1)


def market_labels(close: np.ndarray, label_pairs=MARKET_LABEL_PAIRS) -> np.ndarray:
    """Labels of a long entry at every minute of one day: close (L,) -> (L, P) int64.

    For entry = close[i] and a pair (target, stop), looking at the later closes
    close[i+1], ..., close[L-1] of the same day:
        3  a later close reaches entry * (1 + target)  (>=: equal counts)
           before any later close falls below entry * (1 - stop);
        0  a later close falls below entry * (1 - stop)  (strictly <: a close
           exactly at the stop level does not stop) before the target;
        2  neither happens and the day's last close is above the entry (>);
        1  neither happens and the last close is at or below the entry.
    Both thresholds are computed in float64 as written above. With target,
    stop > 0 the target lies above the entry and the stop below it, so a
    single close cannot hit both: "same minute" ties cannot occur. The last
    minute of the day has no later close: its label is 1 (last close == entry
    is not above it).
    """
    length = close.shape[0]
    later = np.triu(np.ones((length, length), dtype=bool), k=1)    # later[i, j]: j > i
    end_of_day = np.where(close[-1] > close, 2, 1)                  # (L,)
    labels = np.empty((length, len(label_pairs)), dtype=np.int64)
    for p, (target, stop) in enumerate(label_pairs):
        up = later & (close[None, :] >= (close * (1 + target))[:, None])     # (L, L) [entry, later]
        down = later & (close[None, :] < (close * (1 - stop))[:, None])
        first_up = np.where(up.any(1), up.argmax(1), length)              # (L,) length = never
        first_down = np.where(down.any(1), down.argmax(1), length)
        labels[:, p] = np.where(first_up < first_down, 3,
                                np.where(first_down < first_up, 0, end_of_day))
    return labels


# ---------------------------------------------------------------------------
# MarketCL: samples and the stream
# ---------------------------------------------------------------------------

def market_sample_minutes(rng: np.random.Generator, session_length: int,
                          samples_per_day: int) -> np.ndarray:
    """(S,) minutes, one drawn uniformly from each of S equal parts of the day."""
    if not 1 <= samples_per_day <= session_length:
        raise ValueError(f"samples_per_day must be in 1..{session_length}, got {samples_per_day}")
    edges = np.arange(samples_per_day + 1) * session_length // samples_per_day
    return rng.integers(edges[:-1], edges[1:])


def _sample_rng(seed: int, symbol: str, date: datetime.date) -> np.random.Generator:
    # Seeded by (seed, symbol, date): a symbol-day draws the same minutes
    # whichever other symbols or days are loaded with it.
    return np.random.default_rng([seed, zlib.crc32(symbol.encode()), date.toordinal()])


def _market_split(features: np.ndarray, labels: np.ndarray, minutes: np.ndarray) -> Split:
    """Samples ending at `minutes` (S,) of one day's features (L, F) and labels (L, P).

    Sample k is the day up to minute m = minutes[k]: x[k, :m+1] holds the
    features of minutes 0..m, the rest is zero padding, length m + 1.
    """
    length = features.shape[0]
    keep = np.arange(length)[None, :] <= minutes[:, None]          # (S, L) minutes 0..m
    x = np.where(keep[:, :, None], features[None], 0.0)            # (S, L, F) zero-padded
    sequences = Sequences(torch.from_numpy(x.astype(np.float32)),
                          torch.from_numpy(minutes.astype(np.int64) + 1))   # lengths (S,)
    return Split(sequences, torch.from_numpy(labels[minutes]))      # y (S, P)


@dataclass
class MarketStream:
    """The MarketCL stream. splits[d][s]: samples of symbol s on day d, or None.

    Each Split holds x, a Sequences of float32 (S, L, F) zero-padded feature
    sequences (L = session length) with lengths int64 (S,) = m + 1 for the
    sample minute m, and y int64 (S, P) with one label in 0..3 per (target,
    stop) pair of label_pairs (P = 4 heads).
    """
    symbols: list[str]                      # task order
    days: list[datetime.date]               # days with samples of at least one symbol
    splits: list[list[Split | None]]
    feature_names: list[str]
    label_pairs: list[tuple[float, float]]
    skipped: dict[str, list[datetime.date]]  # incomplete days per symbol
    history: dict[str, datetime.date | None]  # first complete day: history only
    feature_mean: np.ndarray                # (F,) standardisation, from days[0]
    feature_std: np.ndarray                 # (F,)
    session: tuple[str, str]

    @property
    def num_features(self) -> int:
        return len(self.feature_names)

    def labels(self) -> torch.Tensor:
        """All labels of the stream, (N, P)."""
        ys = [split.y.cpu() for row in self.splits for split in row if split is not None]
        return torch.cat(ys) if ys else torch.empty(0, len(self.label_pairs), dtype=torch.int64)

    def class_balance(self) -> np.ndarray:
        """(P, 4): per label head, the fraction of all samples in each class."""
        y = self.labels().numpy()
        counts = np.stack([np.bincount(y[:, p], minlength=MARKET_NUM_CLASSES)
                           for p in range(len(self.label_pairs))])
        return counts / max(len(y), 1)

    def summary(self) -> str:
        """Per symbol (and in total): incomplete days skipped, the history-only
        first day, days with samples and samples; then the class balance."""
        first, last = (self.days[0], self.days[-1]) if self.days else ("-", "-")
        lines = [f"market: {len(self.symbols)} symbols, {len(self.days)} days with samples "
                 f"({first} .. {last}), session {self.session[0]}-{self.session[1]}, "
                 f"{self.num_features} features",
                 f"{'symbol':<16}{'skipped':>8}{'history':>12}{'sample days':>13}{'samples':>9}"]

        def row(name: str, skipped: int, history: str, splits: list[Split]) -> str:
            return (f"{name:<16}{skipped:>8}{history:>12}{len(splits):>13}"
                    f"{sum(len(split) for split in splits):>9}")

        for s, symbol in enumerate(self.symbols):
            splits = [day[s] for day in self.splits if day[s] is not None]
            lines.append(row(symbol, len(self.skipped[symbol]), str(self.history[symbol]), splits))
        every = [split for day in self.splits for split in day if split is not None]
        lines.append(row("total", sum(map(len, self.skipped.values())), "", every))
        lines.append("class balance (fraction of samples in class 0 stop / 1 flat-or-down / "
                     "2 up / 3 target):")
        for (target, stop), balance in zip(self.label_pairs, self.class_balance()):
            lines.append(f"  target {target:.1%} stop {stop:.1%}: "
                         + " ".join(f"{fraction:.3f}" for fraction in balance))
        return "\n".join(lines)


def _market_files(source: Path) -> list[Path]:
    if source.is_dir():
        files = sorted(source.glob("*.csv"))
        if not files:
            raise DataError(f"{source}: no .csv files in this folder")
        return files
    if source.is_file():
        return [source]
    raise DataError(f"{source}: no such file or folder; pass a CSV file or a folder of them "
                    "(python market_data.py --dataset market-synthetic writes a synthetic one)")


def _select_symbols(wanted, available: list[str], source) -> list[str]:
    """Match names in `wanted` against the file's names, with or without the exchange prefix."""
    if wanted is None:
        return sorted(available)
    by_name = {name: name for name in available} | {name.split(":")[-1]: name for name in available}
    unknown = [name for name in wanted if name not in by_name]
    if unknown:
        raise DataError(f"{source}: symbol(s) {unknown} not found; available: {sorted(available)}")
    return [by_name[name] for name in wanted]


def load_market(source, *, seed: int, samples_per_day: int = MARKET_SAMPLES_PER_DAY,
                session: tuple[str, str] = MARKET_SESSION, symbols=None,
                device="cpu") -> MarketStream:
    """Read minute-bar CSVs (a file or a folder) and build the MarketCL stream.

        stream = load_market("data/nse-minute", seed=0)
        stream.splits[d][s].x       # Sequences: (S, L, F) padded, lengths (S,)
        stream.splits[d][s].y       # (S, P) labels, one per (target, stop) pair

    MarketCL in one paragraph: every symbol is a task; day by day, the learner
    trains on each symbol's samples of that day in turn and is tested on the
    next day. A sample is the sequence of per-minute features from the
    session's first minute up to a minute m, and four labels at m, one per
    (target, stop) pair. `seed` draws the sample minutes (samples_per_day per
    symbol-day, one in each equal part of the session); symbols=["INFY", ...]
    picks and orders the tasks (default: all, sorted by name).

    Conventions (our choices; the report does not fix them):
    - Input: CSV files with the header datetime,symbol,open,high,low,close,volume
      (any column order, extra columns ignored), one file per symbol or one
      file for several. Times are "YYYY-MM-DD HH:MM[:SS]" on whole minutes. A
      symbol may appear in only one file. Anything else stops with a
      DataError that names the file, the line and the problem.
    - Session: only minutes start..end (inclusive) are kept; pre-open and
      after-hours rows are dropped. A day that lacks any session minute is
      incomplete: it is skipped and counted in MarketStream.skipped.
    - The first complete day of each symbol is history only: it supplies the
      previous-day features of the next complete day and yields no samples
      (MarketStream.history). "Previous day" always means the previous
      *complete* day of the same symbol, even when incomplete days lie between.
    - Features are computed per day (indicators restart each morning) and are
      strictly causal: the features at minute m use the bars 0..m of the day
      and the previous complete day's summary, nothing later. Indicators that
      need more history than the day has so far use what exists (an expanding
      window).
    - Standardisation: every feature is shifted and scaled by its mean and std
      over all minutes of all symbols on the stream's first day, the first day
      a learner trains on; later days never influence it, so the stream stays
      causal across days. Padding is applied after standardising and stays
      exactly zero.
    - Labels: see market_labels.
    """
    start, end = _session_minutes(session)
    if not 1 <= samples_per_day <= end - start + 1:
        raise DataError(f"samples_per_day must be between 1 and {end - start + 1} (the minutes "
                        f"of the session {session[0]}-{session[1]}), got {samples_per_day}")
    source = Path(source)
    bars_by_symbol, file_of = {}, {}
    for path in _market_files(source):
        for symbol, bars in read_market_csv(path).items():
            if symbol in file_of:
                raise DataError(f"{path}: symbol {symbol} also appears in {file_of[symbol]}; "
                                "keep each symbol's bars in one file")
            bars_by_symbol[symbol], file_of[symbol] = bars, path
    order = _select_symbols(symbols, list(bars_by_symbol), source)

    # Per symbol: features, labels and sampled minutes of every day after the first complete one.
    per_day = {}                    # (date, symbol index) -> (features, labels, minutes)
    skipped, history = {}, {}
    for s, symbol in enumerate(order):
        dates, bars, skipped_dates = market_session_days(*bars_by_symbol[symbol], session)
        skipped[symbol] = list(skipped_dates.astype(object))
        history[symbol] = dates[0].astype(object) if len(dates) else None
        if len(dates) < 2:
            continue
        features = market_features(bars[1:], _day_summary(bars[:-1]))     # (D-1, L, F)
        for d, date in enumerate(dates[1:].astype(object)):
            rng = _sample_rng(seed, symbol, date)
            minutes = market_sample_minutes(rng, bars.shape[1], samples_per_day)
            per_day[date, s] = features[d], market_labels(bars[d + 1, :, 3]), minutes

    days = sorted({date for date, _ in per_day})
    if not days:
        raise DataError(f"{source}: no symbol has two complete {session[0]}-{session[1]} days; "
                        "the first complete day of a symbol only serves as history")
    # Standardise with the first day's statistics only (all minutes, all symbols).
    first = np.concatenate([per_day[key][0] for key in per_day if key[0] == days[0]])   # (n*L, F)
    mean, std = first.mean(axis=0), first.std(axis=0)
    std = np.where(std > MARKET_EPS, std, 1.0)

    splits = [[None] * len(order) for _ in days]
    for (date, s), (features, labels, minutes) in per_day.items():
        split = _market_split((features - mean) / std, labels, minutes)
        splits[days.index(date)][s] = split.to(device)
    return MarketStream(order, days, splits, list(MARKET_FEATURE_NAMES), list(MARKET_LABEL_PAIRS),
                        skipped, history, mean, std, tuple(session))


# ---------------------------------------------------------------------------
# market-synthetic: minute bars generated from a seed, in the same CSV layout
# ---------------------------------------------------------------------------

def write_synthetic_market(folder, *, seed: int, num_symbols: int = MARKET_SYNTHETIC_SYMBOLS, num_days: int = 12,
                           session: tuple[str, str] = MARKET_SESSION,
                           first_day: str = "2021-01-04",
                           daily_volatility: tuple[float, float] = (0.007, 0.018)) -> list[Path]:
    """Write one CSV per symbol (SYN00.csv, ...) of random minute bars; returns the paths.

    The model, per symbol: a starting price (100..3000), a daily volatility
    drawn from `daily_volatility` (std of the day's log return), a drift, and a
    base volume. Each day has a regime (calm x0.6, normal x1, stormy x1.6 on
    the volatility; a drift of +-0.5 daily std) that persists with probability
    0.7. The open gaps from the previous close by N(0, 0.3 daily std). Within
    the day, log returns are Gaussian with a U-shaped std (busiest at the open
    and the close); volumes follow the same U times log-normal noise. Rows
    before and after the session (8 and 7 minutes before, 1 and 11 minutes
    after) are included, as in real data, for the loader to drop.
    The volatility range keeps every class of every label head under 70% of
    the samples (test_mark.py checks it). Files are byte-identical for
    the same arguments on the same platform.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    start, end = _session_minutes(session)
    length = end - start + 1
    dates = np.busday_offset(np.datetime64(first_day, "D"), np.arange(num_days), roll="forward")
    u = np.linspace(-1, 1, length) ** 2
    volatility_shape = (1 + 2 * u) / np.sqrt(np.sum((1 + 2 * u) ** 2))   # (L,) squares sum to 1
    volume_shape = 1 + 3 * u
    regimes = np.array([0.6, 1.0, 1.6])
    extra_minutes = np.array([start - 8, start - 7, end + 1, end + 11])   # dropped by the loader
    paths = []
    for i in range(num_symbols):
        symbol = f"SYN:S{i:02d}"
        price = np.exp(rng.uniform(np.log(100), np.log(3000)))
        daily_std = rng.uniform(*daily_volatility)
        drift = rng.normal(0, 0.2 * daily_std)
        base_volume = np.exp(rng.uniform(np.log(2e3), np.log(5e4)))
        regime, trend = 1, 0.0
        lines = [",".join(MARKET_COLUMNS)]
        for date in dates:
            if rng.random() > 0.7:
                regime, trend = rng.integers(3), rng.choice([-0.5, 0.0, 0.5])
            std = daily_std * regimes[regime]
            open0 = price * np.exp(rng.normal(0, 0.3 * daily_std))
            returns = rng.normal((drift + trend * std) / length, std * volatility_shape)  # (L,)
            close = open0 * np.exp(np.cumsum(returns))
            open_ = np.concatenate([[open0], close[:-1]])
            wick = std * volatility_shape * 0.5
            high = np.maximum(open_, close) * np.exp(np.abs(rng.normal(0, wick)))
            low = np.minimum(open_, close) * np.exp(-np.abs(rng.normal(0, wick)))
            volume = np.round(base_volume * volume_shape * regimes[regime]
                              * np.exp(rng.normal(0, 0.4, length)))
            bars = np.stack([open_, high, low, close, volume], axis=1)            # (L, 5)
            extras = np.array([[open0] * 4 + [base_volume // 10]] * 2
                              + [[close[-1]] * 4 + [0.0]] * 2)                   # (4, 5)
            minutes = np.concatenate([extra_minutes[:2], np.arange(start, end + 1),
                                      extra_minutes[2:]])
            times = np.datetime_as_string(date + minutes.astype("timedelta64[m]"), unit="s")
            for t, (o, h, lo, c, v) in zip(times, np.concatenate([extras[:2], bars, extras[2:]])):
                lines.append(f"{t.replace('T', ' ')},{symbol},"
                             f"{o:.2f},{h:.2f},{lo:.2f},{c:.2f},{v:.1f}")
            price = close[-1]
        path = folder / f"SYN{i:02d}.csv"
        # Written beside and renamed into place: a run that reads the folder
        # while another run of the same seed rewrites it sees whole files.
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        partial.write_text("\n".join(lines) + "\n", newline="")
        os.replace(partial, path)
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------
# Command line: a summary of the stream
# ---------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Summarise a MarketCL stream.")
    parser.add_argument("--dataset", default="market-synthetic", choices=MARKET_DATASETS,
                        help="market-synthetic (generated, offline; the default) or market (--source)")
    add_data_arguments(parser)
    parser.add_argument("--source", default=None,
                        help="a CSV file or a folder of CSVs of minute bars (market only)")
    parser.add_argument("--num-symbols", type=positive_int, default=MARKET_SYNTHETIC_SYMBOLS,
                        help=f"market-synthetic: symbols generated (default {MARKET_SYNTHETIC_SYMBOLS}; "
                             "the course report's full stream has 308)")
    parser.add_argument("--samples-per-day", type=positive_int, default=MARKET_SAMPLES_PER_DAY,
                        help="samples per symbol and day (market, market-synthetic)")
    args = parser.parse_args(argv)
    if (args.source is not None) != (args.dataset == "market"):
        parser.error("--dataset market needs --source, and only it takes one")
    if args.dataset == "market" and args.num_symbols != MARKET_SYNTHETIC_SYMBOLS:
        parser.error("--num-symbols is for market-synthetic; --source's files decide the symbols of market")

    start = time.perf_counter()
    try:
        if args.dataset == "market-synthetic":
            # Written on every call (a tenth of a second for 6 symbols, seconds
            # for hundreds): the files are a function of the seed and the
            # symbol count, so rewriting them equals reusing them.
            source = data_dir_or_default(args.data_dir) / market_synthetic_folder(args.seed, args.num_symbols)
            paths = write_synthetic_market(source, seed=args.seed, num_symbols=args.num_symbols)
            print(f"market-synthetic: wrote {len(paths)} CSV files to {source} "
                  f"in {time.perf_counter() - start:.1f} s")
            start = time.perf_counter()
        else:
            source = args.source
        stream = load_market(source, seed=args.seed, samples_per_day=args.samples_per_day)
    except DataError as err:
        return print_error(err)
    seconds = time.perf_counter() - start
    print(stream.summary())
    print(f"loaded in {seconds:.2f} s (seed {args.seed}, "
          f"{args.samples_per_day} samples per symbol and day)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
