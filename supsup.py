"""supsup.py: MARK + SupSup, the course report's extension, on top of mark_min.py.

    python supsup.py                                   # glyphs, quick profile
    python supsup.py --dataset cifar100 --profile short --out runs/c100_supsup
    python supsup.py --supsup-binarize sign            # the report's binarisation
    python supsup.py --dataset cifar100 --describe     # storage: masks as bits

SupSup (Wortsman et al., "Supermasks in Superposition", NeurIPS 2020,
arXiv:2006.14769) keeps a network's weights FIXED at random values and learns,
per task, only a binary mask over them (a "supermask"), found by training
real-valued scores and keeping the top-scoring weights (edge-popup). The
course report replaces MARK's per-task mask generators M_t and heads C_t by
ONE mask generator and ONE head whose weights are fixed and random, each task
owning a supermask over them: a task's M and C then cost one bit per weight
instead of a float. Everything else is MARK's: the KB, the per-task F_t, the
five steps (mark_min.py); only the parts passed to mark_min.build_model change.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import experiment
import mark_min as mm
from experiment import param


@dataclass
class SupSupConfig(mm.Config):
    supsup_binarize: str = param("topk", "how scores become a supermask: topk (SupSup: keep the top "
                                 "--supsup-density of |score| per layer) | sign (the report: score >= 0)",
                                 choices=["topk", "sign"])
    supsup_density: float = param(0.5, "fraction of weights topk keeps, in (0, 1] (SupSup's default 0.5)")

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.supsup_density <= 1:
            raise ValueError("--supsup-density must be in (0, 1]")


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

    def superposed(self, x, alpha):                 # x: (B, in), alpha: (T,) -> (B, out)
        """y = x @ (W * sum_t alpha_t mask_t)^T: every task's supermask at
        once, task t weighted by alpha_t (SupSup's superposition, its Section
        3.3); a one-hot alpha gives task t's forward."""
        masks = torch.stack([self.mask(t).detach() for t in range(len(self.scores))])   # (T, out, in)
        return F.linear(x, self.weight * torch.einsum("t,toi->oi", alpha, masks))

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

    def superposed(self, q, alpha):                  # every task's masks at once, weighted by alpha
        return [self.activation(layer.superposed(q, alpha) + self.offset) for layer in self.layers]

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

    def superposed(self, z, alpha):                  # z: (B, latent) -> (B, max k_t)
        return self.layer.superposed(z, alpha)

    def task_parameters(self, t):
        return [self.layer.scores[t]]

    def task_module(self, t):
        return self



# ---------------------------------------------------------------------------
# The model: MARK's parts with SupSup's mask generator and head
# ---------------------------------------------------------------------------

def supsup_mask_generators(cfg: SupSupConfig, arch: mm.Architecture, T: int) -> nn.Module:
    return SupSupMaskGenerator(arch.query_dim, arch.kb_channels, T, cfg.mask_activation,
                               cfg.supsup_binarize, cfg.supsup_density,
                               offset=1.0 if cfg.mask_init == "ones" else 0.0)


def supsup_heads(cfg: SupSupConfig, arch: mm.Architecture, outputs) -> nn.Module:
    return SupSupHead(arch.kb_out, outputs, cfg.supsup_binarize, cfg.supsup_density)


def build_model(cfg: SupSupConfig, in_shape, classes_per_task, device, **options) -> mm.MARKNet:
    """MARK's model with one SupSup mask generator and one SupSup head."""
    return mm.build_model(cfg, in_shape, classes_per_task, device, mask_generators=supsup_mask_generators,
                          heads=supsup_heads, **options)


def stored_with_bits(model: nn.Module) -> tuple[int, int]:
    """(parameters stored, bytes) of a SupSup model: its fixed random weights
    once (they could also be regenerated from a seed), every task's supermasks
    as bits (pack_mask's size), every other parameter as float32. The float
    scores are needed only while a task trains."""
    supermasks = [m for m in model.modules() if isinstance(m, SupermaskLinear)]
    fixed = sum(m.weight.numel() for m in supermasks)
    tasks = len(supermasks[0].scores)
    bits_bytes = sum(math.ceil(m.weight.numel() / 8) for m in supermasks)
    floats = experiment.count_parameters(model) - sum(s.numel() for m in supermasks for s in m.scores)
    return floats + fixed, 4 * (floats + fixed) + tasks * bits_bytes


STORAGE = {"MARK": mm.STORAGE["MARK"], "MARK, shared F": mm.STORAGE["MARK, shared F"],
           "MARK + SupSup": experiment.with_settings(experiment.storage_of(build_model, stored_with_bits),
                                                     shared_fe=False),
           "MARK + SupSup, shared F": experiment.with_settings(experiment.storage_of(build_model, stored_with_bits),
                                                              shared_fe=True),
           "Baseline 4": mm.STORAGE["Baseline 4"]}


def main(argv=None):
    cfg, given, args = mm.parse(argv, SupSupConfig, __doc__.split("\n\n")[0])
    if args.describe:
        return experiment.report_errors(lambda: mm.describe(cfg, storage=STORAGE), cfg)
    return experiment.report_errors(lambda: mm.run(cfg, given, "supsup", build=build_model), cfg)


if __name__ == "__main__":
    sys.exit(main())
