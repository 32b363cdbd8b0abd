"""test_market_data.py: properties of the MarketCL data pipeline (market_data.py).

    python -m pytest -q test_market_data.py

No real data is read: every file is written here or by write_synthetic_market.
The MarketCL training tests (mark_min.py, baselines.py) are in test_mark.py.
"""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import market_data
from data import DataError
from market_data import (MARKET_FEATURE_NAMES, MARKET_LABEL_PAIRS, load_market, market_features,
                         market_labels, market_sample_minutes, market_session_days,
                         read_market_csv, write_synthetic_market)


HEADER = "datetime,symbol,open,high,low,close,volume"
SHORT_SESSION = ("09:15", "09:24")       # 10 minutes keep the hand-made files small


def bar_line(date: str, minute: int, close: float, symbol="NSE:ABC", volume=100.0) -> str:
    """One CSV row at `minute` minutes after midnight; open = close, high/low 0.1% around it."""
    return (f"{date} {minute // 60:02d}:{minute % 60:02d}:00,{symbol},"
            f"{close:.4f},{close * 1.001:.4f},{close * 0.999:.4f},{close:.4f},{volume}")


def session_day(date: str, start=555, length=10, seed=0, skip=()) -> list[str]:
    """A random walk over the session minutes of one day, leaving out the minutes in `skip`."""
    closes = 100 * np.exp(np.cumsum(np.random.default_rng(seed).normal(0, 0.003, length)))
    return [bar_line(date, start + m, c) for m, c in enumerate(closes) if m not in skip]


def same_samples(a, b) -> bool:
    """Two market Splits hold the same sequences, lengths and labels."""
    return (torch.equal(a.x.x, b.x.x) and torch.equal(a.x.lengths, b.x.lengths)
            and torch.equal(a.y, b.y))


def random_days(rng: np.random.Generator, days: int, length: int) -> np.ndarray:
    """(days, length, 5) positive bars with consistent high/low and some zero volumes."""
    close = 100 * np.exp(np.cumsum(rng.normal(0, 0.002, (days, length)), axis=1))
    open_ = close * np.exp(rng.normal(0, 0.001, (days, length)))
    high = np.maximum(open_, close) * (1 + rng.uniform(0, 0.002, (days, length)))
    low = np.minimum(open_, close) * (1 - rng.uniform(0, 0.002, (days, length)))
    volume = rng.integers(0, 3, (days, length)) * rng.uniform(0, 1e4, (days, length))
    return np.stack([open_, high, low, close, volume], axis=-1)


# ---------------------------------------------------------------------------
# The label rule
# ---------------------------------------------------------------------------

def test_threshold_ties_in_these_examples_are_exact():
    assert 100 * (1 + 0.02) == 102.0 and 100 * (1 - 0.01) == 99.0


@pytest.mark.parametrize("closes, expected", [
    ([100, 100.5, 103, 95], 3),        # target first
    ([100, 99.5, 98.9, 103], 0),       # stop first
    ([100, 101.5, 99.5, 100.2], 2),    # neither; last close above the entry
    ([100, 101.5, 99.5, 99.8], 1),     # neither; last close below the entry
    ([100, 101.5, 99.5, 100], 1),      # neither; last close equal to the entry is not above
    ([100, 99.5, 102, 95], 3),         # a close equal to the target reaches it
    ([100, 99, 99, 100.5], 2),         # a close equal to the stop does not fall below it
    ([100, 99, 98.99, 103], 0),        # ... the next close below it does
    ([100, 101.99, 98.99, 103], 0),    # just under the target does not count
    ([100], 1),                        # the last minute has no later close
])
def test_label_rule_on_hand_made_paths(closes, expected):
    labels = market_labels(np.array(closes, dtype=np.float64), [(0.02, 0.01)])
    assert labels[0, 0] == expected


def test_the_last_minute_is_labelled_1_by_every_head():
    closes = 100 * np.exp(np.cumsum(np.random.default_rng(0).normal(0, 0.01, 50)))
    assert (market_labels(closes)[-1] == 1).all()


def label_by_loop(closes: list[float], target: float, stop: float, i: int) -> int:
    """The rule as written in the report, one entry at a time."""
    entry = closes[i]
    for later in closes[i + 1:]:
        if later >= entry * (1 + target):
            return 3
        if later < entry * (1 - stop):
            return 0
    return 2 if closes[-1] > entry else 1


@settings(max_examples=200, deadline=None)
@given(steps=st.lists(st.integers(-8, 8), min_size=1, max_size=40))
def test_vectorised_labels_equal_a_plain_loop(steps):
    # Prices on a 0.25 grid around 100 so that the thresholds of entry 100 are hit exactly.
    closes = [100 + 0.25 * s for s in np.cumsum(steps)]
    labels = market_labels(np.array(closes), MARKET_LABEL_PAIRS)
    expected = [[label_by_loop(closes, t, s, i) for t, s in MARKET_LABEL_PAIRS]
                for i in range(len(closes))]
    assert labels.tolist() == expected


# ---------------------------------------------------------------------------
# Features
# ---------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), minute=st.integers(0, 374))
def test_changing_bars_after_minute_m_changes_no_feature_up_to_m(seed, minute):
    rng = np.random.default_rng(seed)
    bars = random_days(rng, 2, 375)                   # day 0 as today, day 1 as other future bars
    previous = np.array([[100.0, 101.0, 99.0, 100.5]])
    changed = bars[:1].copy()
    changed[0, minute + 1:] = bars[1, minute + 1:]
    before = market_features(bars[:1], previous)
    after = market_features(changed, previous)
    np.testing.assert_array_equal(after[0, :minute + 1], before[0, :minute + 1])


@settings(max_examples=40, deadline=None)
@given(prices=st.lists(st.sampled_from([1.0, 1.01, 50.0, 1e4]), min_size=1, max_size=80),
       volumes=st.lists(st.sampled_from([0.0, 1.0, 1e7]), min_size=80, max_size=80))
def test_features_are_finite_on_flat_prices_and_zero_volume(prices, volumes):
    close = np.array(prices)
    bars = np.stack([close, close, close, close, np.array(volumes[:len(prices)])], axis=-1)[None]
    features = market_features(bars, np.array([[1.0, 1.0, 1.0, 1.0]]))
    assert features.shape == (1, len(prices), len(MARKET_FEATURE_NAMES))
    assert np.isfinite(features).all()


# ---------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------

GOOD_ROWS = [HEADER,
             "2021-08-02 09:15:00,NSE:ABC,100,101,99,100.5,10",
             "2021-08-02 09:16:00,NSE:ABC,100.5,101,99,100,10",
             "2021-08-02 09:17:00,NSE:ABC,100,101,99,100.5,10"]


@pytest.mark.parametrize("line, row, message", [
    (1, "datetime,symbol,open,high,low,close", "missing column(s) volume"),
    (3, "2021-08-02 9h16,NSE:ABC,100.5,101,99,100,10", "cannot parse the time"),
    (3, "2021-08-02,NSE:ABC,100.5,101,99,100,10", "cannot parse the time"),
    (3, "2021-08-02 09:16:30,NSE:ABC,100.5,101,99,100,10", "not on a whole minute"),
    (3, "2021-08-02 09:14:00,NSE:ABC,100.5,101,99,100,10", "time goes backwards"),
    (3, "2021-08-02 09:15:00,NSE:ABC,100.5,101,99,100,10", "duplicate minute"),
    (3, "2021-08-02 09:16:00,NSE:ABC,100.5,101,99,0,10", "non-positive price: close"),
    (3, "2021-08-02 09:16:00,NSE:ABC,-1,101,99,100,10", "non-positive price: open"),
    (3, "2021-08-02 09:16:00,NSE:ABC,100.5,nan,99,100,10", "the high is NaN"),
    (3, "2021-08-02 09:16:00,NSE:ABC,100.5,101,abc,100,10", "cannot parse the low"),
    (3, "2021-08-02 09:16:00,NSE:ABC,100.5,101,99,100,-5", "negative volume"),
    (3, "2021-08-02 09:16:00,NSE:ABC,100.5,101,99,100", "6 fields, the header has 7"),
])
def test_bad_input_names_file_line_and_problem(tmp_path, line, row, message):
    rows = list(GOOD_ROWS)
    rows[line - 1] = row
    path = tmp_path / "ABC.csv"
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError) as error:
        read_market_csv(path)
    assert f"ABC.csv, line {line}: " in str(error.value)
    assert message in str(error.value)


def test_good_rows_read_back(tmp_path):
    path = tmp_path / "ABC.csv"
    path.write_text("\n".join(GOOD_ROWS) + "\n")
    times, ohlcv = read_market_csv(path)["NSE:ABC"]
    assert times.tolist() == list(np.array(["2021-08-02T09:15", "2021-08-02T09:16",
                                            "2021-08-02T09:17"], dtype="datetime64[m]").tolist())
    assert ohlcv[:, 3].tolist() == [100.5, 100, 100.5]


def test_incomplete_days_are_skipped_and_out_of_session_rows_dropped(tmp_path):
    outside = [bar_line("2021-08-04", 9 * 60 + 7, 5000.0),         # pre-open, wild price
               bar_line("2021-08-04", 15 * 60 + 30, 1.0)]          # after hours
    in_session = (session_day("2021-08-02", seed=1)
                  + session_day("2021-08-03", seed=2, skip={5})     # incomplete: 09:20 missing
                  + session_day("2021-08-04", seed=3)
                  + session_day("2021-08-05", seed=4))
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "ABC.csv").write_text("\n".join([HEADER] + in_session) + "\n")
    (tmp_path / "extra").mkdir()
    only_preopen = [bar_line("2021-08-06", 9 * 60 + 8, 100.0)]      # a day with no session row
    (tmp_path / "extra" / "ABC.csv").write_text(
        "\n".join([HEADER] + in_session[:19] + outside[:1] + in_session[19:29] + outside[1:]
                  + in_session[29:] + only_preopen) + "\n")

    plain = load_market(tmp_path / "plain", seed=0, samples_per_day=2, session=SHORT_SESSION)
    extra = load_market(tmp_path / "extra", seed=0, samples_per_day=2, session=SHORT_SESSION)
    assert [str(d) for d in extra.skipped["NSE:ABC"]] == ["2021-08-03", "2021-08-06"]
    assert str(extra.history["NSE:ABC"]) == "2021-08-02"      # first complete day: history only
    assert [str(d) for d in extra.days] == ["2021-08-04", "2021-08-05"]
    assert "NSE:ABC                2" in extra.summary()            # skipped count in the summary
    for d in range(2):
        assert same_samples(extra.splits[d][0], plain.splits[d][0])


def test_session_days_keep_whole_sessions_in_minute_order(tmp_path):
    path = tmp_path / "ABC.csv"
    rows = [HEADER] + session_day("2021-08-02") + session_day("2021-08-03")
    path.write_text("\n".join(rows) + "\n")
    dates, bars, skipped = market_session_days(*read_market_csv(path)["NSE:ABC"], SHORT_SESSION)
    assert bars.shape == (2, 10, 5) and len(skipped) == 0
    expected = np.array([line.split(",")[5] for line in session_day("2021-08-03")], dtype=float)
    np.testing.assert_array_equal(bars[1, :, 3], expected)


# ---------------------------------------------------------------------------
# market-synthetic and the stream
# ---------------------------------------------------------------------------

def test_synthetic_market_is_deterministic_per_seed(tmp_path):
    first = write_synthetic_market(tmp_path / "a", seed=3, num_symbols=2, num_days=3)
    again = write_synthetic_market(tmp_path / "b", seed=3, num_symbols=2, num_days=3)
    other = write_synthetic_market(tmp_path / "c", seed=4, num_symbols=2, num_days=3)
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in again]
    assert [p.read_bytes() for p in first] != [p.read_bytes() for p in other]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_no_class_of_any_head_holds_more_than_70_percent_on_synthetic_data(tmp_path, seed):
    write_synthetic_market(tmp_path, seed=seed)
    stream = load_market(tmp_path, seed=seed)
    balance = stream.class_balance()                   # (heads, classes)
    assert balance.shape == (4, 4)
    np.testing.assert_allclose(balance.sum(1), 1.0)
    assert balance.max() <= 0.7, stream.summary()


def test_samples_are_prefixes_of_the_day_padded_with_zeros_and_labelled_at_their_minute(tmp_path):
    paths = write_synthetic_market(tmp_path, seed=5, num_symbols=2, num_days=3)
    stream = load_market(tmp_path, seed=5, samples_per_day=16)
    assert len(stream.days) == 2 and stream.symbols == ["SYN:S00", "SYN:S01"]
    for s, path in enumerate(paths):
        dates, bars, _ = market_session_days(*read_market_csv(path)[stream.symbols[s]])
        previous = np.stack([bars[:-1, 0, 0], bars[:-1, :, 1].max(1),
                             bars[:-1, :, 2].min(1), bars[:-1, -1, 3]], axis=1)    # (D-1, 4)
        features = market_features(bars[1:], previous)
        for d in range(2):
            split = stream.splits[d][s]
            expected_x = (features[d] - stream.feature_mean) / stream.feature_std
            expected_x = expected_x.astype(np.float32)
            labels = market_labels(bars[d + 1, :, 3])
            x, minutes = split.x.x, split.x.lengths.numpy() - 1     # (16, L, F), (16,)
            assert split.x.shape == (16, 375, len(MARKET_FEATURE_NAMES))
            sixteenths = [(k * 375 // 16, (k + 1) * 375 // 16) for k in range(16)]
            assert all(lo <= m < hi for m, (lo, hi) in zip(minutes, sixteenths))
            for k, m in enumerate(minutes):
                np.testing.assert_array_equal(x[k, :m + 1].numpy(), expected_x[:m + 1])
                assert (x[k, m + 1:] == 0).all()
                assert split.y[k].tolist() == labels[m].tolist()


def test_later_days_change_neither_earlier_samples_nor_the_standardisation(tmp_path):
    paths = write_synthetic_market(tmp_path / "a", seed=6, num_symbols=2, num_days=4)
    before = load_market(tmp_path / "a", seed=6)
    last_day = str(before.days[-1])
    for path in paths:                                  # move every price of the last day by 10%
        rows = path.read_text().splitlines()
        rows = [row if not row.startswith(last_day) else
                ",".join(row.split(",")[:2] + [f"{float(v) * 1.1:.2f}" for v in row.split(",")[2:6]]
                         + row.split(",")[6:]) for row in rows]
        path.write_text("\n".join(rows) + "\n")
    after = load_market(tmp_path / "a", seed=6)
    np.testing.assert_array_equal(after.feature_mean, before.feature_mean)
    for d in range(len(before.days) - 1):
        for s in range(2):
            assert same_samples(after.splits[d][s], before.splits[d][s])
    assert not torch.equal(after.splits[-1][0].x.x, before.splits[-1][0].x.x)


def test_one_file_for_all_symbols_gives_the_same_stream(tmp_path):
    paths = write_synthetic_market(tmp_path / "many", seed=7, num_symbols=2, num_days=3)
    rows = [HEADER] + [row for p in paths for row in p.read_text().splitlines()[1:]]
    (tmp_path / "all.csv").write_text("\n".join(rows) + "\n")
    many = load_market(tmp_path / "many", seed=7)
    one = load_market(tmp_path / "all.csv", seed=7)
    assert one.symbols == many.symbols
    for row_one, row_many in zip(one.splits, many.splits):
        for a, b in zip(row_one, row_many):
            assert same_samples(a, b)


def test_symbols_are_chosen_and_ordered_with_or_without_the_exchange_prefix(tmp_path):
    write_synthetic_market(tmp_path, seed=8, num_symbols=3, num_days=2)
    stream = load_market(tmp_path, seed=8, symbols=["S02", "SYN:S00"])
    assert stream.symbols == ["SYN:S02", "SYN:S00"]
    with pytest.raises(DataError, match="not found"):
        load_market(tmp_path, seed=8, symbols=["S09"])


@given(length=st.integers(1, 400), samples=st.integers(1, 400), seed=st.integers(0, 1000))
def test_sample_minutes_fall_one_in_each_equal_part_of_the_day(length, samples, seed):
    samples = min(samples, length)
    minutes = market_sample_minutes(np.random.default_rng(seed), length, samples)
    parts = [(k * length // samples, (k + 1) * length // samples) for k in range(samples)]
    assert len(minutes) == samples
    assert all(lo <= m < hi for m, (lo, hi) in zip(minutes, parts))


def test_flat_prices_without_trades_give_neutral_indicators():
    # The price steps from 100 to 101.3 at minute 100 and then stays flat with no trades:
    # from minute 200 on, every window of 60 minutes or less sees a flat price.
    close = np.where(np.arange(375) < 100, 100.0, 101.3)
    bars = np.stack([close, close, close, close, np.zeros(375)], axis=-1)[None]    # (1, L, 5)
    features = market_features(bars, bars[:, 0, :4])[0, 200:]                      # (175, F)
    neutral = {"log_return_1": 0, "log_return_15": 0, "volume_ratio_60": 1, "sma_ratio_60": 0,
               "rsi_14": 0.5, "bollinger_position": 0.5, "bollinger_width": 0, "from_day_high": 0}
    for name, value in neutral.items():
        np.testing.assert_allclose(features[:, MARKET_FEATURE_NAMES.index(name)], value,
                                   atol=1e-12, err_msg=name)


# ---------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------

def test_market_synthetic_on_the_command_line_writes_per_seed_and_summarises(tmp_path, capsys):
    assert market_data.main(["--dataset", "market-synthetic", "--data-dir", str(tmp_path),
                      "--seed", "3", "--samples-per-day", "4"]) == 0
    out = capsys.readouterr().out
    folder = tmp_path / "market-synthetic-seed3"
    assert sorted(p.name for p in folder.iterdir()) == [f"SYN{i:02d}.csv" for i in range(6)]
    assert "market: 6 symbols, 11 days with samples" in out
    assert "total" in out and out.count("target ") == 4 and "loaded in" in out
    stream = load_market(folder, seed=3, samples_per_day=4)          # the same loader
    assert f"{sum(len(s) for row in stream.splits for s in row if s):>9}" in out


def test_market_on_the_command_line_reports_a_data_error_without_traceback(tmp_path, capsys):
    (tmp_path / "bad.csv").write_text("datetime,symbol,open\n")
    assert market_data.main(["--dataset", "market", "--source", str(tmp_path / "bad.csv")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "bad.csv, line 1: missing column(s)" in err
    assert "Traceback" not in err


def test_market_sample_count_out_of_range_is_refused_clearly(tmp_path, capsys):
    """0 or more samples than the session has minutes: a parser error on the
    command line, a DataError naming the allowed range in the library."""
    with pytest.raises(SystemExit) as exit_info:
        market_data.main(["--dataset", "market-synthetic", "--data-dir", str(tmp_path),
                   "--samples-per-day", "0"])
    assert exit_info.value.code == 2
    assert "--samples-per-day: must be a whole number >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(DataError, match="between 1 and 375 .* got 400"):
        load_market(tmp_path, seed=0, samples_per_day=400)
