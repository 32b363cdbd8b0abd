"""baselines.py: the baselines and the ablation beside MARK, and the reproduction table.

    python baselines.py --method b1                          # one method, glyphs, quick profile
    python baselines.py --method ewc --ewc-lambda 100        # EWC, with its own flag
    python baselines.py --all --runs 3 --out runs/glyphs     # MARK, B1-B4, ablation + table
    python baselines.py --all --dataset cifar100 --profile short --out runs/c100
    python baselines.py --table runs/glyphs                  # just print the table again

A method is only as convincing as what it is compared with. Each method below
is a different composition of the SAME steps from mark_min.py (definitions:
the course report's, Aggarwal & Agarwal); nothing is copied:

    method    model                         per task
    mark      KB + F_t, M_t, C_t            steps 1, (2 on task 1), 3, 4, 5
    b1        KB + C_t, no masks            step 2 (KB + head) on every task
    b2        KB + C_t, no masks            step 2, step 4 (meta-update), head re-fit
    b2-report KB + C_t, no masks            as b2, but step 2 on task 1 only (the report's code)
    b3        KB + F_t, M_t, C_t            step 1, then KB + M_t + C_t trained together
    b4        one KB + C_t per task         step 2 on the task's own KB (no sharing)
    ablation  as MARK                       steps 1, (2), 3, 5: the KB frozen after task 1
    ewc       KB + C_t, no masks            step 2 + EWC penalty, then the task's Fisher (EWC,
                                            Kirkpatrick et al. 2017; --ewc-lambda)

Every method takes the flags of mark_min.py (dataset, seed, runs, device,
profile, --out, ...) and writes the same results.json schema, to
OUT/<method>/results.json with --all. A method may add settings of its own
(its Method's config_class: EWC's --ewc-lambda), which only it takes, and a
state of its own (make_state: EWC's Fisher and anchor), which its checkpoints
carry. --all can be stopped and started again: finished method-seed pairs are
not run again. The same methods run on MarketCL through market.py, except
those with settings of their own (EWC).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
from torch.func import functional_call, grad, vmap

import experiment
import metrics
import mark_min as mm
from experiment import param


def train_task_b1(model, t, task, cfg, gen, timer):
    """Baseline 1: sequential training of the KB with one head per task; no masks,
    no metalearning. The KB is overwritten by each new task."""
    with timer("2 KB + head"):
        mm.step2_pretrain_kb(model, t, task, cfg, gen)


def train_task_b2(model, t, task, cfg, gen, timer, *, kb_every_task=True):
    """Baseline 2: Baseline 1 plus the meta-update of the KB (no masks). Every
    task's head is trained (DEVIATION 8: the report's code left heads of tasks
    > 0 untrained, a bug): once with the KB, and once more after the meta-update
    moved the KB (step 5 without masks = the head alone).

    kb_every_task=False is Baseline 2 as the report's code runs it (b2-report):
    the KB is trained ordinarily on the first task only and afterwards moves
    only by meta-updates; a later task's head is trained on the KB as it
    stands (step 5 alone), the KB frozen."""
    if kb_every_task or task.index == 0:
        with timer("2 KB + head"):
            mm.step2_pretrain_kb(model, t, task, cfg, gen)
    with timer("4 meta-update"):
        mm.step4_meta_update(model, t, task, cfg, gen, query=None)
    with timer("5 head re-fit"):
        mm.step5_consolidate(model, t, task, cfg, gen, query=None)


def train_task_b3(model, t, task, cfg, gen, timer):
    """Baseline 3: Baseline 1 plus task-specific mask generators. F_t is trained
    as in MARK's step 1; then the KB, M_t and C_t are trained together with the
    masks applied, on every task (the KB is trained conventionally)."""
    with timer("1 feature extractor"):
        query = mm.step1_feature_extractor(model, t, task, cfg, gen)
    with timer("3 KB + masks + head"):
        mm.train_masks_and_head(model, t, task, cfg, gen, query, epochs=cfg.epochs_kb,
                                lr=cfg.lr, where=f"task {t}, KB + masks + head", train_kb=True)


# ---------------------------------------------------------------------------
# EWC: Baseline 1 plus a quadratic penalty that anchors the KB's important weights
# ---------------------------------------------------------------------------
#
# Kirkpatrick et al., "Overcoming catastrophic forgetting in neural networks",
# PNAS 2017. After a task, the diagonal Fisher information F_i of each KB
# weight says how much that task's log-likelihood depends on it; later tasks
# pay (lambda / 2) * sum_i F_i (theta_i - theta*_i)^2 for moving it away from
# theta*, its value after the task. Here in the online, accumulated form
# (Schwarz et al. 2018, "Progress & Compress"; Huszar 2018, "Note on the
# quadratic penalties in elastic weight consolidation", PNAS): ONE penalty
# whose F is the sum of every finished task's Fisher and whose anchor theta*
# is the KB after the latest task, instead of one penalty per task.


@dataclass
class EWCConfig(mm.Config):
    # lambda was chosen on the VALIDATION split (every task's test split
    # replaced by its validation split) of glyphs, seed 0, quick profile,
    # --num-tasks 5, Fisher on 1000 samples; ACC / BWT % measured:
    #   lambda 0 (= B1) 60.76 / -45.71   1: 59.43 / -48.21   10: 61.24 / -44.05
    #   100: 75.14 / -25.12   1000: 82.19 / -13.21   10000: 84.29 / -2.62
    #   100000: 54.10 / -13.93 (the KB too stiff to learn the new tasks)
    ewc_lambda: float = param(10000.0, "EWC: strength lambda of the penalty (lambda / 2) sum_i F_i "
                              "(theta_i - theta*_i)^2 on the KB (default 10000: the best of 1, 10, ..., "
                              "100000 on glyphs' validation split, seed 0, 5 tasks; 0 = Baseline 1)")
    ewc_fisher_samples: int | None = param(
        1000, "EWC: training samples of a task its Fisher is estimated on, evenly spaced over "
        "the split (default 1000, most of a glyphs task's 1190; 0 or more than the split: all)", type=experiment.non_negative(int))


class EWCState(nn.Module):
    """EWC's own tensors, kept from task to task: for every parameter of the
    shared KB, the accumulated diagonal Fisher F (the sum over finished tasks)
    and the anchor theta* (the KB after the latest task). Buffers, not
    parameters: no optimizer sees them, and as model.method_state they are in
    model.state_dict(), so every checkpoint saves them and --resume restores
    them. Before the first task both are zero, and so is the penalty."""

    def __init__(self, kb: nn.Module):
        super().__init__()
        for name, p in kb.named_parameters():
            self.register_buffer(self.key("fisher", name), torch.zeros_like(p))
            self.register_buffer(self.key("anchor", name), torch.zeros_like(p))

    @staticmethod
    def key(kind, name):                 # buffer names take no dots: fisher_convs_0_weight
        return f"{kind}_{name.replace('.', '_')}"

    def penalty(self, kb: nn.Module, lam: float) -> torch.Tensor:
        """(lam / 2) * sum_i F_i (theta_i - theta*_i)^2 over the KB's parameters
        (a scalar that autograd differentiates with respect to the KB)."""
        return lam / 2 * sum((self.get_buffer(self.key("fisher", name))
                              * (p - self.get_buffer(self.key("anchor", name))).pow(2)).sum()
                             for name, p in kb.named_parameters())

    @torch.no_grad()
    def consolidate(self, kb: nn.Module, fisher: dict):
        """After a task: F <- F + the task's Fisher; theta* <- the KB as it is now."""
        for name, p in kb.named_parameters():
            self.get_buffer(self.key("fisher", name)).add_(fisher[name])
            self.get_buffer(self.key("anchor", name)).copy_(p)


@torch.no_grad()
def empirical_fisher(model, t, split, samples=None, chunk=128) -> dict:
    """The diagonal empirical Fisher of the KB's parameters on task t's data:
    F_i = mean over samples n of (d log p(y_n | x_n) / d theta_i)^2, with y_n the
    TRUE label (the empirical Fisher; the true Fisher would sample y from the
    model). Per-sample gradients by torch.func (vmap over grad), `chunk`
    samples at a time, the model in eval mode (no dropout: the Fisher of the
    network that is evaluated, and no random numbers drawn, so the training
    that follows sees the same random streams). samples: use that many samples
    evenly spaced over the split (every class is in it whatever the order);
    None or 0: all. Returns name -> tensor of the parameter's shape."""
    kb, head = model.kb(t), model.heads.task_module(t)
    x, y = split.x, split.y
    if samples and samples < len(y):
        keep = torch.linspace(0, len(y) - 1, samples, device=y.device).round().long()
        x, y = x[keep], y[keep]
    params = {name: p.detach() for name, p in kb.named_parameters()}

    def log_likelihood(params, xi, yi):                 # one sample: xi (C, H, W), yi ()
        logits = head(functional_call(kb, params, (xi[None],)))          # (1, k_t)
        return -model.loss(logits, yi[None], t)        # cross-entropy = -log p(y | x)

    per_sample_grads = vmap(grad(log_likelihood), in_dims=(None, 0, 0))
    model.eval()
    fisher = {name: torch.zeros_like(p) for name, p in params.items()}
    for xb, yb in zip(x.split(chunk), y.split(chunk)):
        for name, g in per_sample_grads(params, xb, yb).items():       # g: (chunk, *shape)
            fisher[name] += g.pow(2).sum(0)
    return {name: f / len(y) for name, f in fisher.items()}


def train_task_ewc(model, t, task, cfg, gen, timer):
    """EWC: Baseline 1's step 2 (KB + head on every task) with the EWC penalty
    added to every batch's loss, then the task's Fisher and the new anchor
    into the method's state (model.method_state, an EWCState)."""
    state, kb = model.method_state, model.kb(t)
    with timer("2 KB + head + EWC"):
        mm.step2_pretrain_kb(model, t, task, cfg, gen, extra_loss=lambda: state.penalty(kb, cfg.ewc_lambda))
    with timer("EWC Fisher"):
        state.consolidate(kb, empirical_fisher(model, t, task.train, cfg.ewc_fisher_samples))


# ---------------------------------------------------------------------------
# The methods
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Method:
    """One method of the table.

    train_task(model, t, task, cfg, gen, timer) trains task t (experiment.run_seed);
    model_options go to the model builder (mark_min.build_model, market.build_model);
    config_class is the method's settings: mm.Config, or a subclass that adds
      the method's own fields (experiment.param), which become flags only this
      method takes, and part of its runs' identity only;
    make_state(cfg, model) -> an nn.Module of the method's own tensors, kept
      between tasks; it is attached as model.method_state, so model.state_dict()
      carries it into every checkpoint and --resume restores it (None: none)."""
    description: str
    train_task: Callable
    model_options: dict = dataclasses.field(default_factory=dict)
    config_class: type = mm.Config
    make_state: Callable | None = None

    def own_settings(self) -> list:
        """The fields the method's config class adds to mm.Config."""
        shared = {f.name for f in dataclasses.fields(mm.Config)}
        return [f for f in dataclasses.fields(self.config_class) if f.name not in shared]

    def builder(self, build=mm.build_model):
        """build_model(cfg, in_shape, classes_per_task, device, **more) of this
        method: build(..., **more, **model_options), with the method's state
        attached (built after the model, and drawing no random numbers: the
        same seed gives the same initial weights as without it)."""
        def build_model(cfg, in_shape, classes_per_task, device, **more):
            model = build(cfg, in_shape, classes_per_task, device, **more, **self.model_options)
            if self.make_state is not None:
                model.method_state = self.make_state(cfg, model)
            return model
        return build_model


METHODS = {
    "mark": Method("MARK", mm.train_task_mark),
    "b1": Method("Baseline 1 (sequential KB, no masks)", train_task_b1, {"masks": False}),
    "b2": Method("Baseline 2 (B1 + meta-update)", train_task_b2, {"masks": False}),
    "b2-report": Method("Baseline 2, the report's code (KB trained on task 1 only, then meta-updates)",
                        partial(train_task_b2, kb_every_task=False), {"masks": False}),
    "b3": Method("Baseline 3 (B1 + masks)", train_task_b3),
    # Baseline 4 trains each task's own KB exactly like Baseline 1 trains the shared one.
    "b4": Method("Baseline 4 (independent network per task)", train_task_b1,
                 {"masks": False, "kb_per_task": True}),
    "ablation": Method("MARK, KB frozen after task 1", partial(mm.train_task_mark, meta=False)),
    "ewc": Method("EWC (B1 + Fisher-weighted penalty on the KB)", train_task_ewc, {"masks": False},
                  config_class=EWCConfig, make_state=lambda cfg, model: EWCState(model.kb(0))),
}
ALIASES = {"1": "b1", "2": "b2", "3": "b3", "4": "b4", "baseline1": "b1", "baseline2": "b2",
           "baseline3": "b3", "baseline4": "b4", "frozen": "ablation"}

# The paper's and the course report's tables: (acc %, acc std or None, bwt %, source).
REFERENCE = {
    "cifar100": {"b1": (30.61, 0.904, -34.76, "report"), "b2": (39.62, 0.511, -5.19, "report"),
                 "b2-report": (39.62, 0.511, -5.19, "report"),
                 "b3": (30.69, 1.008, -18.47, "report"), "mark": (78.31, 0.3, -0.27, "paper"),
                 "ablation": (80.13, None, 0.0, "report")},
    "imagedata": {"b1": (40.11, 3.92, -53.55, "report"), "b2": (23.16, 1.41, -73.53, "report"),
                  "b2-report": (23.16, 1.41, -73.53, "report"),
                  "b3": (42.38, 2.94, -61.57, "report"), "mark": (99.77, 0.06, -0.0022, "report")},
}
# The report's own MARK row on CIFAR-100, shown beside the paper's.
REFERENCE_EXTRA = {("cifar100", "mark"): (80.36, 0.313, -0.025, "report")}


def method_config(method, cfg, settings=None):
    """cfg as an instance of `method`'s config class: cfg's settings, and the
    method's own from `settings` (name -> value, its given flags), else their
    defaults. A cfg of a class with settings the method's class lacks
    (MarketCL's) is refused."""
    cls, settings = METHODS[method].config_class, settings or {}
    if isinstance(cfg, cls):
        return dataclasses.replace(cfg, **settings)
    names = {f.name for f in dataclasses.fields(cls)}
    foreign = [f.name for f in dataclasses.fields(cfg) if f.name not in names]
    if foreign:
        raise experiment.RunError(f"--method {method} ({METHODS[method].description}) does not take "
                                  f"the settings {', '.join(foreign)} of {type(cfg).__name__}")
    return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}, **settings)


def run_method(cfg, method, overridden=frozenset(), log=experiment.log_line):
    m = METHODS[method]
    return mm.run(method_config(method, cfg), overridden, method, m.train_task, m.builder(), log)


# ---------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------

def reference_cells(dataset, method):
    refs = [REFERENCE.get(dataset, {}).get(method), REFERENCE_EXTRA.get((dataset, method))]
    refs = [r for r in refs if r]
    if not refs:
        return "", ""
    acc = " / ".join(f"{a:.2f}" + (f" ({s:g})" if s is not None else "") + f" [{src}]"
                     for a, s, _, src in refs)
    bwt = " / ".join(f"{b:g} [{src}]" for _, _, b, src in refs)
    return acc, bwt


def table_rows(results_by_method: dict, dataset: str) -> list[dict]:
    """One row per method from its results.json content (fractions in, as
    metrics wants), over its finished runs (experiment.summarize, as results.json)."""
    rows = []
    for method, results in results_by_method.items():
        summary = experiment.summarize(results["runs"], METHODS[method].description)
        if not summary:
            continue
        runs = [r for r in results["runs"] if experiment.run_finished(r)]
        ref_acc, ref_bwt = reference_cells(dataset, method)
        rows.append(summary | {
            "parameters": f"{runs[0]['parameters']:,d}",
            "wall time / run": f"{np.mean([sum(r['task_seconds']) for r in runs]) / 60:.1f} min",
            "runs": str(summary["runs"]),
            "reference Acc (std) %": ref_acc, "reference BWT %": ref_bwt})
    return rows


def per_task_table(found: dict, a="mark", b="ablation") -> str:
    """Does the meta-update change any task? For each seed that both methods
    finished: every task's accuracy just after it was learned (R[j][j]) and
    after the last task (R[T-1][j]), MARK beside the frozen-KB ablation, in %.
    Within MARK, the two columns differ only by the later tasks' meta-updates.
    Between the methods, step 4 also draws random numbers (heads, dropout,
    batch order), so every later task starts from other random draws: the
    last column mixes the meta-update's effect with that of another seed."""
    finished = lambda m: {r["seed"]: r for r in found.get(m, {}).get("runs", []) if experiment.run_finished(r)}
    runs_a, runs_b = finished(a), finished(b)
    lines = []
    for seed in sorted(set(runs_a) & set(runs_b)):
        Ra, Rb = (np.array(runs[seed]["acc_matrix"], dtype=float) for runs in (runs_a, runs_b))
        lines += [f"Per task, seed {seed}: {METHODS[a].description} beside {METHODS[b].description} "
                  "(accuracy %)", "",
                  f"| task | {a}: just learned | {a}: after the last task | {b}: just learned | "
                  f"{b}: after the last task | {a} - {b}, after the last task |", "|---|---|---|---|---|---|"]
        lines += [f"| {j + 1} | {100 * Ra[j, j]:.2f} | {100 * Ra[-1, j]:.2f} | {100 * Rb[j, j]:.2f} | "
                  f"{100 * Rb[-1, j]:.2f} | {100 * (Ra[-1, j] - Rb[-1, j]):+.2f} |" for j in range(len(Ra))]
        lines.append("")
    return "\n".join(lines)


def all_results(out: Path) -> dict:
    return {m: out / m / "results.json" for m in METHODS if (out / m / "results.json").exists()}


def saved_identity(results: dict, run: dict, cfg=mm.Config()) -> dict:
    """A run's identity as saved with it. A results.json written before runs
    recorded their identity has only the configuration of the command that
    last wrote it, which stands in for it here (a table only reads)."""
    if "identity" in run:
        return experiment.with_new_settings(run["identity"], cfg)
    if "config" not in results:
        return {}
    fields = {f.name for f in dataclasses.fields(type(cfg))}
    config = type(cfg)(**{k: v for k, v in results["config"].items() if k in fields})
    return experiment.run_identity(config, results.get("method"), run["seed"])


def table_dataset(out: Path, found: dict, expected: str | None, identities: dict) -> str:
    """The dataset of the runs under OUT, which must all share it and one
    schedule (every setting but method and seed): a table compares methods on
    equal terms. `expected` (a --dataset given with --table) must match.
    identities: "method seed S" -> that run's saved identity."""
    settings = {name: {k: v for k, v in identity.items() if k not in ("method", "seed")}
                for name, identity in identities.items()}
    if not settings:
        raise experiment.RunError(f"{out}: the results.json files under it hold no run yet")
    (first, shared), *others = settings.items()
    if "dataset" not in shared:
        raise experiment.RunError(f"{out}: the runs of {first} do not say which dataset they ran on "
                          "(written by an older version); run them again into a new --out")
    for name, setting in others:
        if setting != shared:
            raise experiment.RunError(f"{out} mixes runs of different settings, {first} and {name}: "
                                      f"{experiment.identity_differences(shared, setting, (first, name))}; "
                                      "put each dataset and schedule in its own folder")
    if expected and expected != shared["dataset"]:
        raise experiment.RunError(f"the runs under {out} ran on {shared['dataset']}, not {expected}; "
                                  "drop --dataset (the table takes it from the runs)")
    return shared["dataset"]


def build_table(out: Path, dataset: str | None = None, log=print, cfg=mm.Config(), market_table=None):
    """Read OUT/<method>/results.json, print and save table.md and table.json.
    The dataset is the runs' own; `dataset`, if given, must be theirs.
    market_table(found, descriptions): MarketCL's table (market.py)."""
    found = {m: experiment.read_results(path) for m, path in all_results(out).items()}
    if not found:
        raise experiment.RunError(f"no OUT/<method>/results.json under {out}; run with --all first")
    # The settings every method has; a method's own (EWC's lambda) are not
    # part of the terms on which the table compares methods.
    shared = set(experiment.run_identity(cfg, None, 0))
    settings = {f"{m} seed {run['seed']}": {k: v for k, v in saved_identity(res, run, cfg).items()
                                            if k in shared}
                for m, res in found.items() for run in res["runs"]}
    dataset = table_dataset(out, found, dataset, settings)
    experiment.prepare_out(out)             # table.md and table.json are written there
    schedule = next(iter(found.values())).get("schedule", "")
    if market_table:                        # MarketCL: per-label accuracy, the report's Table 3
        rows = None
        table = market_table(found, {name: m.description for name, m in METHODS.items()})
    else:
        rows = table_rows(found, dataset)
        extra = ["parameters", "wall time / run", "runs", "reference Acc (std) %", "reference BWT %"]
        table = metrics.format_table(rows, extra_columns=extra)
        experiment.atomic_write_json(out / "table.json", {"dataset": dataset, "schedule": schedule,
                                                          "rows": rows})
    text = f"Dataset {dataset}; {schedule}\n\n" + table
    if rows is not None and per_task_table(found):
        text += "\n\n" + per_task_table(found)
    (out / "table.md").write_text(text + "\n")
    log(text)
    return rows


def plot(results_paths: dict, out: Path, log=print):
    """Per method: accuracy of each task over training (the report's Figures
    1-2 style) and the final accuracy matrix as a heat map, as OUT/<method>.png.
    results_paths maps method -> its results.json."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("--plot needs matplotlib, which is optional: pip install matplotlib "
            "(the table and results.json are written without it)")
        return
    for method, path in results_paths.items():
        if not path.exists():
            continue
        run = experiment.read_results(path)["runs"][0]
        if "acc_matrix" not in run:
            log(f"--plot draws task-list runs; {method}'s MarketCL results are in {path}")
            continue
        R = np.array([[np.nan if v is None else v for v in row] for row in run["acc_matrix"]])
        T = len(R)
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        for j in range(T):
            ax1.plot(range(j + 1, T + 1), 100 * R[j:, j], marker=".", label=f"task {j + 1}")
        ax1.set(xlabel="after training task", ylabel="test accuracy %",
                title=f"{METHODS[method].description}: accuracy of each task (seed {run['seed']})")
        image = ax2.imshow(100 * R, vmin=0, vmax=100, cmap="viridis")
        ax2.set(xlabel="task j", ylabel="after task i", title="accuracy matrix R (%)")
        fig.colorbar(image, ax=ax2)
        fig.tight_layout()
        fig.savefig(out / f"{method}.png", dpi=100)
        plt.close(fig)
        log(f"wrote {out / f'{method}.png'}")


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def method_name(text: str) -> str:
    name = ALIASES.get(text.lower(), text.lower())
    if name not in METHODS:
        raise argparse.ArgumentTypeError(
            f"unknown method {text!r}; choose from {', '.join(METHODS)} (or 1-4)")
    return name


def add_method_flags(parser):
    """--method, --all, --table, --plot, and every method's own settings as
    flags, in a group per method (method_settings checks who takes them)."""
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--method", type=method_name, help=f"one of {', '.join(METHODS)} or 1-4")
    group.add_argument("--all", action="store_true", help="every method, then the table (needs --out)")
    group.add_argument("--table", metavar="DIR", help="print the table of a finished --all run")
    parser.add_argument("--plot", action="store_true", help="PNG plots per method (needs matplotlib)")
    for name, m in METHODS.items():
        if m.own_settings():
            experiment.add_field_flags(parser.add_argument_group(f"--method {name} only"), m.own_settings())


def method_settings(parser, args) -> dict:
    """The methods' own settings given on the command line, method -> {name:
    value}. A method's flag given to another method (or to --table) is a
    parser error that names the method owning it."""
    given = {}
    for name, m in METHODS.items():
        for f in m.own_settings():
            if f.name not in vars(args):
                continue
            if not (args.all or args.method == name):
                parser.error(f"--{f.name.replace('_', '-')} is a setting of --method {name} "
                             f"({m.description}); " + (f"--method {args.method} does not take it"
                                                       if args.method else "--table only reads runs"))
            given.setdefault(name, {})[f.name] = getattr(args, f.name)
    return given


def run_all(cfg, overridden, run_method=run_method, methods=METHODS, settings=None):
    """--all: every method into OUT/<method> with its own config class (its
    own settings from `settings`, method -> {name: value}, else their
    defaults), always resuming (finished method-seed pairs are skipped)
    unless --force; every method's folder is checked before the first one
    trains."""
    out, settings = Path(cfg.out), settings or {}
    method_cfgs = {method: method_config(method, dataclasses.replace(cfg, out=str(out / method),
                                                                     resume=not cfg.force),
                                         settings.get(method))
                   for method in methods}
    for method, method_cfg in method_cfgs.items():
        experiment.prepare_out(out / method)
        experiment.saved_runs(method_cfg, method)
    for method, method_cfg in method_cfgs.items():
        run_method(method_cfg, method, set(overridden) | set(settings.get(method, {})))


def parse(argv):
    """(cfg, the flags given, the namespace, the methods' own settings given:
    method -> {name: value}). argv is parsed twice: first to learn the
    method, then into its config class (--all and --table: mm.Config; --all
    gives each method its own settings in run_all)."""
    parser = experiment.make_parser(mm.Config, __doc__.split("\n\n")[0])
    add_method_flags(parser)
    first = parser.parse_args(argv)
    settings = method_settings(parser, first)
    config_class = METHODS[first.method].config_class if first.method else mm.Config
    cfg, overridden, args = experiment.parse_config(argv, config_class, parser, mm.resolve_config)
    if args.all and not cfg.out:
        parser.error("--all needs --out DIR (one sub-folder per method, and the table)")
    return cfg, overridden, args, settings


def main(argv=None):
    cfg, overridden, args, settings = parse(argv)

    def run():
        if args.table:
            build_table(Path(args.table), cfg.dataset if "dataset" in overridden else None)
            if args.plot:
                plot(all_results(Path(args.table)), Path(args.table))
        elif args.method:
            run_method(cfg, args.method, overridden)
            if args.plot and cfg.out:
                plot({args.method: Path(cfg.out) / "results.json"}, Path(cfg.out))
        else:
            run_all(cfg, overridden, settings=settings)
            build_table(Path(cfg.out), cfg.dataset)
            if args.plot:
                plot(all_results(Path(cfg.out)), Path(cfg.out))
    return experiment.report_errors(run, cfg)


if __name__ == "__main__":
    sys.exit(main())
