"""data.py: turn a dataset into a stream of continual-learning tasks.

    python data.py --dataset glyphs                       # offline synthetic default
    python data.py --dataset cifar100 --data-dir data     # 20-Split CIFAR-100
    python data.py --dataset imagedata --data-dir data    # the report's ImageData
    python data.py --dataset npz --path my.npz            # your own images
    python data.py --dataset market --source DIR          # MarketCL on your CSVs
    python data.py --dataset market-synthetic             # MarketCL on generated CSVs

Each command prints a summary of the stream and how long loading took; a
problem with the data prints one line "error: ..." and exits 1.

A *task* is a small classification problem (5 classes for 20-Split CIFAR-100)
with its own train / validation / test tensors. `load_tasks` returns the list
of tasks in the order a continual learner meets them. Everything stays a
tensor (on the chosen device when it fits): no PIL, no torchvision, no
per-sample Python work, so a 20-task run never waits for its data.

Public interface (course assignments import these names):
    load_tasks(dataset, *, data_dir, seed, num_tasks=None,
               classes_per_task=None, device="cpu", ...) -> list[Task]
    Task, Split, Split.batches(batch_size, generator)
    load_market(source, *, seed, ...) -> MarketStream   (MarketCL, see below)
    Sequences: padded sequences with their lengths, indexable like a tensor
    DataError: raised for every problem with the data; the message says what
               was wrong and what to do. The command line prints it without a
               traceback and exits non-zero.

Datasets of load_tasks (the `dataset` argument):
    "cifar100"  20-Split CIFAR-100, the paper's benchmark (its 20-Split
                protocol). Read from <data_dir>/cifar-100-python/, else from
                the official archive in <data_dir>, else downloaded.
    "glyphs"    a small synthetic stand-in for the report's ImageData: 20x20
                grayscale drawings, 75 classes, 15 tasks. Needs no files.
    "imagedata" the report's ImageData, rebuilt from the course's glyph PNGs
                (<data_dir>/images_rotate.zip, else downloaded): 74 classes of
                20x20 grayscale glyphs under 441 shears, 14 tasks of 5 classes
                and a last task of 4. Built once, then read from a cache.
    "npz"       your own images in one .npz file (load_tasks("npz",
                path="my.npz", classes_per_task=2)); see `load_npz`.

Every dataset goes through the same last step, `make_tasks`: a seeded
permutation of the classes, cut into tasks of `classes_per_task`; labels
renumbered 0..k-1 inside each task; `val_fraction` of every class's training
images held out as validation; images normalised per channel.

MarketCL (the report's section 8) is not a list of tasks but a stream of
days: every stock symbol is a task, met again every day. `load_market` reads
minute-bar CSVs (a file or a folder) and returns a MarketStream whose
splits[d][s] holds symbol s's samples of day d: a Split whose x is a
Sequences (the day's features up to a sampled minute) and whose y holds one
label per (target, stop) pair. "market-synthetic" is a seeded synthetic
market written as CSVs (`write_synthetic_market`, by the command line into
<data_dir>/market-synthetic-seed<S>/) and read by the same loader.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import hashlib
import json
import math
import os
import pickle
import re
import shutil
import struct
import sys
import tarfile
import time
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view

# Where datasets live unless --data-dir says otherwise. ./data is git-ignored.
DATA_DIR_ENV = "MARK_DATA_DIR"

# Fraction of each class's training images held out for validation. The
# authors' code used 15% (2125 train / 375 validation per CIFAR-100 task).
VAL_FRACTION = 0.15

# --- CIFAR-100 (the paper's 20-Split protocol) --------------------------------
# The official archive, its md5 and what it unpacks to (Krizhevsky's page).
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR100_ARCHIVE = "cifar-100-python.tar.gz"
CIFAR100_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
CIFAR100_FOLDER = "cifar-100-python"
CIFAR100_FILES = ("train", "test", "meta")
CIFAR100_CLASSES = 100
CIFAR100_CLASSES_PER_TASK = 5                     # the paper: 20 tasks x 5
# Per-channel (R, G, B) mean and std of the training images in 0..255 units,
# the values the authors' code uses (they are usually written as x/255).
CIFAR100_MEAN = (125.3, 123.0, 113.9)
CIFAR100_STD = (63.0, 62.1, 66.7)

# --- glyphs (our synthetic stand-in for the report's ImageData) -------------
GLYPH_SIZE = 20                   # ImageData's images are 20x20 grayscale
GLYPH_CLASSES = 75                # 15 tasks x 5; ImageData has 74 (+1 phantom)
GLYPH_CLASSES_PER_TASK = 5        # the report's 15 tasks of 5 classes
GLYPH_TRAIN_PER_CLASS = 280       # -> 1190 train + 210 validation per task
GLYPH_TEST_PER_CLASS = 80         # -> 400 test images per task
GLYPH_DATASET_SEED = 2021         # fixes the drawings and views (see below)
# Our choices, tuned by eye and by a quick training run (see load_glyphs):
GLYPH_TEMPLATE = 48               # drawings are rendered once at 48x48 ...
GLYPH_EXTENT = 1.2                # ... over [-1.2, 1.2]^2; the image is [-1, 1]^2
GLYPH_STROKE_WIDTH = 0.07         # Gaussian profile of a line (0.1 = 1 pixel)
GLYPH_DOT_WIDTH = 0.11            # dots are a bit fatter than lines
GLYPH_ROTATION = 0.4              # radians (about 23 degrees), either way
GLYPH_SCALE = (0.8, 1.15)
GLYPH_SHEAR = 0.35                # ImageData shears up to 1.0; ours are milder
GLYPH_SHIFT = 0.15                # 1.5 pixels
GLYPH_NOISE = 0.15                # std of the additive Gaussian pixel noise

# --- npz (a user's own images) ----------------------------------------------
NPZ_FILE = "tasks.npz"            # looked for in data_dir when no path= given
NPZ_CLASSES_PER_TASK = 2          # our choice: Split-MNIST's 5 tasks x 2
# The largest image side accepted. The networks have no stride and keep most of
# the resolution, so memory grows with the image area: at 256 x 256 the KB's
# first block alone holds 64 x 253 x 253 floats per image, 2 GB for a batch of
# 128 (4096 x 4096 images would need tens of GB before training starts).
NPZ_MAX_SIDE = 256

# --- ImageData (the report's dataset, rebuilt from the course's glyph PNGs) --
# The course's archive of 88 source PNGs and its sha256; the recipe that turns
# them into the dataset is in shared/data/README.md (see build_imagedata_arrays).
IMAGEDATA_ARCHIVE = "images_rotate.zip"
IMAGEDATA_URL = ("https://github.com/gmshroff/metaLearning2022/raw/main/"
                 "data/images_rotate.zip")
IMAGEDATA_SHA256 = "691ef3f33a7017692c5abe8f7107b3bd12498c3a14609a2fa67e2ae94e7355b6"

# Bump when the code below changes what it builds in a way the recipe
# description (imagedata_recipe) does not already capture: the cache follows.
IMAGEDATA_RECIPE_VERSION = "1"
IMAGEDATA_SIZE = 20                       # glyphs are resized to 20x20 (README)
IMAGEDATA_CLASSES_PER_TASK = 5            # the report: 14 tasks of 5 and one of 4
# Rotations that look like another class (README). The course's list also meant
# to drop "180delta" and "270delta", but a missing comma between them made
# Python concatenate the two strings into "180delta270delta", which names no
# file: both stayed. We keep them too, so 88 - 14 = 74 classes, as the report.
IMAGEDATA_DROPPED = ("90circle", "180circle", "270circle",
                     "90square", "180square", "270square",
                     "0delta", "90delta",
                     "180theta", "270theta",
                     "180x", "270x",
                     "180z", "270z")
IMAGEDATA_SHEAR_VALUES = tuple(k / 10 for k in range(-10, 11))   # a, b in {-1.0, -0.9, ..., 1.0}
IMAGEDATA_TEST_FRACTION = 0.25
# The train/test split is part of the dataset, like CIFAR's official split: one
# fixed seed, so every run tests on the same images; the run's seed draws the
# class order and the validation images (as for 20-Split CIFAR-100).
IMAGEDATA_SPLIT_SEED = 0

IMAGEDATA_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# (bit depth, colour type) -> channels, for the flavours the archive uses:
# 1-bit grayscale (64 files), 8-bit grayscale (the 8 "-flip" files), 8-bit RGB (16).
IMAGEDATA_PNG_FLAVOURS = {(1, 0): 1, (8, 0): 1, (8, 2): 3}
IMAGEDATA_PNG_COLOUR_TYPES = {0: "grayscale", 2: "RGB", 3: "palette",
                              4: "grayscale+alpha", 6: "RGB+alpha"}

# --- MarketCL (report, section 8): minute bars of stocks ---------------------
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
# folder per seed, so streams of different seeds never mix).
MARKET_SYNTHETIC_FOLDER = "market-synthetic-seed{seed}"


def default_data_dir() -> Path:
    return Path(os.environ.get(DATA_DIR_ENV, "data"))


class DataError(Exception):
    """A problem with the input data, with a message that says how to fix it."""


# ---------------------------------------------------------------------------
# The task container
# ---------------------------------------------------------------------------

@dataclass(eq=False)      # eq=False: == on tensors gives a tensor, not a bool
class Sequences:
    """A batch of variable-length sequences, zero-padded to one length L.

    x: float32 (N, L, F), row i valid in x[i, :lengths[i]], zeros after.
    lengths: int64 (N,), each in 1..L, on the same device as x.

    It indexes like the tensors of a Split do, so Split.subset, Split.batches
    and a model's evaluation loop treat images and sequences alike:
    seqs[index] (a LongTensor, bool mask or slice over N) and seqs.split(chunk)
    keep every row's x and length together.
    """
    x: torch.Tensor
    lengths: torch.Tensor

    def __post_init__(self):
        if self.x.dim() != 3 or self.lengths.shape != self.x.shape[:1]:
            raise ValueError(f"Sequences need x (N, L, F) and lengths (N,), got "
                             f"x {tuple(self.x.shape)} and lengths {tuple(self.lengths.shape)}")

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, index) -> "Sequences":
        return Sequences(self.x[index], self.lengths[index])

    def split(self, chunk) -> tuple["Sequences", ...]:
        """Consecutive pieces of `chunk` rows each (the last may be shorter), as Tensor.split."""
        return tuple(Sequences(x, lengths) for x, lengths
                     in zip(self.x.split(chunk), self.lengths.split(chunk)))

    def to(self, device) -> "Sequences":
        return Sequences(self.x.to(device), self.lengths.to(device))

    @property
    def shape(self) -> torch.Size:          # (N, L, F), the padded x's
        return self.x.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.x.dtype

    @property
    def device(self) -> torch.device:
        return self.x.device

    @property
    def is_cuda(self) -> bool:
        return self.x.is_cuda

    def __repr__(self) -> str:
        return f"Sequences(x={tuple(self.x.shape)} {self.x.dtype}, device={self.x.device})"


def batch_indices(n: int, batch_size: int, generator: torch.Generator | None, device):
    """A shuffled pass over range(n), as index tensors of batch_size on `device`.

    The permutation is drawn on the generator's device (CPU if None) and moved
    once; indexing then happens on the data's device, no host round trip per
    batch. The training loops of mark_min.py use this too.
    """
    gen_device = generator.device if generator is not None else "cpu"
    order = torch.randperm(n, generator=generator, device=gen_device).to(device)
    return order.split(batch_size) if n else ()      # no batch at all for an empty split


@dataclass
class Split:
    """One split (train, validation or test) of one task.

    x: float32 (N, C, H, W) normalised images, or Sequences of (N, L, F)
       zero-padded sequences with their lengths (MarketCL).
    y: int64 (N,) labels in 0..k-1, or (N, n_labels) for multi-label data.
    """
    x: torch.Tensor | Sequences
    y: torch.Tensor

    def __len__(self) -> int:
        return self.y.shape[0]

    def __repr__(self) -> str:   # shapes, not thousands of numbers
        return (f"Split(x={tuple(self.x.shape)} {self.x.dtype}, "
                f"y={tuple(self.y.shape)}, device={self.x.device})")

    def to(self, device) -> "Split":
        return Split(self.x.to(device), self.y.to(device))

    def subset(self, index: torch.Tensor) -> "Split":
        """Rows `index` (a LongTensor on the split's device) as a new Split."""
        return Split(self.x[index], self.y[index])

    def batches(self, batch_size: int, generator: torch.Generator | None = None,
                shuffle: bool = True):
        """Yield mini-batches as Splits.

        The order comes from `generator` (an explicit torch.Generator, so a run
        is reproducible and resumable); shuffle=False keeps the stored order.
        The permutation is drawn on the generator's device and indexing happens
        on the data's device: no host round trip per batch.
        """
        if shuffle:
            parts = batch_indices(len(self), batch_size, generator, self.y.device)
        else:
            parts = torch.arange(len(self), device=self.y.device).split(batch_size) if len(self) else ()
        for index in parts:
            yield self.subset(index)


@dataclass
class Task:
    """One task of the stream: its index, its classes and its three splits."""
    index: int
    class_ids: list[int]          # original class ids in the source dataset
    class_names: list[str]        # human-readable names, same order
    train: Split
    val: Split
    test: Split
    meta: dict = field(default_factory=dict)   # dataset-specific extras

    @property
    def num_classes(self) -> int:
        return len(self.class_ids)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input: (C, H, W) for images, (L, F) for sequences."""
        return tuple(self.train.x.shape[1:])

    def to(self, device) -> "Task":
        return Task(self.index, self.class_ids, self.class_names,
                    self.train.to(device), self.val.to(device),
                    self.test.to(device), self.meta)

    def __repr__(self) -> str:
        return (f"Task({self.index}, classes={self.class_names}, "
                f"train={len(self.train)}, val={len(self.val)}, "
                f"test={len(self.test)}, input={self.input_shape})")


# ---------------------------------------------------------------------------
# The one entry point
# ---------------------------------------------------------------------------

def load_tasks(dataset: str, *, data_dir=None, seed: int = 0,
               num_tasks: int | None = None,
               classes_per_task: int | None = None, device="cpu",
               val_fraction: float = VAL_FRACTION, **kwargs) -> list[Task]:
    """The task stream of `dataset`, on `device`.

    seed: draws the class order and the validation rows (same seed, same
        stream). num_tasks=N keeps the first N tasks of the full stream (the
        same classes, in the same order, as without num_tasks).
    classes_per_task: default 5 for cifar100, glyphs and imagedata, 2 for npz.
    kwargs: dataset-specific options; npz takes path=FILE.

    MarketCL is not here: it is a stream of days, not a list of tasks (see
    load_market).
    """
    data_dir = default_data_dir() if data_dir is None else Path(data_dir)
    common = dict(seed=seed, num_tasks=num_tasks, val_fraction=val_fraction)
    if dataset == "cifar100":
        tasks = load_cifar100(
            data_dir, classes_per_task=classes_per_task or CIFAR100_CLASSES_PER_TASK,
            **common, **kwargs)
    elif dataset == "glyphs":
        tasks = load_glyphs(
            classes_per_task=classes_per_task or GLYPH_CLASSES_PER_TASK,
            **common, **kwargs)
    elif dataset == "imagedata":
        tasks = load_imagedata(
            data_dir, classes_per_task=classes_per_task or IMAGEDATA_CLASSES_PER_TASK,
            **common, **kwargs)
    elif dataset == "npz":
        tasks = load_npz(
            data_dir, classes_per_task=classes_per_task or NPZ_CLASSES_PER_TASK,
            **common, **kwargs)
    elif dataset in ("market", "market-synthetic"):
        raise DataError(f"{dataset} is a stream of days, not a list of tasks: "
                        "use load_market(source, seed=...) -> MarketStream")
    else:
        raise DataError(f"unknown dataset {dataset!r}; "
                        "choose one of: cifar100, glyphs, imagedata, npz")
    # Move everything once; training loops then never copy data again.
    return [task.to(device) for task in tasks]


def make_tasks(dataset: str, x_train: np.ndarray, y_train: np.ndarray,
               x_test: np.ndarray, y_test: np.ndarray, class_names, mean, std,
               *, seed: int, num_tasks: int | None, classes_per_task: int,
               val_fraction: float, allow_short_last_task: bool = False) -> list[Task]:
    """Cut a classification dataset into a stream of tasks (all datasets).

    x_train, x_test: (N, C, H, W) images in their raw units (uint8 0..255 or
        float); converted to float32 one task at a time, so a 60,000-image
        uint8 dataset never exists twice in float32.
    y_train, y_test: (N,) int64 original class ids; class_names[id] names one.
    mean, std: (C,) per-channel statistics in the same raw units. Normalising
        raw pixels with raw-unit statistics, (x - mean) / std, is the same as
        scaling to [0, 1] first and using mean/255 and std/255.

    The class order is numpy's RandomState(seed).permutation of the class ids
    present in the training data; task t gets classes
    order[t*k : (t+1)*k], labelled 0..k-1 in that order. The same RandomState
    then shuffles each class's training rows, task after task, and the first
    round(val_fraction * n) of them become validation (half rounds up).
    Drawing in task order keeps the first N tasks identical for any num_tasks.
    Rows inside a split are grouped by class; Split.batches shuffles them.

    A class count that classes_per_task does not divide is refused, unless
    allow_short_last_task: then the last task holds the remaining classes
    (ImageData: 74 = 14 x 5 + 4, the report's split, with no phantom class:
    DEVIATION 8, the report's code reserved 75 classes for 74).
    Only a dataset whose published split is ragged should opt in; for others a
    short task would be an accident of the data.
    """
    classes = np.unique(y_train)                       # sorted original ids
    if len(classes) % classes_per_task and not allow_short_last_task:
        raise DataError(
            f"{dataset}: {len(classes)} classes do not divide into tasks of "
            f"{classes_per_task}; pass a classes_per_task that divides "
            f"{len(classes)} (or drop classes from the data)")
    total_tasks = math.ceil(len(classes) / classes_per_task)
    if num_tasks is None:
        num_tasks = total_tasks
    if not 1 <= num_tasks <= total_tasks:
        raise DataError(f"{dataset}: num_tasks must be between 1 and "
                        f"{total_tasks}, got {num_tasks}")
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")

    rng = np.random.RandomState(seed)
    order = classes[rng.permutation(len(classes))]     # (n_classes,)
    train_rows = _rows_by_class(y_train)               # {class id: row indices}
    test_rows = _rows_by_class(y_test)
    no_rows = np.zeros(0, dtype=np.int64)
    # (1, C, 1, 1) so that they broadcast over (N, C, H, W)
    mean = np.asarray(mean, dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(std, dtype=np.float32).reshape(1, -1, 1, 1)

    tasks = []
    for t in range(num_tasks):
        ids = order[t * classes_per_task:(t + 1) * classes_per_task]
        train, val, test = [], [], []          # lists of (rows, task label)
        for label, c in enumerate(ids):
            rows = train_rows[c][rng.permutation(len(train_rows[c]))]
            n_val = int(np.floor(val_fraction * len(rows) + 0.5))
            val.append((rows[:n_val], label))
            train.append((rows[n_val:], label))
            test.append((test_rows.get(c, no_rows), label))
        if not any(len(rows) for rows, _ in test):
            raise DataError(f"{dataset}: task {t + 1} (classes "
                            f"{', '.join(str(class_names[c]) for c in ids)}) has no test image; every "
                            "task is tested after it trains: add test images of its classes")
        tasks.append(Task(
            index=t, class_ids=[int(c) for c in ids],
            class_names=[str(class_names[c]) for c in ids],
            train=_split(x_train, train, mean, std),
            val=_split(x_train, val, mean, std),
            test=_split(x_test, test, mean, std),
            meta={"dataset": dataset}))
    return tasks


def _rows_by_class(y: np.ndarray) -> dict[int, np.ndarray]:
    """{class id: indices of its rows, in dataset order}, by one stable sort."""
    order = np.argsort(y, kind="stable")
    ids, starts = np.unique(y[order], return_index=True)
    return dict(zip(ids.tolist(), np.split(order, starts[1:])))


def _split(x: np.ndarray, parts, mean: np.ndarray, std: np.ndarray) -> Split:
    """Gather rows of `x` into a normalised float32 Split; parts = [(rows, label)].

    mean, std: float32 (1, C, 1, 1). The normalisation runs in numpy, in
    place, before the one conversion to torch: torch's small elementwise ops
    start a thread pool each and crawl when other processes hold the cores.
    """
    rows = np.concatenate([r for r, _ in parts])
    y = np.concatenate([np.full(len(r), label, dtype=np.int64) for r, label in parts])
    images = x[rows].astype(np.float32, copy=False)          # (n, C, H, W), a fresh copy
    images -= mean
    images /= std
    return Split(torch.from_numpy(images), torch.from_numpy(y))


# ---------------------------------------------------------------------------
# Files: checked downloads and atomic writes (cifar100 and imagedata)
# ---------------------------------------------------------------------------

def _fetch(url: str, target: Path, *, algorithm: str, expected: str, hint: str) -> Path:
    """`target`, downloaded from `url` first if it is missing, with the checksum
    `expected` (hashlib's `algorithm`, e.g. "md5" or "sha256").

    A file already there is checked too: a wrong one (truncated, or another
    file under the same name) is refused, never used. `hint` ends every
    message: where to get the file by hand and where to put it.
    """
    if not target.is_file():
        _download(url, target, algorithm=algorithm, expected=expected, hint=hint)
        return target
    got = _file_digest(target, algorithm)
    if got != expected:
        raise DataError(f"{target} has {algorithm} {got}, not the expected {expected}: "
                        "it is incomplete or not the official file, so it was not used. "
                        f"Delete it. {hint}")
    return target


def _download(url: str, target: Path, *, algorithm: str, expected: str, hint: str) -> None:
    """Fetch url into target with progress on stderr, hashing as it arrives.

    The file appears under its name only complete and with the expected
    checksum (_atomic_write): an interrupted or wrong download leaves nothing
    that could later pass for the real file.
    """
    print(f"downloading {url}", file=sys.stderr)
    digest = hashlib.new(algorithm)
    try:
        with urllib.request.urlopen(url, timeout=30) as response, _atomic_write(target) as out:
            total = int(response.headers.get("Content-Length") or 0)
            done = 0
            while chunk := response.read(1 << 20):
                out.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                of_total = f" of {total / 1e6:.1f}" if total else ""
                print(f"\r  {target.name}: {done / 1e6:.1f}{of_total} MB",
                      end="", file=sys.stderr, flush=True)
            print(file=sys.stderr)
            if digest.hexdigest() != expected:      # raised inside: nothing is kept
                raise DataError(f"the download of {url} has {algorithm} "
                                f"{digest.hexdigest()}, not the expected {expected}; "
                                f"nothing was kept. {hint}")
    except OSError as err:       # URLError (offline, refused), timeout, HTTP error, disk full
        reason = getattr(err, "reason", err)
        raise DataError(f"{target.name} is not in {target.parent.resolve()} and could "
                        f"not be downloaded ({reason}). {hint}") from None


def _file_digest(path: Path, algorithm: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()


@contextlib.contextmanager
def _atomic_write(path: Path):
    """A binary file object that becomes `path` only if the block completes.

    It is written under a temporary name in the same folder, then renamed
    (atomic on one file system); on an exception the temporary file is
    removed. A reader never sees a half-written archive or cache.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        with open(temporary, "wb") as f:
            yield f
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise

# ---------------------------------------------------------------------------
# 20-Split CIFAR-100
# ---------------------------------------------------------------------------

def load_cifar100(data_dir: Path, *, seed: int, num_tasks: int | None,
                  classes_per_task: int, val_fraction: float) -> list[Task]:
    """20-Split CIFAR-100: 20 tasks of 5 classes, 2125 / 375 / 500 images each.

    Finds the data (unpacked folder, else official archive, else download),
    reads the three pickles safely and hands them to make_tasks. With seed s
    the class order is numpy's RandomState(s).permutation(100). No
    augmentation (the authors used none).
    """
    folder = find_cifar100(data_dir)
    train = _load_pickle(folder / "train")
    test = _load_pickle(folder / "test")
    meta = _load_pickle(folder / "meta")
    x_train, y_train = _cifar_arrays(train, folder / "train")
    x_test, y_test = _cifar_arrays(test, folder / "test")
    names = meta.get(b"fine_label_names") if isinstance(meta, dict) else None
    if not isinstance(names, list) or len(names) != CIFAR100_CLASSES:
        raise DataError(f"{folder / 'meta'} has no list of {CIFAR100_CLASSES} "
                        f"b'fine_label_names'; {_refetch_hint(data_dir)}")
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    return make_tasks("cifar100", x_train, y_train, x_test, y_test, names,
                      CIFAR100_MEAN, CIFAR100_STD, seed=seed,
                      num_tasks=num_tasks, classes_per_task=classes_per_task,
                      val_fraction=val_fraction)


def _cifar_arrays(d, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A CIFAR pickle's dict -> uint8 images (N, 3, 32, 32), int64 labels (N,)."""
    data = d.get(b"data") if isinstance(d, dict) else None
    labels = d.get(b"fine_labels") if isinstance(d, dict) else None
    if (not isinstance(data, np.ndarray) or data.dtype != np.uint8
            or data.ndim != 2 or data.shape[1] != 3 * 32 * 32
            or not isinstance(labels, list) or len(labels) != len(data)):
        raise DataError(f"{path} is not a CIFAR-100 batch (expected b'data' "
                        "uint8 (N, 3072) and a list b'fine_labels' of N ids); "
                        f"{_refetch_hint(path.parent.parent)}")
    y = np.asarray(labels, dtype=np.int64)
    if len(y) and (y.min() < 0 or y.max() >= CIFAR100_CLASSES):
        raise DataError(f"{path}: fine labels outside 0..99; "
                        f"{_refetch_hint(path.parent.parent)}")
    # Each row is channel-major: 1024 red, 1024 green, 1024 blue values,
    # each a row-major 32x32 plane. (N, 3072) -> (N, 3, 32, 32), no copy.
    return data.reshape(-1, 3, 32, 32), y


def find_cifar100(data_dir: Path) -> Path:
    """The folder holding train/test/meta, unpacking or downloading if needed.

    1. <data_dir>/cifar-100-python/ already unpacked: used as it is (no md5:
       a locally rebuilt copy is fine).
    2. <data_dir>/cifar-100-python.tar.gz: md5 checked, then unpacked safely.
    3. Otherwise downloaded from CIFAR100_URL, then as in 2.
    """
    folder = data_dir / CIFAR100_FOLDER
    if folder.is_dir():
        missing = [f for f in CIFAR100_FILES if not (folder / f).is_file()]
        if missing:
            raise DataError(f"{folder} lacks {', '.join(missing)}; delete the "
                            f"folder and try again. {_refetch_hint(data_dir)}")
        return folder
    archive = _fetch(CIFAR100_URL, data_dir / CIFAR100_ARCHIVE, algorithm="md5",
                     expected=CIFAR100_MD5, hint=_refetch_hint(data_dir))
    _unpack_cifar100(archive, data_dir)
    return folder


def _refetch_hint(data_dir: Path) -> str:
    """Where to get CIFAR-100 by hand and where to put it."""
    return (f"Download {CIFAR100_URL} (md5 {CIFAR100_MD5}) on a machine with "
            f"internet access and put {CIFAR100_ARCHIVE} into "
            f"{Path(data_dir).resolve()}/ (or unpack it there, so that "
            f"{CIFAR100_FOLDER}/ holds train, test and meta).")


def _unpack_cifar100(archive: Path, data_dir: Path) -> None:
    """Unpack cifar-100-python/{train,test,meta} and nothing else.

    Every member is checked before anything is written: a member that would
    land outside cifar-100-python/ (absolute path, '..', anything outside the
    folder) or that is not a plain file or folder (symlink, hard link, device)
    is refused. Other files inside the folder (the official archive carries an
    editor backup, file.txt~) are skipped. The files are written into
    cifar-100-python.partial/ and renamed at the end, so an interrupted unpack
    never looks finished.
    """
    wanted = {f"{CIFAR100_FOLDER}/{name}": name for name in CIFAR100_FILES}
    found = {}
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar.getmembers():
            path = PurePosixPath(member.name)
            parts = [p for p in path.parts if p != "."]
            inside = (not path.is_absolute() and ".." not in parts
                      and parts[:1] == [CIFAR100_FOLDER])
            if not inside or not (member.isfile() or member.isdir()):
                raise DataError(
                    f"refusing to unpack {archive}: member {member.name!r} would "
                    f"land outside {CIFAR100_FOLDER}/ or is a link. This is not "
                    f"the official archive. {_refetch_hint(data_dir)}")
            if member.isfile() and "/".join(parts) in wanted:
                found[wanted["/".join(parts)]] = member
        missing = [name for name in CIFAR100_FILES if name not in found]
        if missing:
            raise DataError(f"{archive} lacks {CIFAR100_FOLDER}/"
                            f"{', '.join(missing)}. {_refetch_hint(data_dir)}")
        partial = data_dir / (CIFAR100_FOLDER + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        for name, member in found.items():
            with tar.extractfile(member) as src, open(partial / name, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    partial.rename(data_dir / CIFAR100_FOLDER)


# A pickle can run any function while loading (its __reduce__ names one). The
# CIFAR files need exactly three globals, all of them to rebuild the b'data'
# array (checked with pickletools on the files): numpy's _reconstruct, ndarray
# and dtype. The rest is lists, dicts, bytes and ints, which need none.
# numpy 1 pickles _reconstruct as numpy.core.multiarray (the official files),
# numpy 2 as numpy._core.multiarray; both names map to the same function.
try:
    from numpy._core.multiarray import _reconstruct
except ImportError:                                    # numpy 1.x
    from numpy.core.multiarray import _reconstruct
_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _CifarUnpickler(pickle.Unpickler):
    """An Unpickler that can build numpy arrays and calls nothing else."""

    def find_class(self, module, name):
        if (module, name) in _PICKLE_GLOBALS:
            return _PICKLE_GLOBALS[(module, name)]
        raise DataError(f"refusing to load {self.path}: it asks for "
                        f"{module}.{name}, which no CIFAR-100 file needs; it may "
                        "have been tampered with. Delete it and fetch CIFAR-100 "
                        f"again ({CIFAR100_URL}, md5 {CIFAR100_MD5}).")


def _load_pickle(path: Path):
    with open(path, "rb") as f:
        unpickler = _CifarUnpickler(f, encoding="bytes")
        unpickler.path = path
        try:
            return unpickler.load()
        except DataError:
            raise
        except Exception as err:   # truncated or garbled file
            raise DataError(f"cannot read {path} ({err}); delete "
                            f"{path.parent} and fetch CIFAR-100 again "
                            f"({CIFAR100_URL}, md5 {CIFAR100_MD5}).") from None


# ---------------------------------------------------------------------------
# glyphs: a synthetic stand-in for the report's ImageData
# ---------------------------------------------------------------------------

def load_glyphs(*, seed: int, num_tasks: int | None, classes_per_task: int,
                val_fraction: float) -> list[Task]:
    """Synthetic glyphs: 75 classes of 20x20 grayscale drawings, 15 tasks of 5.

    SYNTHETIC: this is NOT the report's ImageData (which is built from 74
    letter and shape images with 441 shears each). It imitates its character,
    a few strokes seen under affine distortions, so that the default run needs
    no files. Its accuracies are not comparable to the report's table.

    Each class is one fixed random drawing (1-4 items: straight strokes, arcs,
    dots) rendered once at 48x48. Each image views it under a random rotation
    (+-23 degrees), scale (0.8-1.15), shear (+-0.35 on both axes) and shift
    (+-1.5 pixels), sampled bilinearly to 20x20, plus Gaussian noise (std
    0.15 on a 0..1 stroke scale). 280 training and 80 test images per class:
    1190 train / 210 validation / 400 test per task.

    The drawings and views come from GLYPH_DATASET_SEED, so every run sees the
    same dataset, as it would with a downloaded one; `seed` chooses the class
    order and the validation rows, as for CIFAR-100. Normalisation: the mean
    and std of all 75 classes' training images (one channel).

    Measured on 2 CPU cores: generating all 75 classes takes ~2 s. A small
    CNN (conv 1->32 k4, conv 32->64 k3, linear 576->128, one 5-way head per
    task) reaches 94% test accuracy on task 0 after one epoch and 99-100%
    after five. Trained task after task with no protection (SGD, lr 0.1,
    momentum 0.9, weight decay 0.01 as in the authors' code, 10 epochs per
    task), its task-0 accuracy falls from 98% to 27-40% within 4-5 tasks:
    hard enough to show forgetting, easy enough to learn quickly.
    """
    images, labels = [], []
    for c in range(GLYPH_CLASSES):
        # one generator per class: the class's drawing and its views
        rng = np.random.default_rng([GLYPH_DATASET_SEED, c])
        n = GLYPH_TRAIN_PER_CLASS + GLYPH_TEST_PER_CLASS
        images.append(_glyph_views(_glyph_template(rng), n, rng))  # (n, 20, 20)
        labels.append(np.full(n, c, dtype=np.int64))
    x = np.stack(images)[:, :, None]          # (75, n, 1, 20, 20)
    y = np.stack(labels)                      # (75, n)
    split = GLYPH_TRAIN_PER_CLASS
    x_train, y_train = x[:, :split].reshape(-1, 1, GLYPH_SIZE, GLYPH_SIZE), y[:, :split].ravel()
    x_test, y_test = x[:, split:].reshape(-1, 1, GLYPH_SIZE, GLYPH_SIZE), y[:, split:].ravel()
    names = [f"glyph{c:02d}" for c in range(GLYPH_CLASSES)]
    mean, std = [x_train.mean(dtype=np.float64)], [x_train.std(dtype=np.float64)]
    return make_tasks("glyphs", x_train, y_train, x_test, y_test, names,
                      mean, std, seed=seed, num_tasks=num_tasks,
                      classes_per_task=classes_per_task, val_fraction=val_fraction)


def _glyph_template(rng: np.random.Generator) -> np.ndarray:
    """One class's drawing as a (48, 48) float image, strokes ~1, background 0.

    Every item is a set of line segments (an arc is 12 short ones, a dot one
    of length zero). A pixel's brightness is exp(-d^2 / (2 w^2)) for its
    distance d to the nearest segment: a soft, anti-aliased line of width w.
    """
    starts, ends, widths = [], [], []
    for kind in rng.choice(["stroke", "arc", "dot"], size=rng.integers(2, 5),
                           p=[0.45, 0.35, 0.2]):
        if kind == "stroke":
            starts.append(rng.uniform(-0.7, 0.7, 2))
            ends.append(rng.uniform(-0.7, 0.7, 2))
            widths.append(GLYPH_STROKE_WIDTH)
        elif kind == "arc":
            centre = rng.uniform(-0.3, 0.3, 2)
            radius = rng.uniform(0.25, 0.55)
            angle = rng.uniform(0, 2 * np.pi) + rng.uniform(0.5, 1.8) * np.pi * np.linspace(0, 1, 13)
            points = centre + radius * np.stack([np.cos(angle), np.sin(angle)], 1)  # (13, 2)
            starts += list(points[:-1])
            ends += list(points[1:])
            widths += [GLYPH_STROKE_WIDTH] * 12
        else:
            starts.append(rng.uniform(-0.6, 0.6, 2))
            ends.append(starts[-1])
            widths.append(GLYPH_DOT_WIDTH)
    a, b, w = np.array(starts), np.array(ends), np.array(widths)   # (S, 2), (S, 2), (S,)
    p = _grid(GLYPH_TEMPLATE, GLYPH_EXTENT)                        # (P, 2), P = 48*48
    # Distance from every pixel to every segment a + t (b - a), t in [0, 1].
    ab = b - a                                                     # (S, 2)
    rel = p[:, None, :] - a                                        # (P, S, 2)
    t = np.clip((rel * ab).sum(-1) / np.maximum((ab ** 2).sum(-1), 1e-12), 0, 1)  # (P, S)
    d2 = ((rel - t[..., None] * ab) ** 2).sum(-1)                  # (P, S)
    return np.exp(-0.5 * d2 / w ** 2).max(-1).reshape(GLYPH_TEMPLATE, GLYPH_TEMPLATE)


def _glyph_views(template: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n random affine views of a template, (n, 20, 20) float32.

    An output pixel p (in [-1, 1]^2) shows the template at A^-1 (p - shift),
    A = scale * rotation @ shear: the glyph is sheared, rotated, scaled and
    shifted. The template is sampled bilinearly; outside it is 0.
    """
    angle = rng.uniform(-GLYPH_ROTATION, GLYPH_ROTATION, n)
    scale = rng.uniform(*GLYPH_SCALE, n)
    shear = rng.uniform(-GLYPH_SHEAR, GLYPH_SHEAR, (n, 2))
    shift = rng.uniform(-GLYPH_SHIFT, GLYPH_SHIFT, (n, 2))
    cos, sin = np.cos(angle), np.sin(angle)
    rotation = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], 1)  # (n, 2, 2)
    shearing = np.ones((n, 2, 2))
    shearing[:, 0, 1], shearing[:, 1, 0] = shear[:, 0], shear[:, 1]
    inv = np.linalg.inv(scale[:, None, None] * rotation @ shearing)      # (n, 2, 2)
    p = _grid(GLYPH_SIZE, 1.0)                                           # (400, 2)
    dx = p[None, :, 0] - shift[:, :1]                                    # (n, 400)
    dy = p[None, :, 1] - shift[:, 1:]
    qx = inv[:, 0, :1] * dx + inv[:, 0, 1:] * dy                         # (n, 400)
    qy = inv[:, 1, :1] * dx + inv[:, 1, 1:] * dy
    # template coordinates (column u, row v) in pixels
    u = (qx / GLYPH_EXTENT + 1) * GLYPH_TEMPLATE / 2 - 0.5               # (n, 400)
    v = (qy / GLYPH_EXTENT + 1) * GLYPH_TEMPLATE / 2 - 0.5
    u0, v0 = np.floor(u).astype(np.int64), np.floor(v).astype(np.int64)
    fu, fv = u - u0, v - v0
    # Bilinear interpolation between the 4 template pixels around (u, v). The
    # template gets a zero border; indices outside are clipped into it.
    padded = np.pad(template, 1)                                         # (50, 50)
    last = GLYPH_TEMPLATE + 1
    r0, r1 = np.clip(v0 + 1, 0, last), np.clip(v0 + 2, 0, last)          # (n, 400)
    c0, c1 = np.clip(u0 + 1, 0, last), np.clip(u0 + 2, 0, last)
    image = (padded[r0, c0] * (1 - fu) * (1 - fv) + padded[r0, c1] * fu * (1 - fv)
             + padded[r1, c0] * (1 - fu) * fv + padded[r1, c1] * fu * fv)
    image = image + rng.normal(0, GLYPH_NOISE, image.shape)
    return image.reshape(n, GLYPH_SIZE, GLYPH_SIZE).astype(np.float32)


def _grid(size: int, extent: float) -> np.ndarray:
    """(size*size, 2) pixel centres (x, y) of a size x size image over [-extent, extent]^2."""
    c = ((np.arange(size) + 0.5) / size * 2 - 1) * extent
    row, col = np.meshgrid(c, c, indexing="ij")
    return np.stack([col.ravel(), row.ravel()], 1)


# ---------------------------------------------------------------------------
# npz: a user's own images
# ---------------------------------------------------------------------------

def load_npz(data_dir: Path, *, seed: int, num_tasks: int | None,
             classes_per_task: int, val_fraction: float,
             path=None) -> list[Task]:
    """Your own images from one .npz file, split into tasks by class.

        np.savez("my.npz", x_train=..., y_train=..., x_test=..., y_test=...,
                 class_names=np.array(["cat", "dog", ...]))   # optional
        load_tasks("npz", path="my.npz", classes_per_task=2)
        python data.py --dataset npz --path my.npz

    path: the file; without it, <data_dir>/tasks.npz.
    Images: (N, H, W) grayscale, or 4-d with 1 or 3 channels. A 4-d array is
        channels-first (N, C, H, W) when axis 1 has size 1 or 3, otherwise
        channels-last (N, H, W, C) when the last axis has size 1 or 3.
        At most NPZ_MAX_SIDE (256) px on a side. uint8 (0..255) or float
        (finite in float32). Normalised per channel with the mean and std
        of x_train (a uint8 image's /255 cancels out in that normalisation).
    Labels: non-negative integers, any ids (they need not be 0..K-1); every
        test class must occur in training. class_names[id] names class id.
    Tasks: a seeded permutation of the training classes in groups of
        classes_per_task (default 2), which must divide the number of classes.
    """
    path = Path(path) if path is not None else data_dir / NPZ_FILE
    if path.is_dir():
        raise DataError(f"{path} is a folder; pass the .npz file itself (--path FILE.npz)")
    if not path.is_file():
        raise DataError(f"{path} not found; pass path=FILE (--path FILE) or "
                        f"put your data at {data_dir / NPZ_FILE}")
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] != b"PK":          # an .npz is a zip archive; np.load would try it as a pickle
        raise DataError(f"{path} is not an .npz file (an .npz is a zip archive; this file starts "
                        f"with {head!r}); write it with np.savez(path, x_train=..., y_train=..., "
                        "x_test=..., y_test=...)")
    try:
        with np.load(path, allow_pickle=False) as f:   # no pickles: no code
            arrays = {key: f[key] for key in f.files}
    except ValueError as err:
        raise DataError(f"{path}: {err}. Save names as np.array(names, dtype=str), "
                        "not as Python objects.") from None
    except Exception as err:
        raise DataError(f"cannot read {path} as .npz ({err}); write it with "
                        "np.savez(path, x_train=..., y_train=..., x_test=..., "
                        "y_test=...)") from None
    required = ("x_train", "y_train", "x_test", "y_test")
    missing = [key for key in required if key not in arrays]
    if missing:
        raise DataError(f"{path} lacks {', '.join(missing)} (it has "
                        f"{', '.join(sorted(arrays)) or 'nothing'}); save it with "
                        "np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)")
    x_train = _npz_images(arrays["x_train"], "x_train", path)
    x_test = _npz_images(arrays["x_test"], "x_test", path)
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(f"{path}: x_train images are {x_train.shape[1:]} but "
                        f"x_test images are {x_test.shape[1:]} (as C, H, W); "
                        "both must have the same size and channels")
    y_train = _npz_labels(arrays["y_train"], "y_train", len(x_train), "x_train", path)
    y_test = _npz_labels(arrays["y_test"], "y_test", len(x_test), "x_test", path)
    unseen = np.setdiff1d(y_test, y_train)
    if len(unseen):
        raise DataError(f"{path}: y_test has classes {unseen[:10].tolist()} that "
                        "never occur in y_train; a task cannot test a class it "
                        "never trained on. Drop those test images.")
    if "class_names" in arrays:
        names = arrays["class_names"]
        if names.ndim != 1 or len(names) <= y_train.max():
            raise DataError(f"{path}: class_names must be a 1-d array with one "
                            f"name per class id 0..{y_train.max()}, got shape "
                            f"{names.shape}")
        names = [str(n) for n in names]
    else:
        names = {int(c): f"class{c}" for c in np.unique(y_train)}
    # Per-channel statistics of the training images, in their raw units.
    mean = x_train.mean(axis=(0, 2, 3), dtype=np.float64)       # (C,)
    std = x_train.std(axis=(0, 2, 3), dtype=np.float64)         # (C,)
    std[std == 0] = 1.0        # a constant channel: only centre it
    return make_tasks("npz", x_train, y_train, x_test, y_test, names, mean, std,
                      seed=seed, num_tasks=num_tasks,
                      classes_per_task=classes_per_task, val_fraction=val_fraction)


def _npz_images(x: np.ndarray, key: str, path: Path) -> np.ndarray:
    """Images of any accepted layout -> (N, C, H, W), uint8 or float."""
    if x.dtype != np.uint8 and not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"{path}: {key} has dtype {x.dtype}; images must be "
                        "uint8 (0..255) or float (convert with x.astype(np.uint8) "
                        "or x.astype(np.float32))")
    if x.ndim == 3:                                   # (N, H, W) grayscale
        x = x[:, None]
    elif x.ndim == 4 and x.shape[1] in (1, 3):        # (N, C, H, W)
        pass
    elif x.ndim == 4 and x.shape[3] in (1, 3):        # (N, H, W, C)
        x = x.transpose(0, 3, 1, 2)
    else:
        raise DataError(f"{path}: {key} has shape {x.shape}; images must be "
                        "(N, H, W), (N, C, H, W) or (N, H, W, C) with C = 1 or 3")
    if len(x) == 0:
        raise DataError(f"{path}: {key} holds no images")
    if max(x.shape[2:]) > NPZ_MAX_SIDE:
        raise DataError(f"{path}: {key} images are {x.shape[2]}x{x.shape[3]} px, larger than the "
                        f"{NPZ_MAX_SIDE}x{NPZ_MAX_SIDE} accepted: the networks keep most of the "
                        "resolution, so memory grows with the image area. Resize them (CIFAR-100 "
                        "is 32x32)")
    if np.issubdtype(x.dtype, np.floating):
        if not np.isfinite(x).all():
            raise DataError(f"{path}: {key} contains NaN or infinite values")
        largest, float32_max = float(np.abs(x).max()), float(np.finfo(np.float32).max)
        if largest > float32_max:
            raise DataError(f"{path}: {key} has values up to {largest:.3g}, beyond float32 "
                            f"(up to {float32_max:.3g}), in which training computes; "
                            "rescale the images, e.g. to 0..1")
    return x


def _npz_labels(y: np.ndarray, key: str, n: int, x_key: str, path: Path) -> np.ndarray:
    """Labels -> int64 (N,), checking they are whole, non-negative and N long."""
    if y.ndim != 1:
        raise DataError(f"{path}: {key} has shape {y.shape}; labels must be 1-d "
                        "(one class id per image)")
    if len(y) != n:
        raise DataError(f"{path}: {key} has {len(y)} labels but {x_key} has "
                        f"{n} images; they must match one to one")
    if np.issubdtype(y.dtype, np.floating):
        if not (np.isfinite(y).all() and (y == np.round(y)).all()):
            raise DataError(f"{path}: {key} has non-integer labels; labels "
                            "are class ids 0, 1, 2, ...")
    elif not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: {key} has dtype {y.dtype}; labels must be "
                        "integers (class ids 0, 1, 2, ...)")
    if len(y) and y.min() < 0:
        raise DataError(f"{path}: {key} has negative labels (min {y.min()}); "
                        "labels are class ids 0, 1, 2, ...")
    return y.astype(np.int64)


# ---------------------------------------------------------------------------
# ImageData: the course's glyphs, sheared 441 ways
# ---------------------------------------------------------------------------

def load_imagedata(data_dir: Path, *, seed: int, num_tasks: int | None,
                   classes_per_task: int, val_fraction: float) -> list[Task]:
    """ImageData, the report's second dataset, as a task stream.

    20x20 grayscale glyphs (letters, Greek letters, shapes, at 4 rotations,
    each under 441 affine shears), 74 classes. Rebuilt from the course's 88
    source PNGs (images_rotate.zip) with the recipe in shared/data/README.md,
    using nothing but zlib and numpy, and cached in data_dir: the rebuild
    (under a second) runs once, later loads read the cache.

    Cut by make_tasks like every dataset: a seeded class order (numpy
    RandomState(seed)), tasks of `classes_per_task` (74 classes, 5 per task ->
    14 tasks of 5 and a last task of 4: no phantom class), labels 0..k-1,
    `val_fraction` of each class's training images as validation.
    x: float32 (N, 1, 20, 20), y: int64 (N,). Class names read
    "<rotation> <shape>", e.g. "90 delta".

    Normalisation (our choice; the recipe says nothing about it): minus the
    mean, over the std of all training pixels (one channel), as for glyphs.
    """
    arrays = load_imagedata_arrays(data_dir)
    return make_tasks("imagedata", arrays["x_train"][:, None], arrays["y_train"],
                      arrays["x_test"][:, None], arrays["y_test"],   # (N, 1, 20, 20) uint8
                      arrays["class_names"].tolist(),
                      [float(arrays["pixel_mean"])], [float(arrays["pixel_std"])], seed=seed,
                      num_tasks=num_tasks, classes_per_task=classes_per_task,
                      val_fraction=val_fraction, allow_short_last_task=True)


def load_imagedata_arrays(data_dir: Path) -> dict[str, np.ndarray]:
    """The generated dataset (after shear and train/test split), from the cache
    in data_dir, or built from the archive and cached.

    The cache does not depend on the run's seed (see IMAGEDATA_SPLIT_SEED), and
    its name carries a hash of the recipe, so a changed recipe builds anew.
    """
    cache = imagedata_cache_path(data_dir)
    if cache.exists():
        try:
            with np.load(cache) as stored:
                return {key: stored[key] for key in stored.files}
        except (OSError, ValueError, zipfile.BadZipFile) as error:
            raise DataError(f"the ImageData cache {cache} is unreadable ({error}); "
                            f"delete it and it is rebuilt from {IMAGEDATA_ARCHIVE}") from None
    arrays = build_imagedata_arrays(find_imagedata_archive(data_dir))
    with _atomic_write(cache) as f:
        np.savez(f, **arrays)
    return arrays


def imagedata_recipe() -> dict:
    """Everything that decides the generated arrays, for the cache key."""
    return {"version": IMAGEDATA_RECIPE_VERSION,
            "archive_sha256": IMAGEDATA_SHA256,
            "gray": "ITU-R 601-2 luma, PIL fixed point (19595, 38470, 7471) rounded",
            "resize": f"{IMAGEDATA_SIZE}x{IMAGEDATA_SIZE}, PIL BICUBIC a=-0.5, antialiased, 22 bit",
            "dropped": sorted(IMAGEDATA_DROPPED),
            "invert": "255 - v",
            "shear": "nearest, round half up, centre (n-1)/2, zero outside",
            "shear_values": list(IMAGEDATA_SHEAR_VALUES),
            "test_fraction": IMAGEDATA_TEST_FRACTION,
            "test_rounding": "ceil",
            "split_seed": IMAGEDATA_SPLIT_SEED}


def imagedata_cache_path(data_dir: Path) -> Path:
    recipe = json.dumps(imagedata_recipe(), sort_keys=True).encode()
    return Path(data_dir) / f"imagedata_{hashlib.sha256(recipe).hexdigest()[:12]}.npz"


def build_imagedata_arrays(archive: Path) -> dict[str, np.ndarray]:
    """The recipe of shared/data/README.md, from the PNGs to the train/test split.

    Returns x_train, x_test: uint8 (N, 20, 20) white glyphs on black;
    y_train, y_test: int64 class ids; class_names: str (C,);
    pixel_mean, pixel_std: of x_train, in 0..255 units (make_tasks's).
    """
    glyphs, names = read_imagedata_glyphs(archive)                  # (C, 20, 20)
    shears = np.array([(a, b) for a in IMAGEDATA_SHEAR_VALUES
                       for b in IMAGEDATA_SHEAR_VALUES])            # (441, 2)
    images = shear_images(glyphs, shears)                           # (C, 441, 20, 20)
    images = images.reshape(-1, IMAGEDATA_SIZE, IMAGEDATA_SIZE)     # (C*441, 20, 20)
    labels = np.repeat(np.arange(len(names)), len(shears))         # class-major, like images

    # Random 75/25 split of all images (not per class). The test size is rounded
    # up, as scikit-learn's train_test_split(test_size=0.25) does: of 32,634
    # images, ceil(8158.5) = 8,159 test and 24,475 train, the report's numbers.
    n_test = math.ceil(IMAGEDATA_TEST_FRACTION * len(labels))
    order = np.random.default_rng(IMAGEDATA_SPLIT_SEED).permutation(len(labels))
    test, train = np.sort(order[:n_test]), np.sort(order[n_test:])
    x_train = images[train]
    return {"x_train": x_train, "y_train": labels[train],
            "x_test": images[test], "y_test": labels[test],
            "class_names": np.array(names),
            "pixel_mean": np.array(x_train.mean(dtype=np.float64)),
            "pixel_std": np.array(x_train.std(dtype=np.float64))}


def read_imagedata_glyphs(archive: Path) -> tuple[np.ndarray, list[str]]:
    """The kept glyphs, uint8 (C, 20, 20), inverted to white strokes on black,
    and their names ("90 delta"), sorted by rotation then shape.

    Each PNG is converted to 8-bit grayscale as PIL's convert("L") does and
    resized to 20x20 as PIL's resize((20, 20)) does: the course used PIL.
    """
    glyphs = {}
    with zipfile.ZipFile(archive) as zf:
        for entry in zf.infolist():
            path = entry.filename
            # __MACOSX/ holds macOS resource forks named like the PNGs: not images.
            if entry.is_dir() or path.startswith("__MACOSX/") or not path.endswith(".png"):
                continue
            stem = path.rsplit("/", 1)[-1][:-len(".png")]       # "90delta"
            if stem in IMAGEDATA_DROPPED:
                continue
            match = re.fullmatch(r"(0|90|180|270)(.+)", stem)
            if match is None:
                raise DataError(f"{archive}: {path} is not named <rotation><shape>.png")
            image = decode_png(zf.read(entry), f"{archive}:{path}")
            gray = image if image.ndim == 2 else gray8_from_rgb(image)
            glyphs[int(match[1]), match[2]] = 255 - resize_gray8(gray, IMAGEDATA_SIZE)
    if not glyphs:
        raise DataError(f"{archive} holds no glyph PNGs")
    keys = sorted(glyphs)
    return np.stack([glyphs[k] for k in keys]), [f"{r} {shape}" for r, shape in keys]


def shear_images(images: np.ndarray, shears: np.ndarray) -> np.ndarray:
    """Shear every image by every (a, b): (C, n, n), (S, 2) -> (C, S, n, n).

    Output pixel (x, y) -- x to the right, y downwards, both measured from the
    image centre (n-1)/2 -- takes the input pixel at (x + a*y, b*x + y),
    nearest neighbour, zero where that falls outside the image. Exact halves
    are common (a = 0.2, y = 2.5) and round up: floor(v + 0.5).
    """
    n = images.shape[-1]
    centre = (n - 1) / 2
    y, x = np.mgrid[0:n, 0:n] - centre                  # (n, n) each
    a, b = shears[:, 0, None, None], shears[:, 1, None, None]   # (S, 1, 1)
    # a*y is a multiple of 0.05 up to float noise (0.2 is not exact in binary).
    # On this grid the halves happen to come out exact; rounding to 9 decimals
    # makes that hold by construction, so every half rounds up alike.
    col = np.floor(np.round(x + a * y, 9) + centre + 0.5).astype(np.int64)   # (S, n, n)
    row = np.floor(np.round(b * x + y, 9) + centre + 0.5).astype(np.int64)
    inside = (col >= 0) & (col < n) & (row >= 0) & (row < n)
    taken = images[:, row.clip(0, n - 1), col.clip(0, n - 1)]   # (C, S, n, n)
    return np.where(inside, taken, 0).astype(images.dtype)


def gray8_from_rgb(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W) uint8 by ITU-R 601-2 luma,
    L = R*299/1000 + G*587/1000 + B*114/1000, computed as PIL's convert("L"):
    16-bit fixed-point weights (they sum to 65536) and rounding to nearest.
    (Older PIL versions truncated (R*299 + G*587 + B*114) / 1000: at most 1 lower.)"""
    r, g, b = rgb.astype(np.uint32).transpose(2, 0, 1)
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)


def resize_gray8(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W) uint8 -> (size, size) uint8, as PIL's resize((size, size)) of an
    "L" image with its default filter since Pillow 7, BICUBIC: a separable
    filter, rows first, each pass rounded and clipped to 8 bits.

    The recipe leaves the interpolation open; PIL's default is the likeliest
    to match the course. It averages over the shrunk pixel's footprint
    (antialiasing), so thin strokes fade to grey instead of vanishing.
    """
    half = 1 << 21                                      # 0.5 in 22-bit fixed point
    across = pil_bicubic_weights(image.shape[1], size)  # (size, W)
    down = pil_bicubic_weights(image.shape[0], size)    # (size, H)
    rows = np.clip((image.astype(np.int64) @ across.T + half) >> 22, 0, 255)   # (H, size)
    return np.clip((down @ rows + half) >> 22, 0, 255).astype(np.uint8)     # (size, size)


def pil_bicubic_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) int64 weights with 22 fractional bits, as Pillow's
    precompute_coeffs computes them for BICUBIC (Keys kernel, a = -0.5)."""
    scale = n_in / n_out
    stretch = max(scale, 1.0)      # shrinking widens the kernel by the same factor
    support = 2.0 * stretch        # the cubic kernel is zero beyond 2 pixels
    a = -0.5                       # the cubic's free parameter, Pillow's choice
    weights = np.zeros((n_out, n_in))
    for out in range(n_out):
        centre = (out + 0.5) * scale                    # in input pixel units
        lo = max(int(centre - support + 0.5), 0)
        hi = min(int(centre + support + 0.5), n_in)
        t = np.abs((np.arange(lo, hi) - centre + 0.5) / stretch)   # distance, in kernel units
        taps = np.where(t < 1, ((a + 2) * t - (a + 3)) * t * t + 1,
                        np.where(t < 2, (((t - 5) * t + 8) * t - 4) * a, 0.0))
        weights[out, lo:hi] = taps / taps.sum()
    return np.trunc(weights * (1 << 22) + np.copysign(0.5, weights)).astype(np.int64)


def decode_png(data: bytes, name: str) -> np.ndarray:
    """A PNG's pixels: uint8 (H, W) for grayscale, (H, W, 3) for RGB.

    Only non-interlaced 1-bit and 8-bit grayscale and 8-bit RGB are read
    (1-bit samples scaled to 0/255, as PNG and PIL do); every other flavour
    raises DataError rather than being decoded wrongly. `name` goes into the
    messages.
    """
    if not data.startswith(IMAGEDATA_PNG_SIGNATURE):
        raise DataError(f"{name} is not a PNG file (wrong signature)")
    pos, header, idat = len(IMAGEDATA_PNG_SIGNATURE), None, []
    while True:
        # chunk = length (4 bytes) | type (4) | body (length) | CRC-32 of type + body (4)
        if pos + 12 > len(data):
            raise DataError(f"{name}: PNG truncated before its IEND chunk")
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if pos + 12 + length > len(data):
            raise DataError(f"{name}: PNG truncated inside its {kind!r} chunk")
        body = data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        if zlib.crc32(kind + body) != crc:
            raise DataError(f"{name}: CRC mismatch in the {kind!r} chunk (damaged file)")
        pos += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
        elif kind[0] & 0x20 == 0 and kind != b"PLTE":   # upper-case first letter: critical
            raise DataError(f"{name}: unknown critical PNG chunk {kind!r}")
    if header is None:
        raise DataError(f"{name}: PNG without an IHDR chunk")
    width, height, depth, colour, compression, filtering, interlace = header
    channels = IMAGEDATA_PNG_FLAVOURS.get((depth, colour))
    if channels is None or interlace or compression or filtering:
        raise DataError(
            f"{name}: unsupported PNG flavour: {depth}-bit "
            f"{IMAGEDATA_PNG_COLOUR_TYPES.get(colour, f'colour type {colour}')}"
            f"{', interlaced' if interlace else ''}; only non-interlaced 1-bit or 8-bit "
            f"grayscale and 8-bit RGB are read")
    try:
        raw = zlib.decompress(b"".join(idat))
    except zlib.error as error:
        raise DataError(f"{name}: damaged PNG image data ({error})") from None
    stride = (width * channels * depth + 7) // 8       # bytes per row, filter byte excluded
    if len(raw) != height * (stride + 1):
        raise DataError(f"{name}: PNG image data has {len(raw)} bytes, "
                        f"expected {height} rows of 1 + {stride}")
    rows = unfilter_png_rows(np.frombuffer(raw, np.uint8).reshape(height, stride + 1),
                             max(1, channels * depth // 8), name)    # (H, stride)
    if depth == 1:                                      # 8 pixels per byte, high bit first
        return np.unpackbits(rows, axis=1)[:, :width] * np.uint8(255)
    pixels = rows.reshape(height, width, channels)
    return pixels[:, :, 0] if channels == 1 else pixels


def unfilter_png_rows(scanlines: np.ndarray, bpp: int, name: str) -> np.ndarray:
    """Undo PNG's row filters: (H, 1 + stride) uint8, filter type first in each
    row -> (H, stride) uint8. Each byte was stored as x - predictor (mod 256),
    the predictor built from its decoded neighbours: left (bpp bytes back,
    one whole pixel), up (same byte, previous row) and up-left; all three are
    0 outside the image. uint8 arithmetic wraps, which is the mod 256."""
    height, stride = scanlines.shape[0], scanlines.shape[1] - 1
    out = np.zeros((height + 1, stride), np.uint8)     # out[0]: the zero row above the image
    for r in range(height):
        kind, raw, up = scanlines[r, 0], scanlines[r, 1:], out[r]
        if kind == 0:                                  # None: x
            out[r + 1] = raw
        elif kind == 1:                                # Sub: x + left, a running sum per byte lane
            out[r + 1] = np.cumsum(raw.reshape(-1, bpp), axis=0, dtype=np.uint8).reshape(-1)
        elif kind == 2:                                # Up: x + up
            out[r + 1] = raw + up
        elif kind in (3, 4):                           # Average, Paeth: need the decoded left byte
            out[r + 1] = unfilter_png_row_sequentially(raw.tolist(), up.tolist(), bpp, kind)
        else:
            raise DataError(f"{name}: unknown PNG filter type {kind} in row {r}")
    return out[1:]


def unfilter_png_row_sequentially(raw: list[int], up: list[int], bpp: int,
                                  kind: int) -> list[int]:
    """Average (kind 3: x + floor((left + up) / 2)) or Paeth (kind 4: x + the
    neighbour closest to left + up - upleft), one byte after the other."""
    row = [0] * len(raw)
    for i, x in enumerate(raw):
        left = row[i - bpp] if i >= bpp else 0
        upleft = up[i - bpp] if i >= bpp else 0
        if kind == 3:
            predictor = (left + up[i]) // 2
        else:
            guess = left + up[i] - upleft
            distances = abs(guess - left), abs(guess - up[i]), abs(guess - upleft)
            # ties go to left, then up, then upleft (the order matters: PNG spec 9.4)
            predictor = (left, up[i], upleft)[distances.index(min(distances))]
        row[i] = (x + predictor) & 0xFF
    return row


def find_imagedata_archive(data_dir: Path) -> Path:
    """data_dir/images_rotate.zip, downloaded first if missing, sha256 verified."""
    path = Path(data_dir) / IMAGEDATA_ARCHIVE
    hint = (f"Download {IMAGEDATA_URL} (sha256 {IMAGEDATA_SHA256}) on a machine with "
            f"internet access and put it at {path}, or point --data-dir at the folder "
            f"that holds {IMAGEDATA_ARCHIVE}.")
    return _fetch(IMAGEDATA_URL, path, algorithm="sha256", expected=IMAGEDATA_SHA256, hint=hint)


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
                    "(python data.py --dataset market-synthetic writes a synthetic one)")


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

def write_synthetic_market(folder, *, seed: int, num_symbols: int = 6, num_days: int = 12,
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
        path.write_text("\n".join(lines) + "\n", newline="")
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------
# Command line: a summary of the stream
# ---------------------------------------------------------------------------

TASK_DATASETS = ("cifar100", "glyphs", "imagedata", "npz")        # load_tasks
MARKET_DATASETS = ("market", "market-synthetic")                   # load_market


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1, refused with a clear message otherwise."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text}")
    return value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Summarise a task stream or a MarketCL stream.")
    parser.add_argument("--dataset", default="glyphs", choices=TASK_DATASETS + MARKET_DATASETS)
    parser.add_argument("--data-dir", default=None, help=f"default ${DATA_DIR_ENV} or ./data")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-tasks", type=positive_int, default=None, help="keep the first N tasks")
    parser.add_argument("--path", default=None, help="the .npz file (npz only)")
    parser.add_argument("--source", default=None,
                        help="a CSV file or a folder of CSVs of minute bars (market only)")
    parser.add_argument("--samples-per-day", type=positive_int, default=MARKET_SAMPLES_PER_DAY,
                        help="samples per symbol and day (market, market-synthetic)")
    args = parser.parse_args(argv)
    market = args.dataset in MARKET_DATASETS
    if args.path is not None and args.dataset != "npz":
        parser.error("--path is only used with --dataset npz")
    if (args.source is not None) != (args.dataset == "market"):
        parser.error("--dataset market needs --source, and only it takes one")
    if market and args.num_tasks is not None:
        parser.error("--num-tasks is for task datasets; MarketCL is a stream of days")
    data_dir = default_data_dir() if args.data_dir is None else Path(args.data_dir)
    kwargs = {} if args.path is None else {"path": args.path}

    start = time.perf_counter()
    try:
        if args.dataset == "market-synthetic":
            # Written on every call (a tenth of a second): the files are a
            # function of the seed, so rewriting them equals reusing them.
            source = data_dir / MARKET_SYNTHETIC_FOLDER.format(seed=args.seed)
            paths = write_synthetic_market(source, seed=args.seed)
            print(f"market-synthetic: wrote {len(paths)} CSV files to {source} "
                  f"in {time.perf_counter() - start:.1f} s")
            start = time.perf_counter()
        else:
            source = args.source
        if market:
            stream = load_market(source, seed=args.seed, samples_per_day=args.samples_per_day)
        else:
            tasks = load_tasks(args.dataset, data_dir=data_dir, seed=args.seed,
                               num_tasks=args.num_tasks, **kwargs)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - start
    if market:
        print(stream.summary())
        print(f"loaded in {seconds:.2f} s (seed {args.seed}, "
              f"{args.samples_per_day} samples per symbol and day)")
        return 0
    print(f"{args.dataset}: {len(tasks)} tasks, input {tasks[0].input_shape}, "
          f"seed {args.seed}, loaded in {seconds:.2f} s")
    for task in tasks:
        print(f"task {task.index:2d}: train {len(task.train):5d}  val "
              f"{len(task.val):4d}  test {len(task.test):4d}  "
              f"classes {', '.join(task.class_names)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
