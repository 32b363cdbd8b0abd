"""data.py: turn a dataset into a stream of continual-learning tasks.

    python data.py --dataset glyphs                       # offline synthetic default
    python data.py --dataset cifar100 --data-dir data     # 20-Split CIFAR-100
    python data.py --dataset npz --path my.npz            # your own images
    python imagedata.py --data-dir data                   # the report's ImageData
    python market_data.py --dataset market --source DIR   # MarketCL on your CSVs
    python market_data.py --dataset market-synthetic      # MarketCL on generated CSVs

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
    Sequences: padded sequences with their lengths, indexable like a tensor
    DataError: raised for every problem with the data; the message says what
               was wrong and what to do. The command line prints it without a
               traceback and exits non-zero.
For the modules of the other datasets (they import this one, never the
reverse): make_tasks, fetch_verified, atomic_write, and for their command
lines add_data_arguments, positive_int, summarise_tasks, print_error.

Datasets of load_tasks (the `dataset` argument):
    "cifar100"  20-Split CIFAR-100, the paper's benchmark (its 20-Split
                protocol). Read from <data_dir>/cifar-100-python/, else from
                the official archive in <data_dir>, else downloaded.
    "glyphs"    a small synthetic stand-in for the report's ImageData: 20x20
                grayscale drawings, 75 classes, 15 tasks. Needs no files.
    "npz"       your own images in one .npz file (load_tasks("npz",
                path="my.npz", classes_per_task=2)); see `load_npz`.

Every dataset goes through the same last step, `make_tasks`: a seeded
permutation of the classes, cut into tasks of `classes_per_task`; labels
renumbered 0..k-1 inside each task; `val_fraction` of every class's training
images held out as validation; images normalised per channel.

Two datasets of the course report live in modules of their own:
    imagedata.py    the report's ImageData, rebuilt from the course's glyph
                    PNGs: imagedata.load_imagedata(data_dir, seed=...) ->
                    list[Task], cut by make_tasks like the datasets above.
    market_data.py  MarketCL (the report's section 8), not a list of tasks but
                    a stream of days: market_data.load_market(source, seed=...)
                    -> MarketStream, whose Splits hold Sequences.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import math
import os
import pickle
import shutil
import sys
import tarfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import torch

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


def default_data_dir() -> Path:
    return Path(os.environ.get(DATA_DIR_ENV, "data"))


def data_dir_or_default(data_dir) -> Path:
    """data_dir as a Path, or default_data_dir() for None."""
    return default_data_dir() if data_dir is None else Path(data_dir)


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
    classes_per_task: default 5 for cifar100 and glyphs, 2 for npz.
    kwargs: dataset-specific options; npz takes path=FILE.

    ImageData and MarketCL are not here: imagedata.load_imagedata returns
    ImageData's tasks, and MarketCL is a stream of days, not a list of tasks
    (see market_data.load_market).
    """
    data_dir = data_dir_or_default(data_dir)
    common = dict(seed=seed, num_tasks=num_tasks, val_fraction=val_fraction)
    if dataset == "cifar100":
        tasks = load_cifar100(
            data_dir, classes_per_task=classes_per_task or CIFAR100_CLASSES_PER_TASK,
            **common, **kwargs)
    elif dataset == "glyphs":
        tasks = load_glyphs(
            classes_per_task=classes_per_task or GLYPH_CLASSES_PER_TASK,
            **common, **kwargs)
    elif dataset == "npz":
        tasks = load_npz(
            data_dir, classes_per_task=classes_per_task or NPZ_CLASSES_PER_TASK,
            **common, **kwargs)
    elif dataset == "imagedata":
        raise DataError("imagedata has a module of its own: use "
                        "imagedata.load_imagedata(data_dir, seed=...) -> list[Task]")
    elif dataset in ("market", "market-synthetic"):
        raise DataError(f"{dataset} is a stream of days, not a list of tasks: "
                        "use market_data.load_market(source, seed=...) -> MarketStream")
    else:
        raise DataError(f"unknown dataset {dataset!r}; "
                        f"choose one of: {', '.join(TASK_DATASETS)}")
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

def fetch_verified(url: str, target: Path, *, algorithm: str, expected: str, hint: str) -> Path:
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
    checksum (atomic_write): an interrupted or wrong download leaves nothing
    that could later pass for the real file.
    """
    print(f"downloading {url}", file=sys.stderr)
    digest = hashlib.new(algorithm)
    try:
        with urllib.request.urlopen(url, timeout=30) as response, atomic_write(target) as out:
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
def atomic_write(path: Path):
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
    archive = fetch_verified(CIFAR100_URL, data_dir / CIFAR100_ARCHIVE, algorithm="md5",
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
# Command line: a summary of the stream (shared with imagedata.py and market_data.py)
# ---------------------------------------------------------------------------

TASK_DATASETS = ("cifar100", "glyphs", "npz")        # load_tasks


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1, refused with a clear message otherwise."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text}")
    return value


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """--data-dir and --seed, which every data command line takes."""
    parser.add_argument("--data-dir", default=None, help=f"default ${DATA_DIR_ENV} or ./data")
    parser.add_argument("--seed", type=int, default=0,
                        help="draws the class order and the validation rows (default 0)")


def print_error(err: DataError) -> int:
    """A DataError as one line on stderr, without a traceback; the exit status 1."""
    print(f"error: {err}", file=sys.stderr)
    return 1


def summarise_tasks(dataset: str, load, seed: int) -> int:
    """Time load() (-> list[Task]) and print one line per task; the exit status."""
    start = time.perf_counter()
    try:
        tasks = load()
    except DataError as err:
        return print_error(err)
    seconds = time.perf_counter() - start
    print(f"{dataset}: {len(tasks)} tasks, input {tasks[0].input_shape}, "
          f"seed {seed}, loaded in {seconds:.2f} s")
    for task in tasks:
        print(f"task {task.index:2d}: train {len(task.train):5d}  val "
              f"{len(task.val):4d}  test {len(task.test):4d}  "
              f"classes {', '.join(task.class_names)}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Summarise a task stream.",
        epilog="ImageData: python imagedata.py; MarketCL: python market_data.py.")
    parser.add_argument("--dataset", default="glyphs", choices=TASK_DATASETS,
                        help="the stream to summarise (default glyphs: synthetic, offline)")
    add_data_arguments(parser)
    parser.add_argument("--num-tasks", type=positive_int, default=None, help="keep the first N tasks")
    parser.add_argument("--path", default=None, help="the .npz file (npz only)")
    args = parser.parse_args(argv)
    if args.path is not None and args.dataset != "npz":
        parser.error("--path is only used with --dataset npz")
    kwargs = {} if args.path is None else {"path": args.path}
    return summarise_tasks(args.dataset, lambda: load_tasks(
        args.dataset, data_dir=data_dir_or_default(args.data_dir), seed=args.seed,
        num_tasks=args.num_tasks, **kwargs), args.seed)


if __name__ == "__main__":
    sys.exit(main())
