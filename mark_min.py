"""mark_min.py: MARK (Meta Reusable Knowledge), the method alone, in one readable file.

Hurtado, Raymond-Saez & Soto, "Optimizing Reusable Knowledge for Continual
Learning via Metalearning", NeurIPS 2021 (arXiv:2106.05390).

    python mark_min.py                          # glyphs stream, quick profile, < 2 min on CPU
    python mark_min.py --dataset cifar100       # 20-Split CIFAR-100, the paper's protocol
    python mark_min.py --dataset cifar100 --profile short --out runs/c100
    python mark_min.py --dataset cifar100 --describe   # parameter table, no data needed

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

Map from the paper (Section 3, Algorithm 1) to this file:
    the KB, masked block by block (Eq. 1) ......... KnowledgeBase
    F_t, M_t, C_t, the model ...................... FeatureExtractor, MaskGenerator, MARKNet
    step 1  train F_t with a throwaway head ....... step1_feature_extractor
    step 2  first task only: pre-train the KB ..... step2_pretrain_kb
    step 3  train M_t and C_t, KB frozen .......... step3_masks_and_head
    step 4  meta-update of the KB (Eq. 2-3) ....... step4_meta_update
    step 5  consolidate M_t and C_t ............... step5_consolidate
    one task, steps 1-5 ........................... train_task_mark
    accuracy matrix R, ACC, BWT ................... experiment.run_seed, metrics.py

Around the method, each in its own module: experiment.py (runs, results.json,
checkpoints, --resume, the command line), baselines.py (the report's
baselines and the frozen-KB ablation, composed from the steps below),
supsup.py (MARK + SupSup), task_inference.py (evaluation without the task
id), market.py (MarketCL), data.py and imagedata.py (the task streams).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import sys
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

import experiment
from data import DataError, Task, batch_indices
from experiment import TrainingDiverged, param

# ---------------------------------------------------------------------------
# Configuration: every hyperparameter in one place, with where it comes from.
# (param: default, the flag's help, and the role: "hyper" changes the numbers,
# "data" chooses the data, "run" says where and how to run; experiment.py)
# ---------------------------------------------------------------------------


@dataclass
class Config(experiment.RunSettings):
    # (experiment.RunSettings: --seed, --runs, --device, --out, --resume, --force,
    # --data-dir, --threads, --deterministic: where and how a run runs)
    # -- what to run --------------------------------------------------------
    dataset: str = param("glyphs", "glyphs (synthetic, offline; the default), cifar100 (the paper's "
                         "20-Split CIFAR-100), imagedata (the course report's), npz (--path)",
                         "data", choices=["glyphs", "cifar100", "imagedata", "npz"])
    path: str | None = param(None, "--dataset npz: the .npz file (x_train, y_train, x_test, y_test)", "data")
    num_tasks: int | None = param(None, "keep only the first N tasks of the stream (default: all)", "data",
                                  type=experiment.positive(int))
    classes_per_task: int | None = param(
        None, "classes per task (default: 5 for cifar100, glyphs and imagedata, as the paper and the "
        "report; 2 for npz, as Split-MNIST)", "data", type=experiment.positive(int))
    profile: str | None = param(None, "paper (the authors' schedule) | short (epochs / 10, one "
                                "meta-epoch) | quick; default: paper for cifar100, else quick", "run",
                                choices=["paper", "short", "quick"])
    epoch_scale: float = param(1.0, "multiply every epoch count, after the profile (default 1)", "run")
    # -- model: the authors' code's layers ---------------------------------------
    latent: int = param(128, "size of F_t's query and of the KB's output (authors' code: 128)",
                        type=experiment.positive(int))
    kb_channels: tuple = param((64, 128, 256), "channels of the KB's conv blocks (authors' code)")
    kb_kernels: tuple = param((4, 3, 2), "kernel sizes of the KB's conv blocks (authors' code, CIFAR-100)")
    fe_channels: tuple = param((32, 32), "channels of F_t's conv blocks (authors' code)")
    fe_kernels: tuple = param((4, 3), "kernel sizes of F_t's conv blocks (authors' code)")
    dropout: float = param(0.5, "dropout after the KB's linear layer, in [0, 1) (authors' code: 0.5)")
    mask_activation: str = param("relu", "relu (authors' default) | sigmoid", choices=["relu", "sigmoid"])
    shared_fe: bool = param(False, "one feature extractor F for every task, trained by step 1 on the first "
                            "task and frozen afterwards, so a task stores only M_t and C_t (the course "
                            "report's proposal, its section 6; default: one F_t per task, the paper's)")
    mask_init: str = param("ones", "ones: mask generator bias 1, masks start near all-ones (our choice, "
                           "DEVIATION 3) | default: PyTorch's init (authors' code)",
                           choices=["ones", "default"])
    # -- ordinary training: steps 1, 2, 3, 5 (the paper; the authors' code) -----
    batch_size: int = param(128, "mini-batch size of every step (authors' code: 128)",
                            type=experiment.positive(int))
    lr: float = param(0.1, "SGD learning rate of steps 1, 2, 3 (authors' code, CIFAR-100; 0.01 for "
                      "MiniImageNet)")
    momentum: float = param(0.9, "SGD momentum of every step, inner meta steps too (authors' code)")
    weight_decay: float = param(0.01, "SGD weight decay of steps 1, 2, 3, 5 (authors' code)")
    clip: float = param(0.5, "gradient-norm clip (authors' code: 0.5; 0 = off)")
    clip_every_step: bool = param(True, "clip in steps 1, 2, 3 and 5 (our choice, DEVIATION 4); "
                                  "--no-clip-every-step: step 1 only, as the authors' code")
    frozen_eval: bool = param(True, "frozen modules in eval mode (our choice, DEVIATION 2); "
                              "--no-frozen-eval: train mode, as the authors' code")
    epochs_fe: int = param(50, "epochs of step 1, F_t (authors' code: 50)", type=experiment.positive(int))
    epochs_kb: int = param(50, "epochs of step 2, the KB on task 1 (authors' code: 50)",
                           type=experiment.positive(int))
    epochs_masks: int = param(50, "epochs of step 3, M_t and C_t (authors' code: 50)",
                              type=experiment.positive(int))
    epochs_consolidate: int = param(50, "epochs of step 5 (authors' code: 50; the report: 30-40)",
                                    type=experiment.positive(int))
    lr_consolidate: float = param(0.1, "learning rate of step 5 (authors' code: 0.1; the report: 0.05)")
    # -- meta-update: step 4 (the paper; the authors' code) ----------------------
    meta_epochs: int = param(10, "outer steps of step 4 per task (authors' code: 10)",
                             type=experiment.positive(int))
    meta_k: int = param(10, "meta-tasks K per outer step (authors' code: 10)", type=experiment.positive(int))
    meta_inner_steps: int = param(40, "SGD steps of a meta-task on its one batch (authors' code: 40)",
                                  type=experiment.positive(int))
    meta_inner_lr: float = param(0.01, "learning rate of the inner steps (authors' code: 0.01)")
    meta_inner_weight_decay: float = param(0.1, "weight decay of the inner steps (authors' code: 0.1)")
    meta_outer_lr: float = param(0.001, "eps, the outer step (authors' code: 0.1 x the meta rate 0.01)")
    meta_outer_weight_decay: float = param(0.1, "weight decay of the outer step (authors' code: 0.1)")
    meta_sign: str = param("reptile", "reptile: move the KB towards the adapted weights (Reptile, our "
                           "default, DEVIATION 1) | authors: away, as the authors' code",
                           choices=["reptile", "authors"])
    meta_acc_dropout: bool = param(False, "measure the meta-tasks' accuracies acc_i with dropout on, as "
                                   "the authors' code (default off, our choice, DEVIATION 5)")
    authors_code: bool = param(False, "every choice of the authors' code that mark-min changed (--meta-sign "
                               "authors, --no-frozen-eval, --mask-init default, --no-clip-every-step, "
                               "--meta-acc-dropout); a flag given explicitly still wins", "run")
    # -- how it runs (the same numbers) ---------------------------------------------
    meta_impl: str = param("auto", "how the K meta-tasks run: loop (one after another) or vmap (batched, "
                           "for GPUs); auto: vmap on CUDA, else loop (same numbers)", "run",
                           choices=["auto", "loop", "vmap"])
    channels_last: bool = param(True, "channels-last memory layout for the conv nets (faster on CPU and "
                                "GPU; same numbers)", "run")

    # Settings that moved to an extension's class, with the value that meant
    # "not used" (experiment.with_new_settings): runs saved before the move
    # still resume and compare.
    MOVED_SETTINGS = {"supsup": False, "supsup_binarize": "topk", "supsup_density": 0.5,
                      "source": None, "num_days": None, "seq_query": 64, "seq_channels": [64, 128, 256]}

    def __post_init__(self):
        for name in ("kb_channels", "kb_kernels", "fe_channels", "fe_kernels"):
            setattr(self, name, tuple(getattr(self, name)))
        for part in ("kb", "fe"):
            channels, kernels = getattr(self, f"{part}_channels"), getattr(self, f"{part}_kernels")
            if len(channels) != len(kernels):
                raise ValueError(f"--{part}-channels gives {len(channels)} layer(s) but --{part}-kernels "
                                 f"{len(kernels)}: give one kernel size per layer")
        if not 0 <= self.dropout < 1:
            raise ValueError("--dropout must be in [0, 1)")
        if self.dataset == "npz" and not self.path:
            raise ValueError("--dataset npz needs --path FILE.npz")
        if self.path is not None and self.dataset != "npz":
            raise ValueError("--path is read by --dataset npz only")


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
EPOCH_FIELDS = ("epochs_fe", "epochs_kb", "epochs_masks", "epochs_consolidate")

# --authors-code: every choice of the authors' code that mark-min changed and
# that changes the arithmetic (README, "Deviations"; DEVIATION n marks the code).
AUTHORS_CODE = dict(meta_sign="authors",          # DEVIATION 1
                    frozen_eval=False,            # DEVIATION 2
                    mask_init="default",          # DEVIATION 3
                    clip_every_step=False,        # DEVIATION 4
                    meta_acc_dropout=True)        # DEVIATION 5


def resolve_config(cfg: Config, overridden=frozenset(), dataset_profiles=None) -> Config:
    """Apply the profile and --authors-code, then the user's explicit flags
    (an explicit flag beats both), then --epoch-scale. dataset_profiles:
    {(dataset, profile): settings} an extension adds to a profile (MarketCL)."""
    cfg = dataclasses.replace(cfg)
    if cfg.profile is None:
        cfg.profile = DEFAULT_PROFILE.get(cfg.dataset, "quick")
    for key, value in (PROFILES[cfg.profile] | (dataset_profiles or {}).get((cfg.dataset, cfg.profile), {})
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
    hyperparameters = experiment.fields_with_role(cfg, "hyper")
    changed = sorted(k for k in overridden if k in hyperparameters)
    is_paper = cfg.profile == "paper" and not changed and cfg.epoch_scale == 1.0
    label = "paper protocol" if is_paper else "SHORT profile, not the paper protocol"
    extra = f", overrides: {', '.join(changed)}" if changed else ""
    scale = f", epoch scale {cfg.epoch_scale:g}" if cfg.epoch_scale != 1.0 else ""
    authors = ", the authors' code's choices (--authors-code)" if cfg.authors_code else ""
    return (f"profile '{cfg.profile}' ({label}{scale}{extra}{authors}): epochs F/KB/M/cons = "
            f"{cfg.epochs_fe}/{cfg.epochs_kb}/{cfg.epochs_masks}/{cfg.epochs_consolidate}, "
            f"meta {cfg.meta_epochs} x K={cfg.meta_k} x {cfg.meta_inner_steps} steps, "
            f"sign {cfg.meta_sign}")


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


def check_image_shape(cfg: Config, shape):
    """Refuse images the KB and F_t cannot take before a model is built: both
    assume square inputs, and each conv + pool block needs at least 2 px."""
    _, height, width = shape
    if height != width:
        raise DataError(f"images are {height}x{width} px; the KB and F_t take square "
                        "images: crop or pad them to a square")
    smallest = max(smallest_image(cfg.kb_kernels), smallest_image(cfg.fe_kernels))
    if height < smallest:
        raise DataError(f"images of {height}x{width} px are too small for the KB "
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


class SharedAcrossTasks(nn.Module):
    """One module that every task uses (--shared-fe: one F for all tasks):
    [t] and forward(x, t) give the same module whatever t, as PerTask's give
    task t's."""
    shared = True

    def __init__(self, module):
        super().__init__()
        self.module = module

    def __getitem__(self, t):
        return self.module

    def forward(self, x, t):
        return self.module(x)


# -- the model, composed ------------------------------------------------------

@dataclass
class Architecture:
    """The networks of one kind of input: how to build a fresh KB and a fresh
    F_t, and the sizes that connect them to M_t and C_t. Images use
    cnn_architecture (the authors' CNNs); MarketCL's sequences use LSTMs
    (market.lstm_architecture)."""
    make_kb: Callable[[], nn.Module]     # a KB: forward(x, masks=None, noise=None) -> (B, kb_out)
    make_fe: Callable[[], nn.Module]     # an F_t: forward(x) -> (B, query_dim)
    kb_channels: tuple                   # channels of the masked KB blocks: one mask each
    kb_out: int                          # size of the KB's output, the input of C_t
    query_dim: int                       # size of F_t's query, the input of M_t


def cnn_architecture(cfg: Config, in_shape) -> Architecture:
    """The authors' CNNs for images of shape (C, H, W)."""
    check_image_shape(cfg, in_shape)
    return Architecture(
        make_kb=lambda: KnowledgeBase(in_shape, cfg.kb_channels, cfg.kb_kernels, cfg.latent, cfg.dropout),
        make_fe=lambda: FeatureExtractor(in_shape, cfg.fe_channels, cfg.fe_kernels, cfg.latent),
        kb_channels=cfg.kb_channels, kb_out=cfg.latent, query_dim=cfg.latent)


def per_task_mask_generators(cfg: Config, arch: Architecture, T: int) -> nn.Module:
    """M_0 .. M_{T-1}, one MaskGenerator per task (MARK)."""
    return PerTask(MaskGenerator(arch.query_dim, arch.kb_channels, cfg.mask_activation, cfg.mask_init)
                   for _ in range(T))


def per_task_heads(cfg: Config, arch: Architecture, outputs) -> nn.Module:
    """C_0 .. C_{T-1}, one linear head per task: kb_out -> outputs[t]."""
    return PerTask(nn.Linear(arch.kb_out, k) for k in outputs)


class MARKNet(nn.Module):
    """The whole MARK model for a stream of T tasks, composed of its parts:

    kbs:              [KB] shared (or one per task for Baseline 4)
    extractors:       F_0 .. F_{T-1}      (None: a model without masks)
    mask_generators:  M_0 .. M_{T-1}      (None: a model without masks)
    heads:            C_0 .. C_{T-1}, C_t: kb_out -> classes of task t

    build_model chooses the parts. The baselines are the same class with
    other parts: no F and M (Baselines 1, 2, 4), a KB per task (Baseline 4);
    supsup.py passes one shared mask generator and head with per-task
    supermasks. Either way, mask_generators(q, t), heads(z, t) and their
    .task_parameters(t) are task t's.
    """

    def __init__(self, arch: Architecture, kbs, heads, extractors=None, mask_generators=None):
        super().__init__()
        self.kb_out, self.query_dim = arch.kb_out, arch.query_dim
        self.kbs = kbs
        self.use_masks = extractors is not None
        if self.use_masks:
            self.extractors, self.mask_generators = extractors, mask_generators
        self.heads = heads

    def kb(self, t) -> KnowledgeBase:
        return self.kbs[t if len(self.kbs) > 1 else 0]

    def new_head(self, num_classes, inputs=None) -> nn.Module:
        """A fresh, randomly initialised head (step 1's throwaway head on F_t's
        query, step 4's meta-task head on the KB's output)."""
        device = next(self.kbs[0].parameters()).device
        return nn.Linear(inputs or self.kb_out, num_classes).to(device)

    def loss(self, out, y, t):
        """Cross-entropy of task t's logits (market.py: several labels)."""
        return F.cross_entropy(out, y)

    def predict(self, out):
        """Logits -> predicted classes (B,)."""
        return out.argmax(1)

    def masks(self, x, t, query=None):
        """m = M_t(F_t(x)): list of (B, c_l). `query` = a precomputed F_t(x)."""
        if not self.use_masks:
            return None
        if query is None:
            query = self.extractors(x, t)
        return self.mask_generators(query, t)

    def forward(self, x, t, query=None):         # x: (B, C, H, W) -> logits (B, k_t)
        return self.heads(self.kb(t)(x, self.masks(x, t, query)), t)


def build_model(cfg: Config, in_shape, classes_per_task, device, *, masks=True, kb_per_task=False,
                architecture=cnn_architecture, mask_generators=per_task_mask_generators,
                heads=per_task_heads, model_class=MARKNet) -> MARKNet:
    """The one place where a model's parts are chosen. MARK: the defaults.
    masks=False drops F_t and M_t, kb_per_task gives each task its own KB
    (baselines.py); extensions pass their own architecture (market.py),
    mask generators and heads (supsup.py) or model class. The parts are
    created in a fixed order (KBs, F_t, M_t, C_t), so a seed gives the same
    initial weights whichever way the model is built."""
    arch, T = architecture(cfg, in_shape), len(classes_per_task)
    kbs = nn.ModuleList(arch.make_kb() for _ in range(T if kb_per_task else 1))
    extractors = None
    if masks:
        extractors = SharedAcrossTasks(arch.make_fe()) if cfg.shared_fe else PerTask(arch.make_fe()
                                                                                      for _ in range(T))
    generators = mask_generators(cfg, arch, T) if masks else None
    model = model_class(arch, kbs, heads(cfg, arch, classes_per_task), extractors, generators)
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


# ---------------------------------------------------------------------------
# Training machinery shared by every step
# ---------------------------------------------------------------------------

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

    Returns F_t(x) of the training set (frozen from now on, so steps 3-5 reuse it).
    """
    fe, probe = model.extractors[t], model.new_head(task.num_classes, inputs=model.query_dim)
    x, y = task.train.x, task.train.y
    fit(model, cfg, gen, len(y), lambda i: model.loss(probe(fe(x[i])), y[i], t),
        params=[*fe.parameters(), *probe.parameters()], train_modules=[fe, probe],
        epochs=cfg.epochs_fe, lr=cfg.lr, where=f"task {t}, step 1 (feature extractor)", clip=True)
    fe.eval().requires_grad_(False)          # frozen for good: eval mode, no gradient
    return frozen_queries(model, t, x)


def step2_pretrain_kb(model: MARKNet, t, task: Task, cfg: Config, gen, extra_loss=None):
    """Step 2. "First task only: pre-train the KB. Train KB + C_0 with no masks
    (all ones) for 50 epochs. This is the only ordinary training the KB gets."

    Baselines 1, 2 and 4 call this on every task (no masks at all).
    extra_loss: None, or a function of no arguments returning a scalar tensor
    that is added to the loss of every batch (a regulariser of the weights:
    baselines.py's EWC penalty). None trains exactly as before.
    """
    kb = model.kb(t)
    x, y = task.train.x, task.train.y
    loss = lambda i: model.loss(model.heads(kb(x[i]), t), y[i], t)
    if extra_loss is not None:
        task_loss, loss = loss, lambda i: task_loss(i) + extra_loss()
    fit(model, cfg, gen, len(y), loss,
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
    if cfg.shared_fe and task.index > 0:
        # --shared-fe: F was trained on the first task and stays frozen; only
        # its output for this task's images is needed.
        query = frozen_queries(model, t, task.train.x)
    else:
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




# --describe: the parameter and storage tables (experiment.describe) of MARK
# and of Baseline 4, which stores a whole network per task.
STORAGE = {"MARK": experiment.with_settings(experiment.storage_of(build_model), shared_fe=False),
           "MARK, shared F": experiment.with_settings(experiment.storage_of(build_model), shared_fe=True),
           "Baseline 4": experiment.storage_of(build_model, masks=False, kb_per_task=True)}


def describe(cfg: Config, log=print, storage=STORAGE, build=None, **kwargs) -> int:
    return experiment.describe(cfg, build or build_model, log, storage=storage, **kwargs)


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def run(cfg: Config, given=frozenset(), method="mark", train_task=None, build=None,
        log=experiment.log_line, after_run=None) -> dict:
    """Train `method` on cfg's stream for every seed; results.json in cfg.out.
    Default: MARK (train_task_mark, build_model)."""
    return experiment.run_experiment(cfg, method, train_task or train_task_mark, build or build_model,
                                     describe_schedule(cfg, given), log=log, after_run=after_run)


def parse(argv, config_class=Config, description=None, resolve=resolve_config):
    """(cfg, the flags given, the parser's namespace) of a MARK command line;
    --describe prints the parameter table. Extensions pass their own class."""
    parser = experiment.make_parser(config_class, description or __doc__.split("\n\n")[0])
    parser.add_argument("--describe", action="store_true",
                        help="print the parameter and storage tables and exit (no data needed)")
    return experiment.parse_config(argv, config_class, parser, resolve)


def main(argv=None):
    cfg, given, args = parse(argv)
    if args.describe:
        return experiment.report_errors(lambda: describe(cfg), cfg)
    return experiment.report_errors(lambda: run(cfg, given), cfg)


if __name__ == "__main__":
    sys.exit(main())
