"""market.py: MarketCL, the course report's stock-market stream, trained day by day.

    python market.py                                   # MARK on the synthetic market, quick profile
    python market.py --method b4 --out runs/market_b4  # a baseline (baselines.py's methods)
    python market.py --supsup                          # MARK + SupSup
    python market.py --dataset market --source data/nse-minute --out runs/nse   # your minute-bar CSVs
    python market.py --all --out runs/market           # every method, then the report's Table 3
    python market.py --describe                        # parameter and storage tables
    python market.py --num-symbols 308 --num-days 2 --day-matrix ends   # the report's 308 symbols, one day

The course report (its section 8) turns intraday trading into continual
learning: each stock symbol is a task with its own F_t, M_t and C_t; the KB is
shared. A symbol's samples of one day (market_data.load_market: 16 prefixes
of the day's feature sequence, four labels each) are its training set for
that day. The same symbols come back every day: on day d + 1 symbol s trains
again, continuing from its own modules of day d. Tests are on the NEXT day,
the future the model is meant to predict.

What changes against images: the networks are LSTMs (the report's MarketCL
model: F_t one LSTM, the KB three stacked LSTMs, masks scaling each layer's
channels), and every sample carries four labels (one per (target, stop)
pair), so a head outputs 4 x 4 logits and the loss is the mean of four
class-weighted cross-entropies. The five steps and the baselines are the same
functions as for images (mark_min.py, baselines.py).

At scale: a day's accuracy matrix tests every symbol trained so far after
each symbol, T(T+1)/2 tests for T symbols (47,586 a day for the report's
308); ACC and BWT read only its diagonal and last row, which
`--day-matrix ends` tests alone (2T-1 a day, the same ACC and BWT).
"""
from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import baselines
import experiment
import mark_min as mm
import metrics
import supsup
from data import DataError, Task, default_data_dir
from experiment import param
from market_data import (MARKET_DATASETS, MARKET_FEATURE_NAMES, MARKET_LABEL_PAIRS, MARKET_NUM_CLASSES,
                         MARKET_SYNTHETIC_SYMBOLS, MarketStream, load_market, market_synthetic_folder,
                         write_synthetic_market)


@dataclass
class MarketConfig(supsup.SupSupConfig):
    dataset: str = param("market-synthetic", "market-synthetic (generated, offline; the default) | "
                         "market (your minute-bar CSVs, --source)", "data", choices=list(MARKET_DATASETS))
    source: str | None = param(None, "--dataset market: a CSV file or a folder of minute-bar CSVs "
                               "(datetime,symbol,open,high,low,close,volume)", "data")
    num_symbols: int | None = param(None, f"--dataset market-synthetic: symbols generated (default "
                                    f"{MARKET_SYNTHETIC_SYMBOLS}; the course report's full stream has 308)",
                                    "data", type=experiment.positive(int))
    num_days: int | None = param(None, "keep only the first N days with samples (N >= 2; the last is "
                                 "only tested; default: all)", "data", type=experiment.positive(int))
    seq_query: int = param(64, "size of F_t's LSTM, the query (the report's MarketCL model: 64)",
                           type=experiment.positive(int))
    seq_channels: tuple = param((64, 128, 256), "sizes of the KB's three stacked LSTMs (the report)")
    supsup: bool = param(False, "MARK + SupSup (supsup.py) instead of MARK's per-task M_t and C_t")
    day_matrix: str = param("full", "full: after each symbol, test every symbol of the day trained so far "
                            "(R_d's lower triangle, T(T+1)/2 tests a day) | ends: only R_d's diagonal and "
                            "last row, the entries ACC and BWT read (2T-1 tests; same ACC and BWT; for "
                            "hundreds of symbols)", "run", choices=["full", "ends"])

    def __post_init__(self):
        super().__post_init__()
        self.seq_channels = tuple(self.seq_channels)
        if self.dataset == "market" and self.source is None:
            raise ValueError("--dataset market needs --source: a minute-bar CSV file or a folder of them "
                             "(datetime,symbol,open,high,low,close,volume)")
        if self.source is not None and self.dataset != "market":
            raise ValueError("--source is read by --dataset market only")
        if self.num_symbols is not None and self.dataset != "market-synthetic":
            raise ValueError("--num-symbols is for --dataset market-synthetic; --source's files decide the "
                             "symbols of --dataset market (--num-tasks keeps the first N)")
        if self.num_days == 1:
            raise ValueError("--num-days must be >= 2: MarketCL trains on a day and tests on the next")


# MarketCL's schedules. "paper" is the course report's (its section 3.2): SGD
# at learning rate 0.001 for its steps 1-4 and 0.005 for its step 5, batch
# size 4, 30 epochs in steps 1, 2 and 3 and 25 in its step 4. The report
# numbers its steps differently from the paper: for CIFAR-100 its "step 4"
# has the fine-tuning's 30 epochs and its step 5 the fine-tuning's learning
# rate (0.05), so both are read here as the consolidation, our step 5
# (epochs_consolidate 25, lr_consolidate 0.005). The report gives no
# meta-update settings for MarketCL: the authors' (10 x K=10 x 40) stand.
# "short" divides the epochs by 10, as for images; "quick" keeps the report's
# rates and batch but runs 3 epochs per step and fewer, shorter meta-tasks
# (the LSTMs run up to 375 steps per sample, and step 4 dominates), so 6
# symbols x 10 days take minutes on one core. Both are labelled short.
MARKET_PAPER = dict(lr=0.001, lr_consolidate=0.005, batch_size=4, epochs_fe=30, epochs_kb=30,
                    epochs_masks=30, epochs_consolidate=25)
DATASET_PROFILES = {}
for market in MARKET_DATASETS:
    DATASET_PROFILES[(market, "paper")] = MARKET_PAPER
    DATASET_PROFILES[(market, "short")] = MARKET_PAPER | dict(epochs_fe=3, epochs_kb=3, epochs_masks=3,
                                                              epochs_consolidate=3, meta_epochs=1)
    DATASET_PROFILES[(market, "quick")] = DATASET_PROFILES[(market, "short")] | dict(meta_k=2, meta_inner_steps=5)


def resolve_config(cfg, overridden=frozenset()):
    return mm.resolve_config(cfg, overridden, DATASET_PROFILES)


# ---------------------------------------------------------------------------
# The model: LSTMs, four label heads
# ---------------------------------------------------------------------------

def last_step(h, lengths):
    """h: (B, L, C) -> (B, C), each sequence's output at its TRUE last step.

    The LSTMs run forward in time, so the output at step lengths-1 never saw
    the zero padding after it; reading h[:, -1] instead would read padding.
    """
    return h[torch.arange(h.shape[0], device=h.device), lengths - 1]


def trimmed(seqs):
    """Drop the padding columns no sequence of this batch reaches (saves
    LSTM steps; one host sync per batch, the price of a shorter loop)."""
    return seqs.x[:, :int(seqs.lengths.max())]


class SequenceFeatureExtractor(nn.Module):
    """F_t for sequences: one LSTM (features -> 64); the query is its output at
    each sequence's true last step."""

    def __init__(self, n_features, hidden=64):
        super().__init__()
        self.lstm = nn.LSTM(n_features, hidden, batch_first=True)

    def forward(self, seqs):                    # seqs.x: (B, L, F) -> (B, hidden)
        h, _ = self.lstm(trimmed(seqs))         # (B, L', hidden)
        return last_step(h, seqs.lengths)


class SequenceKnowledgeBase(nn.Module):
    """KB for sequences: three stacked LSTMs (F -> 64 -> 128 -> 256); each
    layer's whole output sequence is multiplied by its mask, one scale per
    channel and sequence: h_l = LSTM_l(h_{l-1}) * m_l[:, None, :]. Output: the
    last layer at the true last step, then dropout."""

    def __init__(self, n_features, channels=(64, 128, 256), dropout=0.5):
        super().__init__()
        sizes = (n_features,) + tuple(channels)
        self.lstms = nn.ModuleList(nn.LSTM(a, b, batch_first=True) for a, b in zip(sizes, sizes[1:]))
        self.dropout = nn.Dropout(dropout)

    def forward(self, seqs, masks=None, noise=None):    # seqs.x: (B, L, F)
        h = trimmed(seqs)
        for l, lstm in enumerate(self.lstms):
            h, _ = lstm(h)                      # (B, L', c_l)
            if masks is not None:
                h = h * masks[l][:, None, :]    # m_l: (B, c_l), same scale at every time step
        h = last_step(h, seqs.lengths)          # (B, 256)
        return self.dropout(h) if noise is None else h * noise   # noise: see KnowledgeBase



def lstm_architecture(cfg: MarketConfig, in_shape) -> mm.Architecture:
    """The report's LSTMs for sequences of shape (L, F)."""
    n_features = in_shape[1]
    return mm.Architecture(
        make_kb=lambda: SequenceKnowledgeBase(n_features, cfg.seq_channels, cfg.dropout),
        make_fe=lambda: SequenceFeatureExtractor(n_features, cfg.seq_query),
        kb_channels=cfg.seq_channels, kb_out=cfg.seq_channels[-1], query_dim=cfg.seq_query)


class MultiLabelMARKNet(mm.MARKNet):
    """MARKNet whose every input carries `labels` labels of k classes: a head
    outputs labels x k logits; the loss is the mean over labels of the
    class-weighted cross-entropies, with inverse-frequency weights per task
    and label from the task's training labels (set_class_weights)."""

    def __init__(self, arch, kbs, heads, extractors=None, mask_generators=None, *, tasks, labels, classes):
        super().__init__(arch, kbs, heads, extractors, mask_generators)
        self.labels = labels
        self.register_buffer("class_weights", torch.ones(tasks, labels, classes))

    def new_head(self, num_classes, inputs=None) -> nn.Module:
        return super().new_head(num_classes * self.labels, inputs)

    @torch.no_grad()
    def set_class_weights(self, t, y):
        """w_c = n / (k * n_c) per label from task t's training labels y (n,
        labels). A class absent from the data gets weight 1: no sample
        carries it, so it never enters the loss either way."""
        k = self.class_weights.shape[2]
        counts = F.one_hot(y, k).sum(0).float()                       # (labels, k)
        weights = torch.where(counts > 0, len(y) / (k * counts.clamp_min(1)), torch.ones_like(counts))
        self.class_weights[t].copy_(weights)

    def loss(self, out, y, t):
        out = out.view(len(y), self.labels, -1)                      # (B, labels, k)
        return torch.stack([F.cross_entropy(out[:, j], y[:, j], weight=self.class_weights[t, j])
                            for j in range(self.labels)]).mean()

    def predict(self, out):
        """Logits -> predicted classes (B, labels)."""
        return out.view(len(out), self.labels, -1).argmax(2)


def build_model(cfg: MarketConfig, in_shape, classes_per_task, device, *, labels=len(MARKET_LABEL_PAIRS),
                **options) -> MultiLabelMARKNet:
    """mark_min.build_model with the LSTMs, `labels` heads of k classes per
    task, and SupSup's mask generator and head if cfg.supsup."""
    if cfg.supsup:
        options = dict(mask_generators=supsup.supsup_mask_generators, heads=supsup.supsup_heads) | options
    k = max(classes_per_task)
    return mm.build_model(cfg, in_shape, [c * labels for c in classes_per_task], device,
                          architecture=lstm_architecture,
                          model_class=partial(MultiLabelMARKNet, tasks=len(classes_per_task),
                                              labels=labels, classes=k), **options)


# ---------------------------------------------------------------------------
# The day-by-day protocol
# ---------------------------------------------------------------------------

MARKET_CLASS_NAMES = ["stop first", "ends not above", "ends above", "target first"]  # market_data.market_labels


def load_market_stream(cfg: MarketConfig, seed: int, device) -> MarketStream:
    """cfg.dataset's MarketCL stream. market reads the CSVs at cfg.source;
    market-synthetic first writes its CSVs (a function of the seed) to
    DATA_DIR/market-synthetic-seed{seed}/, so both go through the same loader.
    num_tasks keeps the first N symbols, num_days the first N days."""
    if cfg.dataset == "market-synthetic":
        data_dir = Path(cfg.data_dir) if cfg.data_dir else default_data_dir()
        symbols = cfg.num_symbols or MARKET_SYNTHETIC_SYMBOLS
        source = data_dir / market_synthetic_folder(seed, symbols)
        write_synthetic_market(source, seed=seed, num_symbols=symbols)
    else:
        source = cfg.source
    stream = load_market(source, seed=seed, device=device)
    symbols, days = cfg.num_tasks or len(stream.symbols), cfg.num_days or len(stream.days)
    stream = dataclasses.replace(stream, symbols=stream.symbols[:symbols], days=stream.days[:days],
                                 splits=[row[:symbols] for row in stream.splits[:days]])
    testable = [a is not None and b is not None          # a symbol-day with samples the next day
                for today, tomorrow in zip(stream.splits, stream.splits[1:])
                for a, b in zip(today, tomorrow)]
    if not any(testable):
        raise DataError(f"{source}: MarketCL trains a symbol on one day and tests it on the next, "
                        f"but no symbol has samples on two consecutive days of the "
                        f"{len(stream.days)} kept")
    return stream


def market_task(index: int, s: int, split) -> Task:
    """Symbol s's samples of one day as a Task, the unit the five steps train.

    index counts the symbol-days trained so far in the run: index 0 is the
    stream's first task, the only one on which MARK pre-trains the KB (step
    2). The steps read only .train and .num_classes; tests use the next day.
    """
    return Task(index, list(range(MARKET_NUM_CLASSES)), MARKET_CLASS_NAMES, split, None, None)


@torch.inference_mode()
def predict_classes(model: MultiLabelMARKNet, t, x, chunk=1000) -> torch.Tensor:
    """Task t's predicted classes (F_t, M_t, KB, C_t in eval mode): (N, labels)."""
    model.eval()
    return torch.cat([model.predict(model(xb, t)) for xb in x.split(chunk)])


@contextlib.contextmanager
def flush_denormals():
    """Treat denormal floats (below ~1e-38) as zero while the block runs.

    Backpropagating from one step (the true last step) through hundreds of
    LSTM steps shrinks the gradient into the denormal range, where x86
    arithmetic is about ten times slower: one forward and backward pass of the
    KB on 16 x 375 steps took 2.9 s with denormals and 0.22 s without (one
    thread). Numbers that small change no result.
    """
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


def trivial_predictions(stream: MarketStream, d: int, tested, seen_counts) -> dict:
    """Two predictors that learn nothing, for tomorrow's samples of the day's
    tested symbols, each (N, P) like the model's predictions:
      majority      every label's most frequent class in all training samples
                    so far (every symbol, days 0..d): seen_counts (P, k)
      previous_day  per symbol, the most frequent class of its samples of
                    day d, the day it just trained on (ties: the lower class)
    Neither looks at tomorrow's labels."""
    today, tomorrow = stream.splits[d], stream.splits[d + 1]
    k = MARKET_NUM_CLASSES
    majority = seen_counts.argmax(1)                                                   # (P,)
    preds = {"majority": [], "previous_day": []}
    for u in tested:
        n = len(tomorrow[u].y)
        counts = F.one_hot(today[u].y.cpu(), k).sum(0)                                 # (P, k)
        preds["majority"].append(np.tile(majority, (n, 1)))
        preds["previous_day"].append(np.tile(counts.argmax(1).numpy(), (n, 1)))
    return {name: np.concatenate(p) for name, p in preds.items()}


def scores(y, pred, tested_sizes) -> dict:
    """Per label: ACC as the model's (the mean over the day's tested symbols
    of each symbol's accuracy, i.e. the last row of R_d) and the macro F1 of
    the symbols' samples pooled."""
    bounds = np.cumsum([0] + tested_sizes)
    per_symbol = np.stack([(pred[a:b] == y[a:b]).mean(0) for a, b in zip(bounds, bounds[1:])])  # (S, P)
    return {"acc_per_label": per_symbol.mean(0).tolist(),
            "macro_f1_per_label": [metrics.macro_f1(y[:, h], pred[:, h], MARKET_NUM_CLASSES)
                                   for h in range(y.shape[1])]}


def market_summary(days: list[dict]) -> dict:
    """Per-label ACC, BWT and macro F1, each the mean over the days that have
    a matrix; acc and bwt: the mean of the per-label values over labels; the
    same ACC and F1 of the trivial predictors."""
    scored = [day for day in days if day["tested"]]
    if not scored:
        return {"acc": None, "bwt": None}
    mean = lambda values: np.mean(values, axis=0).tolist()
    keys = ("acc_per_label", "bwt_per_label", "macro_f1_per_label")
    per_label = {key: mean([day[key] for day in scored]) for key in keys}
    trivial = {name: {key: mean([day["trivial"][name][key] for day in scored])
                      for key in ("acc_per_label", "macro_f1_per_label")}
               for name in scored[0]["trivial"]}
    return per_label | {"acc": float(np.mean(per_label["acc_per_label"])),
                        "bwt": float(np.mean(per_label["bwt_per_label"])), "trivial": trivial}


def run_market_seed(cfg: MarketConfig, method: str, seed: int, stream: MarketStream, train_task,
                    build, device, log, on_day_done=None) -> dict:
    """Train `method` on the MarketCL stream for one seed, day by day.

    For each training day d (every day but the last), tomorrow = day d + 1:
      for each symbol s with samples on day d, in stream order:
        train s on day d's samples (its own F_s, M_s, C_s; class weights from
        day d's labels; step 2 only on the run's very first symbol-day),
        then test every symbol of the day's matrix trained so far, on tomorrow
        (--day-matrix ends: only itself, and every one after the day's last
        tested symbol; ACC and BWT read nothing else, other entries stay NaN).
    Day d's accuracy matrix, one per label head h:
        R_d[h][i][j] = accuracy of head h on tomorrow's samples of the day's
                       j-th symbol, after the day's i-th symbol trained (j <= i)
    The day's symbols (rows and columns) are those with samples on day d AND
    tomorrow, in stream order. A symbol without samples on day d (the loader
    skipped an incomplete day) is not trained that day; one without samples
    tomorrow is trained but cannot be tested; neither has a row or column that
    day. A day with no such symbol counts in no average.
    Per head: ACC_d, BWT_d = metrics.average_accuracy / backward_transfer of
    R_d[h], and macro F1_d of the day's final model on tomorrow's samples of
    the day's symbols pooled; the run reports their means over days.
    """
    experiment.seed_everything(seed)
    S, P = len(stream.symbols), len(stream.label_pairs)
    first = next(split for row in stream.splits for split in row if split is not None)
    model = build(cfg, first.x.shape[1:], [MARKET_NUM_CLASSES] * S, device, labels=P)   # (L, F)
    gen = torch.Generator(device=device).manual_seed(seed)
    D = len(stream.days) - 1                        # training days; the last day is only tested
    record = {"seed": seed, "method": method, "identity": experiment.run_identity(cfg, method, seed),
              "days_done": 0, "training_days": D,
              "parameters": experiment.count_parameters(model), "symbols": stream.symbols,
              "label_pairs": [list(pair) for pair in stream.label_pairs],
              "class_balance": stream.class_balance().tolist(),   # (P, 4) fractions: what chance is
              "acc": None, "bwt": None, "days": []}
    trained = 0                                     # symbol-days so far: the next task's index
    seen_counts = np.zeros((P, MARKET_NUM_CLASSES), dtype=np.int64)   # training labels so far, per label
    started = time.perf_counter()
    for d in range(D):
        today, tomorrow = stream.splits[d], stream.splits[d + 1]
        tested = [s for s in range(S) if today[s] is not None and tomorrow[s] is not None]
        R = np.full((P, len(tested), len(tested)), np.nan)          # R_d[h][i][j]
        timer, day_start = experiment.StepTimer(device, lambda _: None), time.perf_counter()
        for s in (s for s in range(S) if today[s] is not None):
            seen_counts += F.one_hot(today[s].y.cpu(), MARKET_NUM_CLASSES).sum(0).numpy()
            symbol_start = time.perf_counter()
            model.set_class_weights(s, today[s].y)
            train_task(model, s, market_task(trained, s, today[s]), cfg, gen, timer)
            trained += 1
            if s in tested:
                i = tested.index(s)
                # Row i of R_d: every symbol so far, or (--day-matrix ends)
                # only R_d[i][i], and the whole row once i is the last row.
                columns = (range(i + 1) if cfg.day_matrix == "full" or i == len(tested) - 1 else [i])
                for j in columns:
                    u = tested[j]
                    R[:, i, j] = (predict_classes(model, u, tomorrow[u].x) == tomorrow[u].y
                                  ).float().mean(0).cpu().numpy()       # (P,) one per head
            log(f"    day {d + 1}/{D}, {stream.symbols[s]}: tomorrow's accuracy per label "
                + ("(not tested: no samples tomorrow)" if s not in tested else
                   " ".join(f"{100 * a:.1f}" for a in R[:, tested.index(s), tested.index(s)]))
                + f" ({time.perf_counter() - symbol_start:.1f} s)")
        day = {"train_day": str(stream.days[d]), "test_day": str(stream.days[d + 1]),
               "trained": [stream.symbols[s] for s in range(S) if today[s] is not None],
               "tested": [stream.symbols[s] for s in tested]}
        if tested:
            y = torch.cat([tomorrow[u].y for u in tested]).cpu().numpy()                     # (N, P)
            pred = torch.cat([predict_classes(model, u, tomorrow[u].x) for u in tested]).cpu().numpy()
            sizes = [len(tomorrow[u].y) for u in tested]
            acc_bwt = [metrics.acc_bwt_from_ends(np.diag(R[h]), R[h, -1]) for h in range(P)]
            day |= {"acc_per_label": [acc for acc, _ in acc_bwt],
                    "bwt_per_label": [bwt for _, bwt in acc_bwt],
                    "macro_f1_per_label": [metrics.macro_f1(y[:, h], pred[:, h], MARKET_NUM_CLASSES)
                                           for h in range(P)],
                    "acc_matrices": [experiment.matrix_to_json(R[h]) for h in range(P)],
                    "trivial": {name: scores(y, trivial, sizes) for name, trivial in
                                trivial_predictions(stream, d, tested, seen_counts).items()}}
        day |= {"seconds": time.perf_counter() - day_start, "step_seconds": timer.current}
        record["days"].append(day)
        record["days_done"] = d + 1
        record.update(market_summary(record["days"]))
        elapsed = time.perf_counter() - started
        log(f"[{method} seed {seed}] day {d + 1}/{D} ({day['train_day']}, tested on {day['test_day']})"
            + ("" if not tested else
               ": ACC per label " + " ".join(f"{100 * a:.1f}" for a in day["acc_per_label"])
               + " | BWT " + " ".join(f"{100 * b:+.1f}" for b in day["bwt_per_label"]))
            + f" | elapsed {elapsed / 60:.1f} min, ~{elapsed / (d + 1) * (D - d - 1) / 60:.1f} min left")
        if on_day_done:
            on_day_done(record)
    return record


def format_market_run(record: dict) -> str:
    """A run's per-label ACC, BWT and macro F1 next to those of the two
    trivial predictors (always the majority class so far; the symbol's
    previous day's most frequent class) and the class balance."""
    trivial = record["trivial"]
    lines = [f"{'label (target, stop)':<22s}{'ACC %':>8s}{'BWT %':>8s}{'F1 %':>7s}"
             f"{'majority ACC/F1':>17s}{'prev. day ACC/F1':>18s}"
             f"   class balance % (0 stop / 1 not above / 2 above / 3 target)"]
    for h, (target, stop) in enumerate(record["label_pairs"]):
        balance = " / ".join(f"{100 * f:.1f}" for f in record["class_balance"][h])
        pair = lambda name: (f"{100 * trivial[name]['acc_per_label'][h]:.1f} / "
                             f"{100 * trivial[name]['macro_f1_per_label'][h]:.1f}")
        lines.append(f"{h + 1} (+{target:.1%}, -{stop:.1%}){'':<5s}"
                     f"{100 * record['acc_per_label'][h]:>8.2f}{100 * record['bwt_per_label'][h]:>+8.2f}"
                     f"{100 * record['macro_f1_per_label'][h]:>7.1f}{pair('majority'):>17s}"
                     f"{pair('previous_day'):>18s}   {balance}")
    return "\n".join(lines)


def run_market_experiment(cfg: MarketConfig, method: str, train_task, build, schedule: str,
                          log=experiment.log_line) -> dict:
    """run_experiment for MarketCL: the same results.json (config, torch,
    device, method, schedule, runs, summary), written after every day, so an
    interruption keeps the finished days. Resume is per seed only: --resume
    keeps the seeds that finished and runs an unfinished seed again from its
    first day (no checkpoints inside a seed)."""
    with experiment.open_results(cfg, method, schedule, log, "MarketCL") as (device, results, previous, save), \
            flush_denormals():
        for seed in range(cfg.seed, cfg.seed + cfg.runs):
            old = previous.get(seed)
            if old and experiment.run_finished(old):
                log(f"[{method} seed {seed}] already finished, skipped")
                continue
            stream = load_market_stream(cfg, seed, device)
            log(stream.summary())
            record = run_market_seed(cfg, method, seed, stream, train_task, build, device,
                                     log, on_day_done=save)
            save(record)
            log(f"[{method} seed {seed}] means over {record['training_days']} days "
                f"({sum(day['seconds'] for day in record['days']) / 60:.1f} min):\n"
                + format_market_run(record))
    s = results["summary"]
    log(f"{method}: ACC (mean over labels) {100 * s['acc_mean']:.2f} (std {100 * s['acc_std']:.2f}) %, "
        f"BWT {100 * s['bwt_mean']:+.2f} %, over {s['runs']} run(s); {results['schedule']}")
    return results


def market_table(results_by_method: dict, descriptions: dict) -> str:
    """The report's Table 3 layout: per-label accuracy (%) of each method (mean
    over runs), the BWT averaged over labels, and the class balance of each
    label, so a reader can see what chance is. results_by_method: method ->
    results.json content; descriptions: method -> the name to print."""
    runs = {m: [r for r in res["runs"] if experiment.run_finished(r)] for m, res in results_by_method.items()}
    runs = {m: rs for m, rs in runs.items() if rs}
    if not runs:
        return "(no finished MarketCL run)"
    pairs = next(iter(runs.values()))[0]["label_pairs"]
    header = ([f"label {h + 1} (+{t:.1%}, -{s:.1%}) acc / macro F1 %" for h, (t, s) in enumerate(pairs)]
              + ["BWT % (mean over labels)", "runs", "wall time / run"])
    lines = ["| Method | " + " | ".join(header) + " |", "|" + "---|" * (len(header) + 1)]
    for m, rs in runs.items():
        summary = experiment.summarize(rs, m)
        acc = np.array([r["acc_per_label"] for r in rs])                       # (runs, P)
        f1 = np.array([r["macro_f1_per_label"] for r in rs]).mean(0)
        cells = [f"{100 * a:.2f}" + (f" ({100 * sd:.2f})" if len(rs) > 1 else "") + f" / {100 * f:.1f}"
                 for a, sd, f in zip(acc.mean(0), acc.std(0), f1)]
        minutes = np.mean([sum(day["seconds"] for day in r["days"]) for r in rs]) / 60
        cells += [f"{100 * summary['bwt_mean']:+.3f}", str(summary["runs"]), f"{minutes:.1f} min"]
        lines.append(f"| {descriptions.get(m, m)} | " + " | ".join(cells) + " |")
    balance = np.array(next(iter(runs.values()))[0]["class_balance"])               # (P, 4)
    lines.append("| class balance % (0 stop / 1 not above / 2 above / 3 target) | "
                 + " | ".join(" / ".join(f"{100 * f:.1f}" for f in row) for row in balance)
                 + " | | | |")
    lines.append("| majority class of the whole stream, test days included, % | "
                 + " | ".join(f"{100 * row.max():.2f}" for row in balance) + " | | | |")
    first = next(iter(runs.values()))
    names = {"majority": "trivial: the majority class of the training data so far, acc / macro F1 %",
             "previous_day": "trivial: the symbol's previous day's most frequent class, acc / macro F1 %"}
    for name, label in names.items():           # the same for every method: a function of the data
        if all("trivial" in r for r in first):
            acc = np.mean([r["trivial"][name]["acc_per_label"] for r in first], axis=0)
            f1 = np.mean([r["trivial"][name]["macro_f1_per_label"] for r in first], axis=0)
            lines.append(f"| {label} | " + " | ".join(f"{100 * a:.2f} / {100 * f:.1f}" for a, f in zip(acc, f1))
                         + " | | | |")
    return "\n".join(lines)




# ---------------------------------------------------------------------------
# --describe and the command line
# ---------------------------------------------------------------------------

MARKET_SHAPE = (375, len(MARKET_FEATURE_NAMES))   # a day's 375 minutes x the features
KNOWN_SYMBOLS = {"market": 20, "market-synthetic": MARKET_SYNTHETIC_SYMBOLS}   # the report's 20
_SUPSUP_PARTS = dict(mask_generators=supsup.supsup_mask_generators, heads=supsup.supsup_heads)
STORAGE = {"MARK": experiment.with_settings(experiment.storage_of(build_model), shared_fe=False),
           "MARK, shared F": experiment.with_settings(experiment.storage_of(build_model), shared_fe=True),
           "MARK + SupSup": experiment.with_settings(
               experiment.storage_of(build_model, supsup.stored_with_bits, **_SUPSUP_PARTS), shared_fe=False),
           "MARK + SupSup, shared F": experiment.with_settings(
               experiment.storage_of(build_model, supsup.stored_with_bits, **_SUPSUP_PARTS), shared_fe=True),
           "Baseline 4": experiment.storage_of(build_model, masks=False, kb_per_task=True)}


def describe(cfg: MarketConfig, log=print) -> int:
    """mark_min.describe for MarketCL: T symbols (--num-tasks; default the
    report's 20, or the synthetic market's --num-symbols), 4 labels of 4
    classes each."""
    classes = [MARKET_NUM_CLASSES] * (cfg.num_symbols or KNOWN_SYMBOLS[cfg.dataset])
    note = f", {len(MARKET_LABEL_PAIRS)} labels of {MARKET_NUM_CLASSES} classes per task"
    return experiment.describe(dataclasses.replace(cfg, supsup=False), build_model, log, storage=STORAGE,
                               shape=MARKET_SHAPE, classes=classes, note=note)


# The methods of baselines.py whose settings MarketConfig carries: every one
# whose config class is mm.Config. EWC's (baselines.EWCConfig) is not: its
# Fisher is written for one label per sample and a task-list stream.
MARKET_METHODS = [name for name, m in baselines.METHODS.items() if issubclass(MarketConfig, m.config_class)]


def run_method(cfg: MarketConfig, method: str, overridden=frozenset(), log=experiment.log_line) -> dict:
    """One of baselines.METHODS (MARK by default) on MarketCL; with --supsup,
    the method's model takes SupSup's mask generator and head."""
    m = baselines.METHODS[method]
    return run_market_experiment(baselines.method_config(method, cfg), method, m.train_task,
                                 m.builder(build_model), mm.describe_schedule(cfg, overridden), log)


def build_table(out, dataset=None, log=print):
    """The report's Table 3 from OUT/<method>/results.json (baselines.build_table)."""
    return baselines.build_table(Path(out), dataset, log, cfg=MarketConfig(), market_table=market_table)


def parse(argv):
    """(cfg, the flags given, the namespace) of market.py's command line."""
    parser = experiment.make_parser(MarketConfig, __doc__.split("\n\n")[0])
    parser.add_argument("--describe", action="store_true", help="print the parameter and storage tables")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--method", type=baselines.method_name, default="mark",
                       help=f"one of {', '.join(MARKET_METHODS)} or 1-4 (default mark)")
    group.add_argument("--all", action="store_true", help="every method, then the table (needs --out)")
    group.add_argument("--table", metavar="DIR", help="print the table of a finished --all run")
    cfg, given, args = experiment.parse_config(argv, MarketConfig, parser, resolve_config)
    if args.all and not cfg.out:
        parser.error("--all needs --out DIR (one sub-folder per method, and the table)")
    if args.method not in MARKET_METHODS:
        parser.error(f"--method {args.method} runs on task lists only (python baselines.py "
                     f"--method {args.method}); on MarketCL: {', '.join(MARKET_METHODS)}")
    return cfg, given, args


def main(argv=None):
    cfg, given, args = parse(argv)

    def run():
        if args.describe:
            describe(cfg)
        elif args.table or args.all:
            if args.all:
                baselines.run_all(cfg, given, run_method, MARKET_METHODS)
            build_table(args.table or cfg.out, cfg.dataset if "dataset" in given else None)
        else:
            run_method(cfg, args.method, given)
    return experiment.report_errors(run, cfg, unit="days")


if __name__ == "__main__":
    sys.exit(main())
