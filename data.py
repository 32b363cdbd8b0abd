"""data.py: turn a dataset into a stream of continual-learning tasks.

    python data.py --dataset glyphs                      # offline synthetic default
    python data.py --dataset cifar100 --data-dir data    # 20-Split CIFAR-100

A *task* is a small classification problem (5 classes for 20-Split CIFAR-100)
with its own train / validation / test tensors. `load_tasks` returns the list
of tasks in the order a continual learner meets them. Everything stays a
tensor (on the chosen device when it fits): no PIL, no torchvision, no
per-sample Python work, so a 20-task run never waits for its data.

Public interface (course assignments import these names):
    load_tasks(dataset, *, data_dir, seed, num_tasks=None,
               classes_per_task=None, device="cpu", ...) -> list[Task]
    Task, Split, Split.batches(batch_size, generator)
    DataError: raised for every problem with the data; the message says what
               was wrong and what to do. The command line prints it without a
               traceback and exits non-zero.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

# Where datasets live unless --data-dir says otherwise. ./data is git-ignored.
DATA_DIR_ENV = "MARK_DATA_DIR"


def default_data_dir() -> Path:
    return Path(os.environ.get(DATA_DIR_ENV, "data"))


class DataError(Exception):
    """A problem with the input data, with a message that says how to fix it."""


# ---------------------------------------------------------------------------
# The task container
# ---------------------------------------------------------------------------

@dataclass
class Split:
    """One split (train, validation or test) of one task.

    x: float32 (N, C, H, W) normalised images, or (N, L, F) padded sequences.
    y: int64 (N,) labels in 0..k-1, or (N, n_labels) for multi-label data.
    lengths: int64 (N,) true sequence lengths for padded sequences, else None.
    """
    x: torch.Tensor
    y: torch.Tensor
    lengths: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.y.shape[0]

    def to(self, device) -> "Split":
        lengths = None if self.lengths is None else self.lengths.to(device)
        return Split(self.x.to(device), self.y.to(device), lengths)

    def subset(self, index: torch.Tensor) -> "Split":
        """Rows `index` (a LongTensor on the split's device) as a new Split."""
        lengths = None if self.lengths is None else self.lengths[index]
        return Split(self.x[index], self.y[index], lengths)

    def batches(self, batch_size: int, generator: torch.Generator | None = None,
                shuffle: bool = True):
        """Yield mini-batches as Splits.

        The order comes from `generator` (an explicit torch.Generator, so a run
        is reproducible and resumable); shuffle=False keeps the stored order.
        The permutation is drawn on the generator's device and indexing happens
        on the data's device: no host round trip per batch.
        """
        n = len(self)
        if shuffle:
            gen_device = generator.device if generator is not None else "cpu"
            order = torch.randperm(n, generator=generator, device=gen_device)
            order = order.to(self.y.device)
        else:
            order = torch.arange(n, device=self.y.device)
        for start in range(0, n, batch_size):
            yield self.subset(order[start:start + batch_size])


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
