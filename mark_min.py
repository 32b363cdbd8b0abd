"""mark_min.py: MARK (Meta Reusable Knowledge) in one readable file.

Hurtado, Raymond-Saez & Soto, "Optimizing Reusable Knowledge for Continual
Learning via Metalearning", NeurIPS 2021 (arXiv:2106.05390).

    python mark_min.py                          # glyphs stream, quick profile, < 2 min on CPU
    python mark_min.py --dataset cifar100       # 20-Split CIFAR-100, the paper's protocol
    python mark_min.py --dataset cifar100 --profile short --out runs/c100
    python mark_min.py --dataset cifar100 --describe   # parameter table, no data needed
    python mark_min.py --dataset market-synthetic      # MarketCL offline, quick profile
    python mark_min.py --dataset market --source data/nse-minute --out runs/nse   # your minute-bar CSVs

The idea in one paragraph. A continual learner meets tasks one after another
and must not forget old ones. MARK keeps ONE shared knowledge base (KB): a
small CNN whose weights are reused by every task. Each task t owns three small
modules: a feature extractor F_t that looks at the image and produces a
query, a mask generator M_t that turns the query into one scale per KB
channel (a "mask"), and a classifier head C_t. The KB's channels are
multiplied by the masks, so each task reads the shared knowledge in its own
way. The KB is trained ordinarily only on the first task; afterwards it only
moves by a small Reptile-style meta-update (step 4), which is why old tasks
are (almost) not forgotten: their F, M and C are never touched again and the
KB barely moves.

Map from the paper's training procedure to this file:
    step 1  train F_t with a throwaway head ......... step1_feature_extractor
    step 2  first task only: pre-train the KB ....... step2_pretrain_kb
    step 3  train M_t and C_t, KB frozen ............ step3_masks_and_head
    step 4  meta-update of the KB (Reptile) ......... step4_meta_update
    step 5  consolidate M_t and C_t ................. step5_consolidate
    evaluation / accuracy matrix R .................. evaluate, run_seed
    MarketCL, day by day (symbols are tasks) ........ run_market_seed
The model: KnowledgeBase, FeatureExtractor, MaskGenerator, MARKNet.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import fcntl
import functools
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

import metrics
from data import DataError, Task, batch_indices, default_data_dir, load_tasks
from market_data import (MARKET_DATASETS, MARKET_FEATURE_NAMES, MARKET_LABEL_PAIRS,
                         MARKET_NUM_CLASSES, MARKET_SYNTHETIC_FOLDER, MarketStream, load_market,
                         write_synthetic_market)

# ---------------------------------------------------------------------------
# Configuration: every hyperparameter in one place, with where it comes from.
# ---------------------------------------------------------------------------


@dataclass
class Config:
    # -- what to run --------------------------------------------------------
    dataset: str = "glyphs"        # glyphs | cifar100 | imagedata | npz | market | market-synthetic
    data_dir: str | None = None    # default ./data or $MARK_DATA_DIR
    path: str | None = None        # the .npz file for --dataset npz
    source: str | None = None      # market: a CSV file or a folder of minute-bar CSVs
    num_tasks: int | None = None   # keep only the first N tasks of the stream (market: symbols)
    num_days: int | None = None    # market: keep only the first N days with samples (>= 2)
    profile: str | None = None     # paper | short | quick; None: per-dataset default
    epoch_scale: float = 1.0       # multiply every epoch count (after the profile)
    seed: int = 0                  # sets python, numpy, torch and the class order
    runs: int = 1                  # seeds seed .. seed+runs-1
    device: str = "auto"           # auto | cpu | cuda | cuda:N
    out: str | None = None         # folder for results.json and checkpoints
    resume: bool = False           # continue from the checkpoints in --out
    force: bool = False            # replace the results and checkpoints already in --out
    # -- model (the authors' code's layers) --------------------------------------
    latent: int = 128              # size of F_t's query and of the KB's output
    kb_channels: tuple = (64, 128, 256)   # authors' code
    kb_kernels: tuple = (4, 3, 2)         # authors' code (CIFAR-100)
    fe_channels: tuple = (32, 32)         # authors' code
    fe_kernels: tuple = (4, 3)            # authors' code
    dropout: float = 0.5           # after the KB's linear layer (authors' code)
    mask_activation: str = "relu"  # relu (authors' default) | sigmoid
    mask_init: str = "ones"        # ones: masks start near 1 (our choice, see MaskGenerator) | default (authors)
    seq_query: int = 64            # sequences: F_t's LSTM size (the report's MarketCL model)
    seq_channels: tuple = (64, 128, 256)  # sequences: the KB's three stacked LSTMs (the report)
    # -- ordinary training: steps 1, 2, 3, 5 (the paper; the authors' code) -----
    batch_size: int = 128          # authors
    lr: float = 0.1                # authors, CIFAR-100 (0.01 for MiniImageNet)
    momentum: float = 0.9          # authors
    weight_decay: float = 0.01     # authors
    clip: float = 0.5              # gradient-norm clip (authors)
    clip_every_step: bool = True   # clip in steps 1, 2, 3, 5 (our choice); authors: step 1 only
    frozen_eval: bool = True       # frozen modules in eval mode (ours); authors: left in train mode
    epochs_fe: int = 50            # step 1, authors
    epochs_kb: int = 50            # step 2, authors
    epochs_masks: int = 50         # step 3, authors
    epochs_consolidate: int = 50   # step 5, authors (the report: 30-40)
    lr_consolidate: float = 0.1    # step 5, authors (the report: 0.05)
    # -- meta-update: step 4 (the paper; the authors' code) ----------------------
    meta_epochs: int = 10          # outer steps per task, authors
    meta_k: int = 10               # meta-tasks per outer step, authors
    meta_inner_steps: int = 40     # SGD steps on one batch per meta-task, authors
    meta_inner_lr: float = 0.01    # authors
    meta_inner_weight_decay: float = 0.1   # authors
    meta_outer_lr: float = 0.001   # eps; authors: 0.1 x meta rate
    meta_outer_weight_decay: float = 0.1   # authors
    meta_sign: str = "reptile"     # reptile (towards adapted weights) | authors (away)
    meta_acc_dropout: bool = False # acc_i measured with dropout off (our choice); authors: on
    authors_code: bool = False     # every choice above where mark-min deviates, as the authors' code
    meta_impl: str = "auto"        # loop | vmap | auto (vmap on CUDA, loop on a CPU)
    channels_last: bool = True     # memory layout for conv nets; faster on CPU and GPU
    threads: int | None = None     # torch CPU threads (default: torch's choice, one per core)
    deterministic: bool = False    # CUDA: deterministic kernels, so --resume reproduces a run exactly
    # -- SupSup extension (Wortsman et al. 2020; the course report) -------------
    supsup: bool = False           # one shared M and C with per-task binary supermasks
    supsup_binarize: str = "topk"  # topk (SupSup: keep the top density of |score|) | sign (report: score >= 0)
    supsup_density: float = 0.5    # fraction of weights kept by topk (SupSup's default)
    infer_task: bool = False       # also evaluate without the task id at the end of a run

    def __post_init__(self):
        for name in ("kb_channels", "kb_kernels", "fe_channels", "fe_kernels", "seq_channels"):
            setattr(self, name, tuple(getattr(self, name)))


# Short schedules. "paper" is the authors' protocol; everything else is a
# shorter run and is labelled as such wherever results are printed or saved.
PROFILES = {
    "paper": {},
    # The schedule of a measured short run of the authors' code:
    # every epoch count / 10 and one meta-epoch.
    "short": dict(epochs_fe=5, epochs_kb=5, epochs_masks=5, epochs_consolidate=5,
                  meta_epochs=1),
    # The default glyphs run: the whole 15-task stream in under 2 minutes on a
    # 2-core CPU. Fewer and shorter meta-tasks keep step 4 cheap.
    "quick": dict(epochs_fe=3, epochs_kb=6, epochs_masks=4, epochs_consolidate=2,
                  meta_epochs=1, meta_k=5, meta_inner_steps=10),
}
DEFAULT_PROFILE = {"cifar100": "paper"}     # every other dataset: "quick"
# MarketCL's batches are small (16 samples of one symbol-day) but long (up to
# 375 LSTM steps), and the meta-update's inner steps dominate a quick run: its
# quick profile runs fewer, shorter meta-tasks, so 6 symbols x 10 days take
# minutes on one core.
DATASET_PROFILES = {(market, "quick"): dict(meta_k=2, meta_inner_steps=5)
                    for market in MARKET_DATASETS}
EPOCH_FIELDS = ("epochs_fe", "epochs_kb", "epochs_masks", "epochs_consolidate")
# Input shape of one sample and classes per task of each dataset, so --describe
# needs no data. MarketCL: a day's 375 minutes x 27 features, 4 labels of 4
# classes per symbol; market-synthetic writes 6 symbols, and for a user's
# market data (unknown until read) the report's 20 symbols; --num-tasks sets T.
MARKET_SHAPE = (375, len(MARKET_FEATURE_NAMES))
KNOWN_SHAPES = {"cifar100": (3, 32, 32), "glyphs": (1, 20, 20), "imagedata": (1, 20, 20),
                "market": MARKET_SHAPE, "market-synthetic": MARKET_SHAPE}
KNOWN_CLASSES = {"cifar100": [5] * 20, "glyphs": [5] * 15, "imagedata": [5] * 14 + [4],
                 "market": [MARKET_NUM_CLASSES] * 20, "market-synthetic": [MARKET_NUM_CLASSES] * 6}
KNOWN_LABELS = {"market": len(MARKET_LABEL_PAIRS), "market-synthetic": len(MARKET_LABEL_PAIRS)}


# --authors-code: every choice of the authors' code that mark-min changed and
# that changes the arithmetic (README, "Deviations"; DEVIATION n marks the code).
AUTHORS_CODE = dict(meta_sign="authors",          # DEVIATION 1
                    frozen_eval=False,            # DEVIATION 2
                    mask_init="default",          # DEVIATION 3
                    clip_every_step=False,        # DEVIATION 4
                    meta_acc_dropout=True)        # DEVIATION 5


def resolve_config(cfg: Config, overridden: set[str] = frozenset()) -> Config:
    """Apply the profile and --authors-code, then the user's explicit flags
    (an explicit flag beats both), then --epoch-scale."""
    cfg = dataclasses.replace(cfg)
    if cfg.profile is None:
        cfg.profile = DEFAULT_PROFILE.get(cfg.dataset, "quick")
    for key, value in (PROFILES[cfg.profile] | DATASET_PROFILES.get((cfg.dataset, cfg.profile), {})
                       | (AUTHORS_CODE if cfg.authors_code else {})).items():
        if key not in overridden:            # an explicit flag beats the profile
            setattr(cfg, key, value)
    for key in EPOCH_FIELDS:
        scaled = getattr(cfg, key) * cfg.epoch_scale
        if not math.isfinite(scaled):
            raise ValueError(f"--epoch-scale {cfg.epoch_scale:g} makes the epoch counts infinite "
                             f"({key}: {getattr(cfg, key)} x {cfg.epoch_scale:g}); give a smaller scale")
        setattr(cfg, key, max(1, round(scaled)))
    return cfg


def describe_schedule(cfg: Config, overridden=frozenset()) -> str:
    """One honest line: which schedule ran, and whether it is the paper's."""
    changed = sorted(k for k in overridden if k in HYPERPARAMETERS)
    is_paper = cfg.profile == "paper" and not changed and cfg.epoch_scale == 1.0
    label = "paper protocol" if is_paper else "SHORT profile, not the paper protocol"
    extra = f", overrides: {', '.join(changed)}" if changed else ""
    scale = f", epoch scale {cfg.epoch_scale:g}" if cfg.epoch_scale != 1.0 else ""
    authors = ", the authors' code's choices (--authors-code)" if cfg.authors_code else ""
    return (f"profile '{cfg.profile}' ({label}{scale}{extra}{authors}): epochs F/KB/M/cons = "
            f"{cfg.epochs_fe}/{cfg.epochs_kb}/{cfg.epochs_masks}/{cfg.epochs_consolidate}, "
            f"meta {cfg.meta_epochs} x K={cfg.meta_k} x {cfg.meta_inner_steps} steps, "
            f"sign {cfg.meta_sign}")


HYPERPARAMETERS = {f.name for f in dataclasses.fields(Config)} - {
    "dataset", "data_dir", "path", "source", "num_tasks", "num_days", "profile", "epoch_scale",
    "seed", "runs", "device", "out", "resume", "force", "meta_impl", "channels_last", "threads",
    "infer_task", "deterministic", "authors_code"}
# A run's identity: what its numbers depend on, the hyperparameters and the
# data (dataset, file or folder, tasks and days kept), plus method and seed.
# Not in it: where things are (data_dir, out), how they run (device, threads,
# deterministic, and meta_impl and channels_last, which give the same
# results), and infer_task, which only adds an evaluation at the end.
# profile and epoch_scale enter through the epoch counts they resolve to.
IDENTITY_FIELDS = sorted(HYPERPARAMETERS | {"dataset", "path", "source", "num_tasks", "num_days"})


def run_identity(cfg: Config, method: str, seed: int) -> dict:
    """The identity of one run, as saved in its checkpoint and results.json
    (JSON types: tuples become lists, a file or folder its absolute path)."""
    identity = {name: getattr(cfg, name) for name in IDENTITY_FIELDS}
    for name in ("path", "source"):
        if identity[name] is not None:
            identity[name] = str(Path(identity[name]).resolve())
    return json.loads(json.dumps(identity | {"method": method, "seed": seed}))


def with_new_settings(saved: dict) -> dict:
    """A saved identity completed with the settings Config gained after it was
    saved, at their defaults. The rule for whoever adds a setting: its default
    keeps the arithmetic as it was, so a run saved before it existed ran with
    that default, and --resume and tables may go on comparing it."""
    defaults = run_identity(Config(), saved.get("method"), saved.get("seed"))
    return {name: defaults[name] for name in IDENTITY_FIELDS if name not in saved} | saved


def identity_differences(a: dict, b: dict, names=("saved", "now")) -> str:
    """'--lr 0.1 saved, 0.05 now; ...' for every key whose values differ."""
    fields = {f.name for f in dataclasses.fields(Config)}
    return "; ".join(f"{'--' + key.replace('_', '-') if key in fields else key} "
                     f"{a.get(key)!r} {names[0]}, {b.get(key)!r} {names[1]}"
                     for key in sorted(set(a) | set(b)) if a.get(key) != b.get(key))


# ---------------------------------------------------------------------------
# The model (the authors' layers)
# ---------------------------------------------------------------------------

def conv_pool_size(size: int, kernel: int) -> int:
    """Spatial size after a conv (no padding, stride 1) and a 2x2 max-pool."""
    after_conv = size - kernel + 1
    if after_conv < 2:
        raise ValueError(f"input of {size} px is too small for a {kernel}x{kernel} conv + pool")
    return after_conv // 2


def smallest_image(kernels) -> int:
    """The side of the smallest square image a stack of conv + pool blocks with
    these kernel sizes accepts (4, 3, 2: 19 px; 4, 3: 11 px)."""
    size = 1
    while True:
        try:
            functools.reduce(conv_pool_size, kernels, size)
            return size
        except ValueError:
            size += 1


def check_image_shape(cfg: Config, shape, source: str):
    """Refuse images the KB and F_t cannot take before a model is built: both
    assume square inputs, and each conv + pool block needs at least 2 px."""
    if len(shape) != 3:                      # (L, F): sequences, no such limit
        return
    _, height, width = shape
    if height != width:
        raise DataError(f"{source}: images are {height}x{width} px; the KB and F_t take square "
                        "images: crop or pad them to a square")
    smallest = max(smallest_image(cfg.kb_kernels), smallest_image(cfg.fe_kernels))
    if height < smallest:
        raise DataError(f"{source}: images of {height}x{width} px are too small for the KB "
                        f"(--kb-kernels {' '.join(map(str, cfg.kb_kernels))}) and F_t "
                        f"(--fe-kernels {' '.join(map(str, cfg.fe_kernels))}): the smallest size "
                        f"they accept is {smallest}x{smallest} px. Use larger images, or smaller "
                        "or fewer kernels (with as many --kb-channels / --fe-channels)")


class FeatureExtractor(nn.Module):
    """F_t: the task's query network (one per task, frozen after step 1).

    conv k4 -> BN -> ReLU -> maxpool 2 -> conv k3 -> BN -> ReLU -> maxpool 2
    -> flatten -> linear -> ReLU. For 32x32x3: 32 -> 29 -> 14 -> 12 -> 6,
    flatten 32*6*6 = 1152 -> 128. 158,528 parameters. (ReLU and max-pool run
    in the other order: the same numbers, see KnowledgeBase.)
    """

    def __init__(self, in_shape, channels=(32, 32), kernels=(4, 3), out_dim=128):
        super().__init__()
        c, size, layers = in_shape[0], in_shape[1], []
        for c_out, k in zip(channels, kernels):
            layers += [nn.Conv2d(c, c_out, k), nn.BatchNorm2d(c_out), nn.MaxPool2d(2), nn.ReLU()]
            c, size = c_out, conv_pool_size(size, k)
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(c * size * size, out_dim)

    def forward(self, x):                       # x: (B, C, H, W)
        h = self.features(x).flatten(1)          # (B, 32*6*6)
        return F.relu(self.fc(h))                # (B, latent)


class KnowledgeBase(nn.Module):
    """KB: the shared CNN. Each block's channels are scaled by a mask.

    block l:  h_l = maxpool(relu(conv_l(h_{l-1}))) * m_l[:, :, None, None]
    then flatten -> linear -> ReLU -> dropout. No padding, no BN. For 32x32x3:
    32 -> 29 -> 14 -> 12 -> 6 -> 5 -> 2, flatten 256*2*2 = 1024 -> 128.
    339,520 parameters. masks=None means "all ones" (no masking).

    The code computes relu(maxpool(conv)): ReLU is monotonic, so it commutes
    with taking a maximum, and the gradient reaches the same input element
    either way (a test checks both are bit-identical). Pooling first applies
    ReLU, and its backward pass, to a quarter of the values: the meta-update
    runs ~15% faster (bench.py).

    noise: the dropout noise to use instead of nn.Dropout's own draw,
    bernoulli(1 - p) / (1 - p) of shape (B, latent); the meta-update draws it
    up front (draw_dropout_noise) so that every way of running the K
    meta-tasks (one after another or under vmap) uses the same.
    """

    def __init__(self, in_shape, channels=(64, 128, 256), kernels=(4, 3, 2),
                 out_dim=128, dropout=0.5):
        super().__init__()
        c, size = in_shape[0], in_shape[1]
        self.convs = nn.ModuleList()
        for c_out, k in zip(channels, kernels):
            self.convs.append(nn.Conv2d(c, c_out, k))
            c, size = c_out, conv_pool_size(size, k)
        self.fc = nn.Linear(c * size * size, out_dim)
        self.dropout = nn.Dropout(dropout)

    @staticmethod
    def conv_relu_pool(conv, h):
        return F.relu(F.max_pool2d(conv(h), 2))   # = maxpool(relu(conv(h))), see above

    def forward(self, x, masks=None, noise=None):    # x: (B, C, H, W)
        h = x
        for l, conv in enumerate(self.convs):
            h = self.conv_relu_pool(conv, h)      # (B, c_l, s_l, s_l)
            if masks is not None:
                h = h * masks[l][:, :, None, None]   # m_l: (B, c_l), one scale per image and channel
        h = F.relu(self.fc(h.flatten(1)))         # (B, latent); the final linear layer is not masked
        return self.dropout(h) if noise is None else h * noise


class MaskGenerator(nn.Module):
    """M_t: three independent linear layers, query -> one mask per KB block.

    latent -> 64, latent -> 128, latent -> 256, each followed by the mask
    activation (ReLU: non-negative, unbounded; sigmoid: in (0, 1)).
    57,792 parameters for latent 128.
    """

    def __init__(self, latent=128, channels=(64, 128, 256), activation="relu", init="ones"):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(latent, c) for c in channels)
        self.activation = {"relu": F.relu, "sigmoid": torch.sigmoid}[activation]
        if init == "ones":
            # DEVIATION 3 (our choice; the authors keep PyTorch's default init, bias
            # near 0). With it, ReLU masks start around 0.1-0.2, so the three
            # masked blocks scale the KB's signal by ~0.002: the KB's output is
            # nearly constant, the gradient reaching M_t is tiny, weight decay
            # wins, and a task can stay at chance (we measured this on CIFAR-100
            # task 2: 20.0% after steps 3-5). A bias of 1 starts every mask near
            # the all-ones mask the KB was pre-trained with (step 2), so the
            # KB's signal passes at full strength from the first step.
            for layer in self.layers:
                nn.init.ones_(layer.bias)

    def forward(self, q):                        # q: (B, latent)
        return [self.activation(layer(q)) for layer in self.layers]   # [(B, 64), (B, 128), (B, 256)]


class PerTask(nn.ModuleList):
    """One module per task; forward(x, t) runs task t's module.

    Living in a ModuleList means state_dict(), .to(device), .eval() and
    parameter counts cover every task's module.
    """

    def forward(self, x, t):
        return self[t](x)

    def task_parameters(self, t):
        return list(self[t].parameters())

    def task_module(self, t):
        """The module that runs for task t (set to train mode while t trains)."""
        return self[t]


# -- the sequence family (MarketCL, the course report) -------------------------

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


# ---------------------------------------------------------------------------
# SupSup extension: one shared mask generator and head, per-task supermasks
# (Wortsman et al. 2020, arXiv:2006.14769; the course report)
# ---------------------------------------------------------------------------

class StraightThrough(torch.autograd.Function):
    """Forward: the binary mask. Backward: the gradient passes unchanged to the
    scores (the binarisation has zero gradient almost everywhere otherwise)."""

    @staticmethod
    def forward(ctx, scores, mask):
        return mask

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def binarize(scores: torch.Tensor, how: str, density: float) -> torch.Tensor:
    """Real-valued scores -> a {0, 1} mask of the same shape.

    topk (SupSup): keep the `density` fraction of weights with the largest
      |score| in this layer; the mask has exactly round(density * n) ones,
      whatever the scores' scale (training cannot grow or shrink it).
    sign (the report): keep the weights with score >= 0; the density is
      whatever training makes it, and weight decay, which pulls scores
      towards 0, can flip weights in and out.
    """
    if how == "sign":
        mask = (scores >= 0).to(scores.dtype)
    else:
        k = round(density * scores.numel())
        mask = torch.zeros_like(scores).flatten()
        mask[scores.abs().flatten().topk(k).indices] = 1
        mask = mask.view_as(scores)
        # The mask is a function of |score|: the gradient reaches the score
        # through abs(), i.e. times sign(score), so a weight the loss wants
        # switched on has its |score| raised (as edge-popup / SupSup do).
        return StraightThrough.apply(scores.abs(), mask)
    return StraightThrough.apply(scores, mask)


class SupermaskLinear(nn.Module):
    """y = x @ (W * mask_t)^T with W fixed at random signed constants.

    W = +-sqrt(2 / fan_in) (a buffer: never trained, stored once); each task t
    owns real-valued scores of W's shape, and mask_t = binarize(scores_t).
    Only task t's scores are a trainable parameter while task t trains; a
    task's mask can be stored as bits (pack_mask) and used instead of its
    scores (forward(..., mask=...)) with exactly the same output.
    """

    def __init__(self, in_features, out_features, num_tasks, how="topk", density=0.5):
        super().__init__()
        sign = torch.randint(0, 2, (out_features, in_features)) * 2.0 - 1.0
        self.register_buffer("weight", sign * math.sqrt(2.0 / in_features))
        self.scores = nn.ParameterList(
            nn.Parameter(nn.init.kaiming_uniform_(torch.empty(out_features, in_features), a=math.sqrt(5)))
            for _ in range(num_tasks))
        self.how, self.density = how, density

    def mask(self, t):
        return binarize(self.scores[t], self.how, self.density)

    def forward(self, x, t, mask=None):             # x: (B, in) -> (B, out)
        return F.linear(x, self.weight * (self.mask(t) if mask is None else mask))

    def pack_mask(self, t) -> torch.Tensor:
        """Task t's mask as bits: uint8, 1 bit per weight (numel / 8 bytes)."""
        bits = self.mask(t).detach().flatten().to(torch.uint8).cpu().numpy()
        return torch.from_numpy(np.packbits(bits))

    def unpack_mask(self, packed: torch.Tensor) -> torch.Tensor:
        bits = np.unpackbits(packed.numpy(), count=self.weight.numel())
        return torch.from_numpy(bits).to(self.weight).view_as(self.weight)


class SupSupMaskGenerator(nn.Module):
    """One mask generator for all tasks: three SupermaskLinear layers
    (latent -> 64, 128, 256) + the mask activation; task t uses its supermask."""

    def __init__(self, latent, channels, num_tasks, activation, how, density, offset=1.0):
        super().__init__()
        self.layers = nn.ModuleList(SupermaskLinear(latent, c, num_tasks, how, density)
                                    for c in channels)
        self.activation = {"relu": F.relu, "sigmoid": torch.sigmoid}[activation]
        # Supermask layers have no bias; a fixed offset plays the role of
        # MaskGenerator's bias of 1 (masks start near all-ones, see there).
        self.offset = offset

    def forward(self, q, t):                         # q: (B, latent) -> [(B, c_l)]
        return [self.activation(layer(q, t) + self.offset) for layer in self.layers]

    def task_parameters(self, t):
        return [layer.scores[t] for layer in self.layers]

    def task_module(self, t):
        return self


class SupSupHead(nn.Module):
    """One classifier for all tasks: latent -> max classes, with per-task
    supermasks; task t reads the first k_t outputs."""

    def __init__(self, latent, classes_per_task, how, density):
        super().__init__()
        self.classes = list(classes_per_task)
        self.layer = SupermaskLinear(latent, max(self.classes), len(self.classes), how, density)

    def forward(self, z, t):                         # z: (B, latent) -> (B, k_t)
        return self.layer(z, t)[:, :self.classes[t]]

    def task_parameters(self, t):
        return [self.layer.scores[t]]

    def task_module(self, t):
        return self


class MARKNet(nn.Module):
    """The whole MARK model for a stream of T tasks.

    kbs:              [KB] shared (or one per task for Baseline 4)
    extractors:       F_0 .. F_{T-1}      (only if masks=True)
    mask_generators:  M_0 .. M_{T-1}      (only if masks=True)
    heads:            C_0 .. C_{T-1}, C_t: latent -> classes of task t

    The same class builds the baselines: masks=False drops F and M (Baselines
    1, 2, 4), kb_per_task=True gives every task its own KB (Baseline 4).
    cfg.supsup replaces the per-task M_t and C_t by one SupSupMaskGenerator
    and one SupSupHead with per-task supermasks. Either way,
    mask_generators(q, t), heads(z, t) and .task_parameters(t) are task t's.
    """

    def __init__(self, in_shape, classes_per_task, cfg: Config, masks=True, kb_per_task=False,
                 labels=1):
        super().__init__()
        self.in_shape, self.cfg, self.use_masks = tuple(in_shape), cfg, masks
        T = len(classes_per_task)
        # labels > 1: every input carries several labels (MarketCL: 4 heads of 4
        # classes); a head then outputs labels x classes logits.
        self.labels = labels
        if len(in_shape) == 2:                 # (L, F): sequences, the LSTM family
            n_features = in_shape[1]
            query, channels, out = cfg.seq_query, cfg.seq_channels, cfg.seq_channels[-1]
            make_kb = lambda: SequenceKnowledgeBase(n_features, channels, cfg.dropout)
            make_fe = lambda: SequenceFeatureExtractor(n_features, query)
        else:                                  # (C, H, W): images, the authors' CNNs
            query, channels, out = cfg.latent, cfg.kb_channels, cfg.latent
            make_kb = lambda: KnowledgeBase(in_shape, channels, cfg.kb_kernels, out, cfg.dropout)
            make_fe = lambda: FeatureExtractor(in_shape, cfg.fe_channels, cfg.fe_kernels, query)
        self.kb_out, self.query_dim = out, query
        self.kbs = nn.ModuleList(make_kb() for _ in range(T if kb_per_task else 1))
        if masks:
            self.extractors = PerTask(make_fe() for _ in range(T))
            # Statistics of each task's training queries F_t(x), kept after
            # step 1 and used only to infer the task when no task id is given
            # (query_distance): per-class means (inf for a class with no
            # sample) and one within-class variance per query unit.
            self.register_buffer("query_means", torch.full((T, max(classes_per_task), query), math.inf))
            self.register_buffer("query_var", torch.ones(T, query))
        if masks and cfg.supsup:
            self.mask_generators = SupSupMaskGenerator(query, channels, T, cfg.mask_activation,
                                                       cfg.supsup_binarize, cfg.supsup_density,
                                                       offset=1.0 if cfg.mask_init == "ones" else 0.0)
        elif masks:
            self.mask_generators = PerTask(MaskGenerator(query, channels, cfg.mask_activation,
                                                         cfg.mask_init) for _ in range(T))
        outputs = [k * labels for k in classes_per_task]
        if cfg.supsup:
            self.heads = SupSupHead(out, outputs, cfg.supsup_binarize, cfg.supsup_density)
        else:
            self.heads = PerTask(nn.Linear(out, k) for k in outputs)
        # Inverse-frequency class weights per task and label (used when labels > 1).
        self.register_buffer("class_weights", torch.ones(T, labels, max(classes_per_task)))

    def kb(self, t) -> KnowledgeBase:
        return self.kbs[t if len(self.kbs) > 1 else 0]

    def new_head(self, num_classes, inputs=None) -> nn.Module:
        """A fresh, randomly initialised head (step 1's throwaway head on F_t's
        query, step 4's meta-task head on the KB's output)."""
        device = next(self.kbs[0].parameters()).device
        return nn.Linear(inputs or self.kb_out, num_classes * self.labels).to(device)

    def set_class_weights(self, t, y):
        """Inverse-frequency weights w_c = n / (k * n_c) per label from task t's
        training labels y (n, labels). A class absent from the data gets weight
        1: no sample carries it, so it never enters the loss either way."""
        if self.labels == 1:
            return
        k = self.class_weights.shape[2]
        counts = F.one_hot(y, k).sum(0).float()                       # (labels, k)
        weights = torch.where(counts > 0, len(y) / (k * counts.clamp_min(1)), torch.ones_like(counts))
        self.class_weights[t].copy_(weights)

    def loss(self, out, y, t):
        """Cross-entropy; with several labels, the mean over labels of the
        class-weighted cross-entropies (MarketCL)."""
        if self.labels == 1:
            return F.cross_entropy(out, y)
        out = out.view(len(y), self.labels, -1)                      # (B, labels, k)
        return torch.stack([F.cross_entropy(out[:, j], y[:, j], weight=self.class_weights[t, j])
                            for j in range(self.labels)]).mean()

    def predict(self, out):
        """Logits -> predicted classes: (B,) or (B, labels)."""
        return out.argmax(1) if self.labels == 1 else out.view(len(out), self.labels, -1).argmax(2)

    def masks(self, x, t, query=None):
        """m = M_t(F_t(x)): list of (B, c_l). `query` = a precomputed F_t(x)."""
        if not self.use_masks:
            return None
        if query is None:
            query = self.extractors(x, t)
        return self.mask_generators(query, t)

    def forward(self, x, t, query=None):         # x: (B, C, H, W) -> logits (B, k_t * labels)
        return self.heads(self.kb(t)(x, self.masks(x, t, query)), t)


def build_model(cfg: Config, in_shape, classes_per_task, device, **kwargs) -> MARKNet:
    model = MARKNet(in_shape, classes_per_task, cfg, **kwargs).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


# ---------------------------------------------------------------------------
# Training machinery shared by every step
# ---------------------------------------------------------------------------

class TrainingDiverged(RuntimeError):
    """A loss became NaN or infinite; the message names task, step and epoch."""


def freeze_all_but(model: nn.Module, params, train_modules, frozen_eval=True):
    """Freeze everything (eval mode, no gradient), then unfreeze `params`.

    DEVIATION 2. Frozen modules must be in eval mode: the authors' code left
    them in train mode, so F_t's batch-norm statistics kept updating after
    step 1 and the frozen KB's dropout stayed on. frozen_eval=False
    (--no-frozen-eval, part of --authors-code) does the same.
    """
    model.train(not frozen_eval)
    model.requires_grad_(False)
    for module in train_modules:
        module.train()
    for p in params:
        p.requires_grad_(True)


def fit(model, cfg: Config, gen, n, loss_of_batch, *, params, train_modules, epochs, lr,
        where: str, clip: bool):
    """Plain mini-batch SGD (momentum, weight decay, gradient clipping) on `params`.

    The optimizer holds only `params`; everything else is frozen. The loss is
    summed on the device and checked once per epoch (one host sync per epoch,
    not per batch); a non-finite loss stops the run with task, step and epoch.
    """
    freeze_all_but(model, params, train_modules, cfg.frozen_eval)
    opt = torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    device = params[0].device
    for epoch in range(epochs):
        total = torch.zeros((), device=device)
        for idx in batch_indices(n, cfg.batch_size, gen, device):
            loss = loss_of_batch(idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if clip and cfg.clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.clip)
            opt.step()
            total += loss.detach()
        if not torch.isfinite(total):
            raise TrainingDiverged(f"{where}, epoch {epoch + 1}/{epochs}: the loss is {total.item()}. "
                                   f"Try a smaller --lr or a sigmoid --mask-activation.")


@torch.no_grad()
def frozen_queries(model: MARKNet, t, x, chunk=1024):
    """DEVIATION 6 (same numbers, less arithmetic).
    F_t(x) for a whole split, once. F_t is frozen (eval mode) from step 1 on,
    so its output for an image never changes: steps 3-5 reuse it instead of
    recomputing it in every epoch (same numbers, less arithmetic)."""
    model.extractors[t].eval()
    return torch.cat([model.extractors(xb, t) for xb in x.split(chunk)])


# ---------------------------------------------------------------------------
# The five steps of training one task (the paper; the authors' code)
# ---------------------------------------------------------------------------

def step1_feature_extractor(model: MARKNet, t, task: Task, cfg: Config, gen):
    """Step 1. "Train F_t with a throwaway linear head (128->5) for 50 epochs at
    the task learning rate, gradient-norm clipping 0.5. Then freeze F_t."

    Returns F_t(x) of the training set (frozen from now on, so steps 3-5 reuse
    it) and keeps its mean and std for task inference.
    """
    fe, probe = model.extractors[t], model.new_head(task.num_classes, inputs=model.query_dim)
    x, y = task.train.x, task.train.y
    fit(model, cfg, gen, len(y), lambda i: model.loss(probe(fe(x[i])), y[i], t),
        params=[*fe.parameters(), *probe.parameters()], train_modules=[fe, probe],
        epochs=cfg.epochs_fe, lr=cfg.lr, where=f"task {t}, step 1 (feature extractor)", clip=True)
    fe.eval().requires_grad_(False)          # frozen for good: eval mode, no gradient
    query = frozen_queries(model, t, x)
    record_query_statistics(model, t, query, y)
    return query


@torch.no_grad()
def record_query_statistics(model: MARKNet, t, query, y):
    """Keep the per-class means of task t's training queries and their
    within-class variance per unit (floored at 1% of the mean variance, so a
    unit that is dead on the training data cannot dominate a distance).
    (k + 1) x latent numbers per task. With several labels (MarketCL) the
    classes of the first label are used."""
    y = y if y.dim() == 1 else y[:, 0]
    k = model.query_means.shape[1]
    counts = torch.bincount(y, minlength=k).to(query.dtype)                     # (k,)
    sums = torch.zeros(k, query.shape[1], device=query.device).index_add_(0, y, query)
    means = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None],
                        torch.full_like(sums, math.inf))                         # no sample: never nearest
    var = (query - means[y]).pow(2).mean(0)
    model.query_means[t].copy_(means)
    model.query_var[t].copy_(var.clamp_min(0.01 * float(var.mean()) + 1e-12))


def step2_pretrain_kb(model: MARKNet, t, task: Task, cfg: Config, gen):
    """Step 2. "First task only: pre-train the KB. Train KB + C_0 with no masks
    (all ones) for 50 epochs. This is the only ordinary training the KB gets."

    Baselines 1, 2 and 4 call this on every task (no masks at all).
    """
    kb = model.kb(t)
    x, y = task.train.x, task.train.y
    fit(model, cfg, gen, len(y), lambda i: model.loss(model.heads(kb(x[i]), t), y[i], t),
        params=[*kb.parameters(), *model.heads.task_parameters(t)],
        train_modules=[kb, model.heads.task_module(t)],
        epochs=cfg.epochs_kb, lr=cfg.lr, where=f"task {t}, step 2 (KB pre-training)",
        clip=cfg.clip_every_step)            # DEVIATION 4: the authors clip in step 1 only


def train_masks_and_head(model: MARKNet, t, task: Task, cfg: Config, gen, query, *,
                         epochs, lr, where, train_kb=False):
    """Train M_t and C_t with the masks applied, F_t frozen (its queries
    precomputed). Models without masks (Baseline 2) train C_t alone; train_kb
    adds the KB (Baseline 3: the KB trained conventionally, with masks)."""
    x, y = task.train.x, task.train.y
    params, modules = model.heads.task_parameters(t), [model.heads.task_module(t)]
    if model.use_masks:
        mg = model.mask_generators
        params, modules = params + mg.task_parameters(t), modules + [mg.task_module(t)]
    if train_kb:
        params, modules = params + list(model.kb(t).parameters()), modules + [model.kb(t)]
    q = (lambda i: None) if query is None else (lambda i: query[i])
    fit(model, cfg, gen, len(y), lambda i: model.loss(model(x[i], t, q(i)), y[i], t),
        params=params, train_modules=modules, epochs=epochs, lr=lr, where=where,
        clip=cfg.clip_every_step)            # DEVIATION 4: the authors clip in step 1 only


def step3_masks_and_head(model, t, task, cfg, gen, query):
    """Step 3. "Masks and head. Train M_t and C_t, KB frozen, 50 epochs." """
    train_masks_and_head(model, t, task, cfg, gen, query, epochs=cfg.epochs_masks, lr=cfg.lr,
                         where=f"task {t}, step 3 (masks + head)")


def step5_consolidate(model, t, task, cfg, gen, query):
    """Step 5. "Consolidation. Train M_t and C_t again, KB frozen, 50 epochs with
    a new optimizer." (fit() always builds a new optimizer.) DEVIATION 7: the
    authors' 50 epochs at the task rate; the report used 30-40 epochs at
    learning rate 0.05: --epochs-consolidate / --lr-consolidate.
    """
    train_masks_and_head(model, t, task, cfg, gen, query, epochs=cfg.epochs_consolidate,
                         lr=cfg.lr_consolidate, where=f"task {t}, step 5 (consolidation)")


# -- step 4: the meta-update ------------------------------------------------

def sgd_momentum(params: dict, grads: dict, bufs: dict, lr, momentum, weight_decay):
    """torch.optim.SGD's update, written out as a pure function (no dampening):
    buf' = momentum * buf + (g + wd * p);  p' = p - lr * buf'
    (buf starts at zero, so the first buf' is g + wd * p, as in torch.optim.SGD).
    Returns the new (params, bufs); the inputs are not changed, so the same
    code runs for one meta-task and for K of them under torch.func.vmap.
    p' is written into a clone of p so that it keeps p's exact strides: a
    convolution picks its algorithm from the weight's memory layout, and a
    1-channel weight is both contiguous and channels-last, a tie that a new
    tensor would break the other way (last-bit differences in later steps)."""
    bufs = {k: bufs[k] * momentum + (grads[k] + weight_decay * p) for k, p in params.items()}
    return {k: p.clone().sub_(lr * bufs[k]) for k, p in params.items()}, bufs


def meta_task_loss(model: MARKNet, t, kb: dict, head: dict, x, y, masks, noise):
    """Loss of a KB copy and a head given as plain tensors (name -> tensor):
    the KB's forward with these weights (torch.func.functional_call), masks
    fixed, dropout noise given (see draw_dropout_noise)."""
    z = functional_call(model.kb(t), kb, (x, masks), {"noise": noise})     # (B, latent)
    return model.loss(F.linear(z, head["weight"], head["bias"]), y, t)


def meta_task_accuracy(model: MARKNet, t, kb: dict, head: dict, x, y, masks, noise=None):
    """acc_i: the adapted copy's accuracy on its batch. DEVIATION 5: with
    dropout off (noise=None; the KB is in eval mode throughout step 4, our
    choice); the authors' code measures it with dropout on (noise given,
    --meta-acc-dropout)."""
    z = functional_call(model.kb(t), kb, (x, masks), {"noise": noise})
    return (model.predict(F.linear(z, head["weight"], head["bias"])) == y).float().mean()


def inner_step(model: MARKNet, t, cfg: Config, kb, head, kb_buf, head_buf, x, y, masks, noise):
    """One inner SGD step of one meta-task: gradient of its loss with respect
    to the KB copy and the head (torch.func.grad), then SGD with momentum at
    the meta rates. A pure function of tensors: adapt() runs it as is for one
    meta-task, or under torch.func.vmap for K at once. The new weights carry
    no autograd history, so memory does not grow with the number of steps."""
    g_kb, g_head = grad(meta_task_loss, argnums=(2, 3))(model, t, kb, head, x, y, masks, noise)
    sgd = partial(sgd_momentum, lr=cfg.meta_inner_lr, momentum=cfg.momentum,
                  weight_decay=cfg.meta_inner_weight_decay)
    kb, kb_buf = sgd(kb, g_kb, kb_buf)
    head, head_buf = sgd(head, g_head, head_buf)
    return kb, head, kb_buf, head_buf


def draw_dropout_noise(model: MARKNet, cfg: Config, batch_size, device):
    """The dropout noise of one meta-task's inner steps, (steps, B, latent)
    (one more row with --meta-acc-dropout), or None without dropout. Dropout is active in the inner loop (the authors'
    code). The noise is what nn.Dropout draws in training mode on the CPU,
    bernoulli(1 - p) / (1 - p); step 4 draws it for the K meta-tasks in the
    order a plain loop over them would, so the loop and vmap use the same
    noise, and the loop gives the same numbers as drawing inside it did."""
    p = cfg.dropout
    if p == 0:
        return None
    # One draw per step, of one step's shape: a single (steps, B, latent) draw
    # would take other random numbers from the generator. With
    # --meta-acc-dropout one more draw, for acc_i (DEVIATION 5).
    draws = cfg.meta_inner_steps + cfg.meta_acc_dropout
    return torch.stack([torch.empty(batch_size, model.kb_out, device=device).bernoulli_(1 - p).div_(1 - p)
                        for _ in range(draws)])


def adapt(model: MARKNet, t, cfg: Config, kb: dict, head: dict, x, y, masks, noise, batched=False):
    """Adapt a KB copy and a fresh head to one batch: `meta_inner_steps` inner
    steps, masks fixed, dropout noise[s] in step s. Returns the adapted KB
    weights theta_i' and the adapted copy's accuracy acc_i on its batch.

    batched=True: every tensor carries a leading dimension of K meta-tasks
    (kb, head, x, y, masks and noise stacked) and the same inner_step runs
    under torch.func.vmap: one large computation instead of K small ones (GPU).
    """
    step = partial(inner_step, model, t, cfg)
    accuracy = partial(meta_task_accuracy, model, t)
    if batched and noise is not None:
        noise = noise.transpose(0, 1)                                   # (steps, K, B, latent)
    acc_noise = noise[cfg.meta_inner_steps] if cfg.meta_acc_dropout and noise is not None else None
    if batched:
        dim = lambda v: None if v is None else 0          # None: the same for every meta-task
        step = vmap(step, in_dims=(0, 0, 0, 0, 0, 0, dim(masks), dim(noise)))
        accuracy = vmap(accuracy, in_dims=(0, 0, 0, 0, dim(masks), dim(acc_noise)))
    kb_buf = {k: torch.zeros_like(v) for k, v in kb.items()}
    head_buf = {k: torch.zeros_like(v) for k, v in head.items()}
    for s in range(cfg.meta_inner_steps):
        kb, head, kb_buf, head_buf = step(kb, head, kb_buf, head_buf, x, y, masks,
                                          None if noise is None else noise[s])
    return kb, accuracy(kb, head, x, y, masks, acc_noise)


def adapt_all(model: MARKNet, t, cfg: Config, impl, theta, heads, xs, ys, masks, noises):
    """The K meta-tasks of one outer step: K heads, batches, masks and noises
    in; K adapted KBs and their K accuracies out. The meta-tasks are
    independent; both impls give the same numbers (a test checks it):
      loop     one after another.
      vmap     as one batched computation (torch.func.vmap), for GPUs.
    """
    jobs = list(zip(heads, xs, ys, masks, noises))
    run = lambda job: adapt(model, t, cfg, theta, *job)
    if impl == "vmap":
        stack = lambda trees: {k: torch.stack([tree[k] for tree in trees]) for k in trees[0]}
        stacked_masks = None if masks[0] is None else [torch.stack(m) for m in zip(*masks)]  # [(K, B, c_l)]
        stacked_noise = None if noises[0] is None else torch.stack(noises)      # (K, steps, B, latent)
        adapted, accs = adapt(model, t, cfg, stack([theta] * len(jobs)), stack(heads),
                              torch.stack(xs), torch.stack(ys), stacked_masks, stacked_noise,
                              batched=True)
        return [{k: v[i] for k, v in adapted.items()} for i in range(len(jobs))], accs
    results = [run(job) for job in jobs]
    return [a for a, _ in results], torch.stack([acc for _, acc in results])


def resolve_meta_impl(cfg: Config, x) -> str:
    """--meta-impl auto: vmap on CUDA, the loop on a CPU (where vmap's batched
    convolutions are slower). Sequences (MarketCL, data.Sequences) always run
    the loop: vmap needs plain tensors."""
    if not isinstance(x, torch.Tensor):
        return "loop"
    if cfg.meta_impl != "auto":
        return cfg.meta_impl
    return "vmap" if x.is_cuda else "loop"


@torch.no_grad()
def step4_meta_update(model: MARKNet, t, task: Task, cfg: Config, gen, query=None):
    """Step 4. Meta-update of the KB (the paper's metalearning step; the authors' code).

    For each of `meta_epochs` outer steps:
      for i = 1..K: take the next mini-batch of the shuffled training data;
        copy the KB, attach a fresh head, run `meta_inner_steps` SGD steps on
        that one batch (masks from the frozen F_t, M_t); record
        delta_i = theta_i' - theta and the accuracy acc_i of the adapted copy;
      w_i = acc_i / sum_j acc_j                      (accuracy weighting)
      g   = sum_i w_i * delta_i / K                  (note the explicit 1/K)
      theta <- theta + sign * eps * g - eps * wd * theta    (one SGD-like step)

    THE SIGN QUESTION (DEVIATION 1). The authors' code writes g into .grad and calls an SGD
    step, i.e. theta <- theta - eps * g: it moves the KB AWAY from the adapted
    weights. Reptile moves TOWARDS them, theta <- theta + eps * g. Our default
    is Reptile's direction (sign = +1); --meta-sign authors gives sign = -1.
    With eps = 0.001 and the 1/K factor the KB barely moves either way.

    query: F_t(x) of the training set, precomputed (None for models without
    masks, i.e. Baseline 2). DEVIATION 6: the masks of a batch are computed once per
    meta-task: F_t and M_t are frozen, so they would be the same on every
    inner step.
    """
    kb = model.kb(t)
    x, y = task.train.x, task.train.y
    sign = {"reptile": +1.0, "authors": -1.0}[cfg.meta_sign]
    impl = resolve_meta_impl(cfg, x)
    model.train(not cfg.frozen_eval)   # F_t, M_t frozen; DEVIATION 2: the authors' stay in train mode
    kb.eval()                          # the KB's dropout in step 4 comes as explicit noise
    for _ in range(cfg.meta_epochs):
        theta = {k: v.detach() for k, v in kb.named_parameters()}
        # The next K mini-batches of the shuffled data (a new pass if needed).
        batches = []
        while len(batches) < cfg.meta_k:
            batches += [i for i in batch_indices(len(y), cfg.batch_size, gen, x.device)
                        if len(i) == cfg.batch_size or len(y) < cfg.batch_size]
        batches = batches[:cfg.meta_k]
        masks = [model.masks(x[i], t, None if query is None else query[i]) for i in batches]
        heads = [{k: v.detach() for k, v in model.new_head(task.num_classes).named_parameters()}
                 for _ in batches]
        noises = [draw_dropout_noise(model, cfg, len(i), x.device) for i in batches]
        adapted, accs = adapt_all(model, t, cfg, impl, theta, heads, [x[i] for i in batches],
                                  [y[i] for i in batches], masks, noises)
        deltas = [{k: a[k] - theta[k] for k in theta} for a in adapted]
        weights = meta_weights(accs)
        apply_meta_step(kb, deltas, weights, sign, cfg.meta_outer_lr, cfg.meta_outer_weight_decay)


def meta_weights(accs: torch.Tensor) -> torch.Tensor:
    """w_i = acc_i / sum_j acc_j; uniform if every accuracy is zero."""
    total = accs.sum()
    uniform = torch.full_like(accs, 1.0 / len(accs))
    return torch.where(total > 0, accs / total.clamp_min(1e-12), uniform)


@torch.no_grad()
def apply_meta_step(kb: nn.Module, deltas, weights, sign, eps, weight_decay):
    """theta <- theta + sign * eps * g - eps * wd * theta, g = sum_i w_i delta_i / K.

    This is one SGD step without momentum on the "gradient" -sign * g with
    weight decay wd (SGD: p <- p - eps * (grad + wd * p))."""
    K = len(deltas)
    for name, p in kb.named_parameters():
        g = sum(w * d[name] for w, d in zip(weights, deltas)) / K
        p.mul_(1 - eps * weight_decay).add_(sign * eps * g)


# ---------------------------------------------------------------------------
# One task, MARK's way (baselines.py composes the same steps differently)
# ---------------------------------------------------------------------------

def train_task_mark(model, t, task, cfg, gen, timer, *, meta=True):
    """Steps 1-5 for task t. meta=False is the frozen-KB ablation.

    Step 2 runs on the stream's first task, task.index == 0. In a task list
    that is t == 0; in MarketCL t is the symbol, which comes back every day,
    and task.index counts symbol-days, so only the very first one pre-trains.
    """
    with timer("1 feature extractor"):
        query = step1_feature_extractor(model, t, task, cfg, gen)
    if not cfg.frozen_eval:
        # DEVIATION 2 undone: F_t stays in train mode, so its output depends on
        # the batch and its batch-norm statistics move; run it on every batch.
        query = None
    if task.index == 0:
        with timer("2 KB pre-training"):
            step2_pretrain_kb(model, t, task, cfg, gen)
    with timer("3 masks + head"):
        step3_masks_and_head(model, t, task, cfg, gen, query)
    if meta:
        with timer("4 meta-update"):
            step4_meta_update(model, t, task, cfg, gen, query)
    with timer("5 consolidation"):
        step5_consolidate(model, t, task, cfg, gen, query)


@torch.inference_mode()
def evaluate(model: MARKNet, t, split, chunk=1000) -> float:
    """Accuracy (a fraction) of task t's model (F_t, M_t, KB, C_t, eval mode)."""
    model.eval()
    correct = sum((model.predict(model(xb, t)) == yb).sum() for xb, yb in
                  zip(split.x.split(chunk), split.y.split(chunk)))
    return float(correct) / split.y.numel()       # several labels: the mean over labels


def normalised_entropy(logits):
    """Mean entropy of the softmax over a batch, divided by log k (in [0, 1])."""
    logp = F.log_softmax(logits, 1)
    return -(logp.exp() * logp).sum(1).mean() / math.log(logits.shape[1])


def query_distance(model: MARKNet, xb, t):
    """How unlike task t's training queries F_t(xb) are: for each image, the
    squared distance to the NEAREST class mean of task t's training queries,
    per unit in units of the within-class variance; the mean over the batch.

    Why class means and not one mean: F_t is trained to separate task t's
    classes, so its queries form one cluster per class. A single Gaussian
    around the overall mean calls the empty middle between the clusters the
    most typical place, and an unfamiliar image, which excites no class's
    features, lands exactly there: that score picked a wrong task for every
    test batch of CIFAR-100 and glyphs (measured). The nearest class mean is
    the Mahalanobis-style score of Lee et al. (2018) with a diagonal covariance.
    """
    q = model.extractors(xb, t)                                        # (B, D)
    d2 = ((q[:, None, :] - model.query_means[t]) ** 2 / model.query_var[t]).mean(2)   # (B, k)
    return d2.min(1).values.mean()


@torch.inference_mode()
def evaluate_without_task_id(model: MARKNet, tasks, batch_size=128) -> dict:
    """Task-agnostic evaluation (beyond the report): the task id is not given.

    Each test batch (all from one task u) is assigned the task t that scores
    best among all learned tasks, then classified with task t's model; a wrong
    task means a wrong label space, so every image of that batch is an error.
    Two scores, both reported:
      entropy: run every task's full model (F_t, M_t, KB, C_t) and take the
        most confident one (lowest mean normalised entropy). T full forward
        passes per batch. ReLU networks are confidently wrong far from their
        training data, so this can fail even on easy streams.
      query: how far F_t(x) lies from the nearest class mean of task t's
        training queries, in units of their within-class std (statistics kept
        after step 1: (k + 1) x latent numbers per task; see query_distance).
        T feature-extractor passes + 1 full pass per batch.

    SupSup's one-shot alternative (superpose all masks with weights alpha and
    follow the gradient of the entropy w.r.t. alpha) needs one network whose
    only task-specific parts are masks. MARK keeps a feature extractor per
    task, so its queries, and hence its masks, cannot be superposed; the same
    two scores serve MARK and MARK + SupSup.
    """
    model.eval()
    T = len(tasks)
    names = ("entropy", "query") if model.use_masks else ("entropy",)   # baselines have no F_t
    tally = {name: {"hits": 0, "correct": 0} for name in names}
    batches = seen = 0
    for u, task in enumerate(tasks):
        for xb, yb in zip(task.test.x.split(batch_size), task.test.y.split(batch_size)):
            logits = [model(xb, t) for t in range(T)]
            guesses = {"entropy": int(torch.stack([normalised_entropy(lg) for lg in logits]).argmin())}
            if model.use_masks:
                guesses["query"] = int(torch.stack([query_distance(model, xb, t) for t in range(T)]).argmin())
            for name, guess in guesses.items():
                if guess == u:
                    tally[name]["hits"] += 1
                    tally[name]["correct"] += int((logits[u].argmax(1) == yb).sum())
            batches, seen = batches + 1, seen + len(yb)
    return {name: {"task_inference_accuracy": c["hits"] / batches,
                   "accuracy_inferred_task": c["correct"] / seen,
                   "forward_passes_per_batch": f"{T} full" if name == "entropy" else f"{T} F_t + 1 full"}
            for name, c in tally.items()} | {"batch_size": batch_size}


# ---------------------------------------------------------------------------
# Runs: seeds, timing, progress, results.json, checkpoints, resume
# ---------------------------------------------------------------------------

def device_flag(text: str) -> str:
    """argparse type of --device: auto, cpu, cuda or cuda:N of a device torch sees."""
    if text == "auto":
        return text
    try:
        kind = torch.device(text).type
    except RuntimeError:
        kind = None
    if kind not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; use auto, cpu, cuda or cuda:N")
    if kind == "cuda" and (torch.device(text).index or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text}: torch sees {torch.cuda.device_count()} CUDA "
                                         "device(s) here; use --device cpu or --device auto")
    return text


def resolve_device(name: str) -> torch.device:
    """--device as a torch.device; auto: CUDA if torch sees a device, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def keep_freed_memory() -> bool:
    """Let glibc's malloc keep freed memory for reuse instead of returning it
    to the operating system at once (Linux only; elsewhere nothing happens).

    By default glibc maps large blocks (an activation of batch 128 is up to
    28 MB) fresh from the system and gives freed memory back, so training
    steps keep page-faulting their activations in again, and the kernel
    zeroes every new page. Measured side by side on a 2-core CPU (bench.py,
    each variant in a fresh process): one meta-epoch took 21.7 s with this
    setting and 31.2 s without (medians of 2). Memory freed stays with the
    process (up to 1 GB above what is in use). Changes no number. Returns
    whether it applied.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3            # glibc's malloc.h
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 64 * 2**20) and libc.mallopt(M_TRIM_THRESHOLD, 2**30))


def use_deterministic_kernels():
    """Make every kernel deterministic, so that a run (and a resumed run) gives
    the same numbers every time on the same GPU, driver and torch version.

    On the CPU the kernels mark_min uses are deterministic already (for a
    fixed number of threads). On CUDA, cuDNN picks convolution algorithms by
    benchmark and some of them accumulate in a varying order; cuBLAS needs a
    fixed workspace. Costs speed on CUDA (not measured here: no GPU)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")   # read when cuBLAS starts
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def seed_everything(seed: int):
    """One seed for python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def log_line(*parts):
    """print, flushed at once: a run's progress reaches a log file (nohup,
    `> run.log`) as it happens, not in blocks of several kilobytes."""
    print(*parts, flush=True)


class StepTimer:
    """Times named steps and prints each one. CUDA is synchronised once per
    step (not per batch) so the times are real and the hot path stays async."""

    def __init__(self, device, log):
        self.device, self.log, self.current = device, log, {}

    @contextlib.contextmanager
    def __call__(self, name):
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        self.current[name] = self.current.get(name, 0.0) + seconds
        self.log(f"    step {name:<22s} {seconds:7.1f}s")


def atomic_write_json(path: Path, obj):
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def matrix_to_json(R: np.ndarray):
    return [[None if not math.isfinite(v) else float(v) for v in row] for row in R]


def run_summary(R: np.ndarray, done: int) -> dict:
    """ACC and BWT over the tasks finished so far (the top-left done x done block)."""
    if done == 0:
        return {"acc": None, "bwt": None}
    block = R[:done, :done]
    return {"acc": metrics.average_accuracy(block), "bwt": metrics.backward_transfer(block)}


def checkpoint_path(out: Path, method: str, seed: int) -> Path:
    """Where run_seed keeps the checkpoint of one method and seed."""
    return out / f"checkpoint_{method}_seed{seed}.pt"


def run_seed(cfg: Config, method: str, seed: int, tasks, train_task, model_kwargs, device,
             out: Path | None, log, on_task_done=None) -> dict:
    """Train `method` on the whole stream for one seed and fill the accuracy matrix.

    R[i][j] = test accuracy on task j after training task i (j <= i).
    After every task: results for this seed (via on_task_done) and a
    checkpoint (model, R, times, random generator states) are written, so an
    interruption loses at most the task in progress. With cfg.resume the run
    continues from the checkpoint and ends with exactly the results of an
    uninterrupted run (same seed, same device). The checkpoint and the
    record carry the run's identity; a checkpoint of another run is refused.
    """
    T = len(tasks)
    seed_everything(seed)
    labels = 1 if tasks[0].train.y.dim() == 1 else tasks[0].train.y.shape[1]
    model = build_model(cfg, tasks[0].input_shape, [task.num_classes for task in tasks], device,
                        labels=labels, **model_kwargs)
    gen = torch.Generator(device=device).manual_seed(seed)
    R = np.full((T, T), np.nan)
    identity = run_identity(cfg, method, seed)
    record = {"seed": seed, "method": method, "identity": identity, "tasks_done": 0,
              "parameters": sum(p.numel() for p in model.parameters()),
              "task_seconds": [], "step_seconds": []}
    ckpt = checkpoint_path(out, method, seed) if out else None
    if cfg.resume and ckpt and ckpt.exists():
        state = read_checkpoint(ckpt, identity)
        try:
            model.load_state_dict(state["model"])       # copied onto the model's device
        except RuntimeError:
            raise RunError(f"{ckpt} does not fit the model built from the data as it is now (same "
                           f"settings, so the data changed since the run started). Delete it to "
                           f"train seed {seed} again from its first task, or use another --out") from None
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if device.type == "cuda" and "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        R = state["R"].double().numpy()
        record = json.loads(state["record"])
        log(f"[{method} seed {seed}] resumed after task {record['tasks_done']}/{T}")
    started = time.perf_counter() - sum(record["task_seconds"])
    for t in range(record["tasks_done"], T):
        timer = StepTimer(device, log)
        log(f"[{method} seed {seed}] task {t + 1}/{T} (classes {', '.join(tasks[t].class_names)})")
        task_start = time.perf_counter()
        model.set_class_weights(t, tasks[t].train.y)
        train_task(model, t, tasks[t], cfg, gen, timer)
        for u in range(t + 1):
            R[t, u] = evaluate(model, u, tasks[u].test)
        record["task_seconds"].append(time.perf_counter() - task_start)
        record["step_seconds"].append(timer.current)
        record["tasks_done"] = t + 1
        record.update(run_summary(R, t + 1))
        record["acc_matrix"] = matrix_to_json(R)
        elapsed = time.perf_counter() - started
        left = elapsed / (t + 1) * (T - t - 1)
        log(f"    after task {t + 1}: acc on tasks 1..{t + 1} = "
            + " ".join(f"{100 * R[t, u]:.1f}" for u in range(t + 1))
            + f" | ACC {100 * record['acc']:.2f}%  BWT {100 * record['bwt']:+.2f}%"
            + f" | elapsed {elapsed / 60:.1f} min, ~{left / 60:.1f} min left")
        if ckpt:
            state = {"model": model.state_dict(), "generator": gen.get_state(),
                     "torch_rng": torch.get_rng_state(), "R": torch.from_numpy(R),
                     "record": json.dumps(record), "identity": identity}
            if device.type == "cuda":
                state["cuda_rng"] = torch.cuda.get_rng_state(device)
            torch.save(state, ckpt.with_suffix(".tmp"))
            os.replace(ckpt.with_suffix(".tmp"), ckpt)
        if on_task_done:
            on_task_done(record)
    if cfg.infer_task and "task_agnostic" not in record:
        agnostic = evaluate_without_task_id(model, tasks)
        record["task_agnostic"] = {**agnostic, "accuracy_given_task": record["acc"]}
        for name in [n for n in ("entropy", "query") if n in agnostic]:
            log(f"[{method} seed {seed}] without the task id ({name}): task inferred for "
                f"{100 * agnostic[name]['task_inference_accuracy']:.1f}% of test batches, accuracy "
                f"{100 * agnostic[name]['accuracy_inferred_task']:.2f}% (task given: {100 * record['acc']:.2f}%)")
        if on_task_done:
            on_task_done(record)
    return record


def run_finished(run: dict) -> bool:
    """Whether a run record covers its whole stream: every task of a task list,
    every training day of MarketCL."""
    if "days_done" in run:
        return run["days_done"] == run["training_days"]
    return run["tasks_done"] == len(run["acc_matrix"])


def summarize(runs, method: str) -> dict:
    """Mean and std of ACC and BWT over the FINISHED runs only: an interrupted
    run's ACC covers fewer tasks and does not compare. results.json and
    baselines.py's table both summarise with this; {} while none has finished."""
    finished = [run for run in runs if run_finished(run)]
    return metrics.summarize_runs(finished, method) if finished else {}


# -- the run folder (--out): checked before training, locked while written ---

class RunError(Exception):
    """A problem with the run folder (--out) or a file in it. The message names
    the file and says what to do; nothing in the folder has been changed."""


RESULTS_FILE = "results.json"
LOCK_FILE = ".lock"
CHECKPOINT_KEYS = {"model", "generator", "torch_rng", "R", "record"}
# Keys of every run record, and of a task-list run or of a MarketCL run.
RUN_KEYS = {"seed", "acc", "bwt", "parameters"}
RUN_KINDS = ({"tasks_done", "acc_matrix", "task_seconds"}, {"days_done", "training_days", "days"})


def read_results(path: Path) -> dict:
    """A results.json, checked to be one this program wrote (a JSON object with
    a list of run records); anything else is a RunError naming the file."""
    fix = "Move it aside (its runs cannot be used) or choose another --out"
    try:
        results = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RunError(f"{path} cannot be read ({err}); it was probably cut off while being "
                       f"written. {fix}") from None
    runs = results.get("runs") if isinstance(results, dict) else None
    if not (isinstance(runs, list) and all(
            isinstance(run, dict) and RUN_KEYS <= set(run) and isinstance(run["seed"], int)
            and any(kind <= set(run) for kind in RUN_KINDS) for run in runs)):
        raise RunError(f"{path} is not a results.json of this program (a list of runs, each with "
                       f"{', '.join(sorted(RUN_KEYS))} and its tasks or days). {fix}")
    return results


def check_identity(saved: dict | None, wanted: dict, where):
    """Refuse to continue (or merge with) a run saved with another identity."""
    if saved is None:
        raise RunError(f"{where} was written before runs recorded their settings, so they cannot be "
                       "checked against this command; start again in a new --out")
    saved = with_new_settings(saved)
    if saved != wanted:
        raise RunError(f"{where} ran with other settings than this command: "
                       f"{identity_differences(saved, wanted)}. Give the saved settings to continue "
                       "it, or use another --out")


def read_checkpoint(path: Path, identity: dict) -> dict:
    """The checkpoint of the run `identity`, or a RunError naming the file
    (damaged, empty, another program's, or another run's)."""
    fix = f"Delete it to train seed {identity['seed']} again from its first task, or use another --out"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:     # a damaged file: RuntimeError, EOFError, UnpicklingError, ...
        raise RunError(f"{path} cannot be read ({type(err).__name__}): it is damaged or not a "
                       f"checkpoint. {fix}") from None
    if not (isinstance(state, dict) and CHECKPOINT_KEYS <= set(state)):
        raise RunError(f"{path} is not a checkpoint of this program. {fix}")
    check_identity(state.get("identity"), identity, path)
    return state


def prepare_out(out: Path):
    """Create --out and prove it writable (a probe file written and removed),
    so that a bad folder stops the run before anything trains."""
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} is a file; --out takes a folder")
    probe = out / f".probe-{os.getpid()}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise RunError(f"cannot write to --out {out} ({err.strerror or err}); "
                       "give a folder you can write to") from None


@contextlib.contextmanager
def folder_lock(out: Path):
    """Hold OUT/.lock while this process writes into OUT: another run started
    meanwhile is refused, so two runs cannot overwrite each other's
    results.json. An flock rather than a lock file that exists while a run
    lives: the operating system releases it when the process ends, however it
    ends (Ctrl-C, a crash, SIGKILL), so there is no stale lock to detect or
    clean up. (fcntl: Linux and macOS.)"""
    with open(out / LOCK_FILE, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            raise RunError(f"{out} is being written by another run (process "
                           f"{lock.read().strip() or '?'}); wait for it to end, or use another "
                           "--out") from None
        lock.truncate(0)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        yield


def saved_runs(cfg: Config, method: str) -> dict:
    """The runs --out already holds, by seed, checked against this command.

    A folder that holds anything needs --resume (or --force, which replaces
    its results). With --resume, every saved run, of every seed, must have
    this command's identity (results.json merges runs by seed, so one of
    another identity would mix two configurations), and so must the
    checkpoint of every seed this command runs. Reads only."""
    out = Path(cfg.out)
    held = sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE) if out.is_dir() else []
    if not held or cfg.force:
        return {}
    if not cfg.resume:
        raise RunError(f"{out} already holds {', '.join(held[:6])}{' ...' if len(held) > 6 else ''}; "
                       "add --resume to continue its runs, --force to replace its results and "
                       "checkpoints, or choose a new --out")
    runs = {}
    if (out / RESULTS_FILE).exists():
        for run in read_results(out / RESULTS_FILE)["runs"]:
            check_identity(run.get("identity"), run_identity(cfg, method, run["seed"]),
                           f"{out / RESULTS_FILE} (seed {run['seed']})")
            runs[run["seed"]] = run
    for seed in range(cfg.seed, cfg.seed + cfg.runs):
        if checkpoint_path(out, method, seed).exists():
            read_checkpoint(checkpoint_path(out, method, seed), run_identity(cfg, method, seed))
    return runs


def replace_run_files(out: Path, log):
    """--force: remove the results.json and checkpoints (and their partial
    writes) an earlier run left in --out, and say which."""
    old = sorted([*out.glob(RESULTS_FILE + "*"), *out.glob("checkpoint_*")])
    if old:
        log(f"--force: replacing {', '.join(path.name for path in old)} in {out}")
    for path in old:
        path.unlink()


@contextlib.contextmanager
def open_results(cfg: Config, method: str, overridden, log, family=""):
    """What both run loops (task lists and MarketCL) start with: the device,
    the results dict of results.json, the runs --resume finds in --out (by
    seed), and save(run), which merges a run into the results by seed and
    writes results.json atomically. A seed this command does not run keeps
    its saved run. --out is created and checked before anything trains, and
    locked until the loop ends."""
    device = resolve_device(cfg.device)
    keep_freed_memory()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.deterministic:
        use_deterministic_kernels()
    out = Path(cfg.out) if cfg.out else None
    results = {"method": method, "schedule": describe_schedule(cfg, overridden),
               "config": dataclasses.asdict(cfg), "torch": torch.__version__,
               "device": str(device), "runs": [], "summary": {}}
    with contextlib.ExitStack() as stack:
        previous = {}
        if out:
            prepare_out(out)
            stack.enter_context(folder_lock(out))
            previous = saved_runs(cfg, method)
            if cfg.force:
                replace_run_files(out, log)
        log(f"{method} on {cfg.dataset}{f' ({family})' if family else ''}, device {device}, "
            f"torch {torch.__version__}")
        log(results["schedule"])
        runs_by_seed = dict(previous)

        def merge(run=None):
            if run:
                runs_by_seed[run["seed"]] = run
            results["runs"] = [runs_by_seed[seed] for seed in sorted(runs_by_seed)]
            results["summary"] = summarize(results["runs"], method)

        def save(run=None):
            merge(run)
            if out:
                atomic_write_json(out / RESULTS_FILE, results)

        merge()
        yield device, results, previous, save


def run_experiment(cfg: Config, method: str, train_task, model_kwargs, overridden=frozenset(),
                   log=log_line) -> dict:
    """Run `method` over seeds seed..seed+runs-1; write results.json after every task.
    The market datasets run the day-by-day protocol (run_market_experiment)."""
    if cfg.dataset in MARKET_DATASETS:
        return run_market_experiment(cfg, method, train_task, model_kwargs, overridden, log)
    out = Path(cfg.out) if cfg.out else None
    with open_results(cfg, method, overridden, log) as (device, results, previous, save):
        for seed in range(cfg.seed, cfg.seed + cfg.runs):
            old = previous.get(seed)
            if old and run_finished(old):
                # A finished run is not trained again. With --infer-task and no
                # task-agnostic result yet, its last checkpoint is evaluated
                # (run_seed resumes after the last task and trains nothing).
                ckpt = checkpoint_path(out, method, seed)
                wants_agnostic = cfg.infer_task and "task_agnostic" not in old
                if not (wants_agnostic and ckpt.exists()):
                    log(f"[{method} seed {seed}] already finished, skipped"
                        + (f" (no {ckpt.name} to evaluate without the task id)" if wants_agnostic else ""))
                    continue
            data_kwargs = {"path": cfg.path} if cfg.path else {}
            if cfg.dataset == "imagedata":
                try:        # imagedata.py imports data.py, never the reverse
                    import imagedata
                except ModuleNotFoundError as err:
                    if err.name != "imagedata":
                        raise
                    raise DataError("--dataset imagedata needs imagedata.py beside mark_min.py, "
                                    "and it is missing") from None
                tasks = imagedata.load_imagedata(cfg.data_dir, seed=seed, num_tasks=cfg.num_tasks,
                                                 device=device)
            else:
                tasks = load_tasks(cfg.dataset, data_dir=cfg.data_dir, seed=seed,
                                   num_tasks=cfg.num_tasks, device=device, **data_kwargs)
            check_image_shape(cfg, tasks[0].input_shape, cfg.path or cfg.dataset)
            if cfg.channels_last:
                for task in tasks:
                    for split in (task.train, task.val, task.test):
                        if isinstance(split.x, torch.Tensor) and split.x.dim() == 4:   # images: NHWC in memory
                            split.x = split.x.contiguous(memory_format=torch.channels_last)
            record = run_seed(cfg, method, seed, tasks, train_task, model_kwargs, device, out, log,
                              on_task_done=save)
            save(record)
            R = np.array([[np.nan if v is None else v for v in row] for row in record["acc_matrix"]])
            log(f"[{method} seed {seed}] accuracy matrix (%), row i = after task i:\n"
                + metrics.format_matrix(R))
            log(f"[{method} seed {seed}] ACC {100 * record['acc']:.2f}%  BWT {100 * record['bwt']:+.2f}%"
                f"  ({sum(record['task_seconds']) / 60:.1f} min)")
    s = results["summary"]
    log(f"{method}: ACC {100 * s['acc_mean']:.2f} (std {100 * s['acc_std']:.2f}) %, "
        f"BWT {100 * s['bwt_mean']:+.2f} %, over {s['runs']} run(s); {results['schedule']}")
    return results


# ---------------------------------------------------------------------------
# MarketCL: the day-by-day protocol of the course report
# ---------------------------------------------------------------------------
#
# Each stock symbol is a task with its own F_t, M_t and C_t; the KB is shared.
# A symbol's samples of one day (data.load_market: 16 prefixes of the day's
# feature sequence, four labels each) are its training set for that day. The
# same symbols come back every day: on day d + 1 symbol s trains again,
# continuing from its own modules of day d. Tests are on the NEXT day, the
# future the model is meant to predict. The model is the LSTM family of
# MARKNet with four label heads; the five steps and the baselines are the
# same functions as for images.

MARKET_CLASS_NAMES = ["stop first", "ends not above", "ends above", "target first"]  # data.market_labels


def load_market_stream(cfg: Config, seed: int, device) -> MarketStream:
    """cfg.dataset's MarketCL stream. market reads the CSVs at cfg.source;
    market-synthetic first writes its CSVs (a function of the seed) to
    DATA_DIR/market-synthetic-seed{seed}/, so both go through the same loader.
    num_tasks keeps the first N symbols, num_days the first N days."""
    if cfg.dataset == "market-synthetic":
        data_dir = Path(cfg.data_dir) if cfg.data_dir else default_data_dir()
        source = data_dir / MARKET_SYNTHETIC_FOLDER.format(seed=seed)
        write_synthetic_market(source, seed=seed)
    elif cfg.source is None:
        raise DataError("--dataset market needs --source: a minute-bar CSV file or a folder of them "
                        "(datetime,symbol,open,high,low,close,volume)")
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
def predict_classes(model: MARKNet, t, x, chunk=1000) -> torch.Tensor:
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


def market_summary(days: list[dict]) -> dict:
    """Per-label ACC, BWT and macro F1, each the mean over the days that have
    a matrix; acc and bwt: the mean of the per-label values over labels."""
    scored = [day for day in days if day["tested"]]
    if not scored:
        return {"acc": None, "bwt": None}
    keys = ("acc_per_label", "bwt_per_label", "macro_f1_per_label")
    per_label = {key: np.mean([day[key] for day in scored], axis=0).tolist() for key in keys}
    return per_label | {"acc": float(np.mean(per_label["acc_per_label"])),
                        "bwt": float(np.mean(per_label["bwt_per_label"]))}


def run_market_seed(cfg: Config, method: str, seed: int, stream: MarketStream, train_task,
                    model_kwargs, device, log, on_day_done=None) -> dict:
    """Train `method` on the MarketCL stream for one seed, day by day.

    For each training day d (every day but the last), tomorrow = day d + 1:
      for each symbol s with samples on day d, in stream order:
        train s on day d's samples (its own F_s, M_s, C_s; class weights from
        day d's labels; step 2 only on the run's very first symbol-day),
        then test every symbol of the day's matrix trained so far, on tomorrow.
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
    seed_everything(seed)
    S, P = len(stream.symbols), len(stream.label_pairs)
    first = next(split for row in stream.splits for split in row if split is not None)
    model = build_model(cfg, first.x.shape[1:], [MARKET_NUM_CLASSES] * S, device,   # (L, F)
                        labels=P, **model_kwargs)
    gen = torch.Generator(device=device).manual_seed(seed)
    D = len(stream.days) - 1                        # training days; the last day is only tested
    record = {"seed": seed, "method": method, "identity": run_identity(cfg, method, seed),
              "days_done": 0, "training_days": D,
              "parameters": count_parameters(model), "symbols": stream.symbols,
              "label_pairs": [list(pair) for pair in stream.label_pairs],
              "class_balance": stream.class_balance().tolist(),   # (P, 4) fractions: what chance is
              "acc": None, "bwt": None, "days": []}
    trained = 0                                     # symbol-days so far: the next task's index
    started = time.perf_counter()
    for d in range(D):
        today, tomorrow = stream.splits[d], stream.splits[d + 1]
        tested = [s for s in range(S) if today[s] is not None and tomorrow[s] is not None]
        R = np.full((P, len(tested), len(tested)), np.nan)          # R_d[h][i][j]
        timer, day_start = StepTimer(device, lambda _: None), time.perf_counter()
        for s in (s for s in range(S) if today[s] is not None):
            symbol_start = time.perf_counter()
            model.set_class_weights(s, today[s].y)
            train_task(model, s, market_task(trained, s, today[s]), cfg, gen, timer)
            trained += 1
            if s in tested:
                i = tested.index(s)
                for j, u in enumerate(tested[:i + 1]):
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
            day |= {"acc_per_label": [metrics.average_accuracy(R[h]) for h in range(P)],
                    "bwt_per_label": [metrics.backward_transfer(R[h]) for h in range(P)],
                    "macro_f1_per_label": [metrics.macro_f1(y[:, h], pred[:, h], MARKET_NUM_CLASSES)
                                           for h in range(P)],
                    "acc_matrices": [matrix_to_json(R[h]) for h in range(P)]}
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
    """A run's per-label ACC, BWT and macro F1 next to the class balance."""
    lines = [f"{'label (target, stop)':<22s}{'ACC %':>8s}{'BWT %':>8s}{'F1 %':>7s}"
             f"   class balance % (0 stop / 1 not above / 2 above / 3 target)"]
    for h, (target, stop) in enumerate(record["label_pairs"]):
        balance = " / ".join(f"{100 * f:.1f}" for f in record["class_balance"][h])
        lines.append(f"{h + 1} (+{target:.1%}, -{stop:.1%}){'':<5s}"
                     f"{100 * record['acc_per_label'][h]:>8.2f}{100 * record['bwt_per_label'][h]:>+8.2f}"
                     f"{100 * record['macro_f1_per_label'][h]:>7.1f}   {balance}")
    return "\n".join(lines)


def run_market_experiment(cfg: Config, method: str, train_task, model_kwargs,
                          overridden=frozenset(), log=log_line) -> dict:
    """run_experiment for MarketCL: the same results.json (config, torch,
    device, method, schedule, runs, summary), written after every day, so an
    interruption keeps the finished days. Resume is per seed only: --resume
    keeps the seeds that finished and runs an unfinished seed again from its
    first day (no checkpoints inside a seed)."""
    with open_results(cfg, method, overridden, log, "MarketCL") as (device, results, previous, save), \
            flush_denormals():
        for seed in range(cfg.seed, cfg.seed + cfg.runs):
            old = previous.get(seed)
            if old and run_finished(old):
                log(f"[{method} seed {seed}] already finished, skipped")
                continue
            stream = load_market_stream(cfg, seed, device)
            log(stream.summary())
            record = run_market_seed(cfg, method, seed, stream, train_task, model_kwargs, device,
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
    runs = {m: [r for r in res["runs"] if run_finished(r)] for m, res in results_by_method.items()}
    runs = {m: rs for m, rs in runs.items() if rs}
    if not runs:
        return "(no finished MarketCL run)"
    pairs = next(iter(runs.values()))[0]["label_pairs"]
    header = ([f"label {h + 1} (+{t:.1%}, -{s:.1%}) acc %" for h, (t, s) in enumerate(pairs)]
              + ["BWT % (mean over labels)", "runs", "wall time / run"])
    lines = ["| Method | " + " | ".join(header) + " |", "|" + "---|" * (len(header) + 1)]
    for m, rs in runs.items():
        summary = summarize(rs, m)
        acc = np.array([r["acc_per_label"] for r in rs])                       # (runs, P)
        cells = [f"{100 * a:.2f}" + (f" ({100 * sd:.2f})" if len(rs) > 1 else "")
                 for a, sd in zip(acc.mean(0), acc.std(0))]
        minutes = np.mean([sum(day["seconds"] for day in r["days"]) for r in rs]) / 60
        cells += [f"{100 * summary['bwt_mean']:+.3f}", str(summary["runs"]), f"{minutes:.1f} min"]
        lines.append(f"| {descriptions.get(m, m)} | " + " | ".join(cells) + " |")
    balance = np.array(next(iter(runs.values()))[0]["class_balance"])               # (P, 4)
    lines.append("| class balance % (0 stop / 1 not above / 2 above / 3 target) | "
                 + " | ".join(" / ".join(f"{100 * f:.1f}" for f in row) for row in balance)
                 + " | | | |")
    lines.append("| majority class % (always guessing it) | "
                 + " | ".join(f"{100 * row.max():.2f}" for row in balance) + " | | | |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# --describe: parameter counts, measured on the real modules
# ---------------------------------------------------------------------------

def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def describe(cfg: Config, log=print):
    """Print the parameter table per component and in total for T tasks, and
    the storage table of MARK, MARK + SupSup and Baseline 4 for growing T.
    Every number is counted on real modules (built on the 'meta' device, so
    even 1000 tasks allocate no memory)."""
    if cfg.dataset not in KNOWN_SHAPES:
        raise SystemExit(f"error: --describe knows the input shape of {sorted(KNOWN_SHAPES)}; "
                         f"for {cfg.dataset} run a short training and read 'parameters' in results.json")
    shape, classes = KNOWN_SHAPES[cfg.dataset], KNOWN_CLASSES[cfg.dataset]
    labels = KNOWN_LABELS.get(cfg.dataset, 1)
    if cfg.num_tasks:
        classes = (classes * cfg.num_tasks)[:cfg.num_tasks]
    plain = dataclasses.replace(cfg, supsup=False)
    with torch.device("meta"):
        model = MARKNet(shape, classes, plain, labels=labels)
    rows = [("knowledge base KB (shared)", count_parameters(model.kbs[0]), 1),
            ("feature extractor F_t (per task)", count_parameters(model.extractors[0]), len(classes)),
            ("mask generator M_t (per task)", count_parameters(model.mask_generators[0]), len(classes)),
            ("classifier head C_t (per task)", count_parameters(model.heads[0]), len(classes))]
    heads = f", {labels} labels of {classes[0]} classes per task" if labels > 1 else ""
    log(f"MARK on {cfg.dataset}: input {shape}{heads}, {len(classes)} tasks")
    log(f"{'component':<36s}{'each':>10s}{'x':>5s}{'total':>12s}")
    for name, n, times in rows:
        log(f"{name:<36s}{n:>10,d}{times:>5d}{n * times:>12,d}")
    total = count_parameters(model)
    log(f"{'total':<36s}{'':>15s}{total:>12,d}\n")
    log(storage_table(cfg, shape, classes[0], labels=labels))
    return total


def storage(cfg: Config, shape, k, T, labels=1) -> dict:
    """Parameters and stored bytes (float32 = 4 bytes) of each method for T tasks of k classes.

    MARK + SupSup stores its fixed random weights once (they could also be
    regenerated from a seed) and each task's supermasks as bits; its trained
    float scores are needed only while a task trains."""
    with torch.device("meta"):
        mark = MARKNet(shape, [k] * T, dataclasses.replace(cfg, supsup=False), labels=labels)
        sup = MARKNet(shape, [k] * T, dataclasses.replace(cfg, supsup=True), labels=labels)
        b4 = MARKNet(shape, [k] * T, cfg, masks=False, kb_per_task=True, labels=labels)
    supermasks = [m for m in sup.modules() if isinstance(m, SupermaskLinear)]
    fixed = sum(m.weight.numel() for m in supermasks)
    bits_bytes = sum(math.ceil(m.weight.numel() / 8) for m in supermasks)   # = pack_mask's size
    floats = count_parameters(sup) - sum(s.numel() for m in supermasks for s in m.scores)
    return {"mark": (count_parameters(mark), 4 * count_parameters(mark)),
            "supsup": (floats + fixed, 4 * (floats + fixed) + T * bits_bytes),
            "b4": (count_parameters(b4), 4 * count_parameters(b4))}


def storage_table(cfg: Config, shape, k, tasks=(20, 100, 308, 1000), labels=1) -> str:
    lines = ["Storage for T tasks (parameters stored / megabytes on disk, float32, SupSup masks as bits):",
             f"{'T':>6s}  {'MARK':>24s}  {'MARK + SupSup':>24s}  {'Baseline 4':>24s}"]
    for T in tasks:
        cells = [f"{p:>12,d} / {b / 1e6:7.1f} MB" for p, b in storage(cfg, shape, k, T, labels).values()]
        lines.append(f"{T:>6d}  " + "  ".join(f"{c:>24s}" for c in cells))
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

FLAG_HELP = {
    "dataset": "glyphs (offline synthetic default), cifar100, imagedata, npz, market (needs "
               "--source) or market-synthetic (offline)",
    "source": "market: a CSV file or a folder of minute-bar CSVs (datetime,symbol,open,high,low,close,volume)",
    "num_days": "market: keep only the first N days with samples (N >= 2; the last is only tested)",
    "profile": "paper | short (epochs/10, 1 meta-epoch) | quick; default: paper for cifar100, else quick",
    "meta_sign": "reptile: move the KB towards the adapted weights (default); authors: away (their code)",
    "authors_code": "restore every choice of the authors' code that mark-min changed (--meta-sign authors, "
                    "--no-frozen-eval, --mask-init default, --no-clip-every-step, --meta-acc-dropout); "
                    "a flag given explicitly still wins",
    "frozen_eval": "frozen modules in eval mode (default, our choice); --no-frozen-eval leaves them in train "
                   "mode as the authors' code does (F_t's batch-norm statistics keep moving)",
    "clip_every_step": "clip gradients in steps 1, 2, 3 and 5 (default, our choice); --no-clip-every-step: "
                       "step 1 only, as the authors' code",
    "meta_acc_dropout": "measure the meta-tasks' accuracies acc_i with dropout on, as the authors' code "
                        "(default off, our choice)",
    "mask_activation": "relu (authors' default) or sigmoid",
    "mask_init": "ones: mask generator bias 1, masks start near all-ones (default, our choice); "
                 "default: PyTorch's init, as the authors",
    "meta_impl": "how the K meta-tasks run (same numbers): loop (one after another) or vmap (batched, "
                 "for GPUs); auto: vmap on CUDA, else loop",
    "deterministic": "CUDA: deterministic kernels only (cuDNN, cuBLAS), so a --resume'd run equals an "
                     "uninterrupted one; slower. The CPU is deterministic without it (same thread count)",
    "device": "auto (CUDA if torch sees a device, else the CPU) | cpu | cuda | cuda:N",
    "resume": "continue the runs in --out; refused if they ran with other settings than this command",
    "force": "replace the results.json and checkpoints in --out (a folder that holds a run is "
             "otherwise refused without --resume)",
    "supsup": "replace the per-task M_t and C_t by one shared SupSup mask generator and head",
    "supsup_binarize": "topk: SupSup's top-density |score| per layer; sign: the report's score >= 0",
    "infer_task": "after the run (or on a finished run with --resume), also evaluate without the task id "
                  "(two scores: lowest output entropy, nearest class mean of F_t's queries)",
}
MAX_SEED = 2**32 - 1          # numpy's RandomState takes seeds 0 .. 2**32 - 1
CHOICES = {"dataset": ["glyphs", "cifar100", "imagedata", "npz", *MARKET_DATASETS],
           "profile": list(PROFILES), "mask_init": ["ones", "default"],
           "supsup_binarize": ["topk", "sign"],
           "meta_sign": ["reptile", "authors"], "mask_activation": ["relu", "sigmoid"],
           "meta_impl": ["auto", "loop", "vmap"]}


def positive(kind):
    def parse(text):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def non_negative(kind):
    def parse(text):
        value = kind(text)
        if value < 0 or (isinstance(value, float) and not math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
        return value
    return parse


def make_parser(description=None) -> argparse.ArgumentParser:
    """One flag per Config field (--meta-k, --epochs-fe, ...), checked on parse."""
    parser = argparse.ArgumentParser(description=description or __doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        kind = type(f.default) if f.default is not None else str
        kwargs = {"default": argparse.SUPPRESS, "help": FLAG_HELP.get(f.name, f"default {f.default}")}
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif kind is tuple:
            parser.add_argument(flag, type=positive(int), nargs="+", **kwargs)
        elif f.name in CHOICES:
            parser.add_argument(flag, choices=CHOICES[f.name], **kwargs)
        elif f.name == "device":
            parser.add_argument(flag, type=device_flag, **kwargs)
        elif f.name in ("num_tasks", "num_days", "runs", "batch_size", "latent", "threads") or f.name.startswith(("epochs", "meta_k", "meta_inner_steps", "meta_epochs")):
            parser.add_argument(flag, type=positive(int), **kwargs)
        elif kind in (int, float):
            parser.add_argument(flag, type=non_negative(kind) if f.name != "seed" else int, **kwargs)
        else:
            parser.add_argument(flag, type=str, **kwargs)
    return parser


def parse_config(argv, parser=None) -> tuple[Config, set, argparse.Namespace]:
    parser = parser or make_parser()
    args = parser.parse_args(argv)
    field_names = {f.name for f in dataclasses.fields(Config)}
    given = {k: v for k, v in vars(args).items() if k in field_names}
    if given.get("resume") and not given.get("out"):
        parser.error("--resume needs --out DIR (the folder of the interrupted run)")
    if given.get("dataset") == "npz" and not given.get("path"):
        parser.error("--dataset npz needs --path FILE.npz")
    if given.get("path") is not None and given.get("dataset") != "npz":
        parser.error("--path is read by --dataset npz only")
    if given.get("source") is not None and given.get("dataset") != "market":
        parser.error("--source is read by --dataset market only")
    if given.get("force") and given.get("resume"):
        parser.error("--force replaces the runs in --out, --resume continues them: give one")
    if given.get("force") and not given.get("out"):
        parser.error("--force needs --out DIR (the folder whose results it replaces)")
    if given.get("num_days") is not None and given.get("dataset") not in MARKET_DATASETS:
        parser.error("--num-days is for the market datasets")
    if given.get("num_days") == 1:
        parser.error("--num-days must be >= 2: MarketCL trains on a day and tests on the next")
    if not 0 <= given.get("dropout", 0.5) < 1:
        parser.error("--dropout must be in [0, 1)")
    if not 0 < given.get("supsup_density", 0.5) <= 1:
        parser.error("--supsup-density must be in (0, 1]")
    seed, runs = given.get("seed", 0), given.get("runs", 1)
    if not 0 <= seed <= MAX_SEED + 1 - runs:
        parser.error(f"--seed {seed} with --runs {runs} uses seeds {seed}..{seed + runs - 1}; "
                     f"numpy takes seeds 0..{MAX_SEED}")
    try:
        cfg = resolve_config(Config(**given), overridden=set(given))
    except ValueError as err:
        parser.error(str(err))
    for part in ("kb", "fe"):
        channels, kernels = getattr(cfg, f"{part}_channels"), getattr(cfg, f"{part}_kernels")
        if len(channels) != len(kernels):
            parser.error(f"--{part}-channels gives {len(channels)} layer(s) but --{part}-kernels "
                         f"{len(kernels)}: give one kernel size per layer")
    return cfg, set(given), args


def main(argv=None):
    parser = make_parser()
    parser.add_argument("--describe", action="store_true",
                        help="print the parameter table and exit (no data needed)")
    cfg, overridden, args = parse_config(argv, parser)
    if args.describe:
        describe(cfg)
        return 0
    try:
        run_experiment(cfg, "mark", train_task_mark, {}, overridden)
    except (DataError, RunError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except TrainingDiverged as err:
        print(f"error: training diverged at {err}\nFinished tasks are in "
              f"{cfg.out or '(no --out given)'}/results.json.", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        market = cfg.dataset in MARKET_DATASETS
        print(f"\ninterrupted: finished {'days' if market else 'tasks'} are saved"
              + ((f" in {cfg.out}/results.json (--resume keeps finished seeds only)" if market else
                  f" in {cfg.out}; continue with the same command plus --resume") if cfg.out
                 else " nowhere (no --out given)"), file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
