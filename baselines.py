"""baselines.py: the baselines and the ablation beside MARK, and the reproduction table.

    python baselines.py --method b1                          # one method, glyphs, quick profile
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

Every method takes the flags of mark_min.py (dataset, seed, runs, device,
profile, --out, ...) and writes the same results.json schema, to
OUT/<method>/results.json with --all. --all can be stopped and started again:
finished method-seed pairs are not run again. The same methods run on
MarketCL through market.py.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from functools import partial
from pathlib import Path

import numpy as np

import experiment
import metrics
import mark_min as mm


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


# name -> (description, train_task function, options of mark_min.build_model)
METHODS = {
    "mark": ("MARK", mm.train_task_mark, {}),
    "b1": ("Baseline 1 (sequential KB, no masks)", train_task_b1, {"masks": False}),
    "b2": ("Baseline 2 (B1 + meta-update)", train_task_b2, {"masks": False}),
    "b2-report": ("Baseline 2, the report's code (KB trained on task 1 only, then meta-updates)",
                  partial(train_task_b2, kb_every_task=False), {"masks": False}),
    "b3": ("Baseline 3 (B1 + masks)", train_task_b3, {}),
    # Baseline 4 trains each task's own KB exactly like Baseline 1 trains the shared one.
    "b4": ("Baseline 4 (independent network per task)", train_task_b1,
           {"masks": False, "kb_per_task": True}),
    "ablation": ("MARK, KB frozen after task 1", partial(mm.train_task_mark, meta=False), {}),
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


def run_method(cfg, method, overridden=frozenset(), log=experiment.log_line):
    description, train_task, model_options = METHODS[method]
    return mm.run(cfg, overridden, method, train_task, partial(mm.build_model, **model_options), log)


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
    metrics wants), over its finished runs (mm.summarize, as results.json)."""
    rows = []
    for method, results in results_by_method.items():
        summary = experiment.summarize(results["runs"], METHODS[method][0])
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
        lines += [f"Per task, seed {seed}: {METHODS[a][0]} beside {METHODS[b][0]} (accuracy %)", "",
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
    settings = {f"{m} seed {run['seed']}": saved_identity(res, run, cfg) for m, res in found.items()
                for run in res["runs"]}
    dataset = table_dataset(out, found, dataset, settings)
    experiment.prepare_out(out)             # table.md and table.json are written there
    schedule = next(iter(found.values())).get("schedule", "")
    if market_table:                        # MarketCL: per-label accuracy, the report's Table 3
        rows = None
        table = market_table(found, {m: description for m, (description, _, _) in METHODS.items()})
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
                title=f"{METHODS[method][0]}: accuracy of each task (seed {run['seed']})")
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
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--method", type=method_name, help=f"one of {', '.join(METHODS)} or 1-4")
    group.add_argument("--all", action="store_true", help="every method, then the table (needs --out)")
    group.add_argument("--table", metavar="DIR", help="print the table of a finished --all run")
    parser.add_argument("--plot", action="store_true", help="PNG plots per method (needs matplotlib)")


def run_all(cfg, overridden, run_method=run_method):
    """--all: every method into OUT/<method>, always resuming (finished
    method-seed pairs are skipped) unless --force; every method's folder is
    checked before the first one trains."""
    out = Path(cfg.out)
    method_cfgs = {method: dataclasses.replace(cfg, out=str(out / method), resume=not cfg.force)
                   for method in METHODS}
    for method, method_cfg in method_cfgs.items():
        experiment.prepare_out(out / method)
        experiment.saved_runs(method_cfg, method)
    for method, method_cfg in method_cfgs.items():
        run_method(method_cfg, method, overridden)


def main(argv=None):
    parser = experiment.make_parser(mm.Config, __doc__.split("\n\n")[0])
    add_method_flags(parser)
    cfg, overridden, args = experiment.parse_config(argv, mm.Config, parser, mm.resolve_config)
    if args.all and not cfg.out:
        parser.error("--all needs --out DIR (one sub-folder per method, and the table)")

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
            run_all(cfg, overridden)
            build_table(Path(cfg.out), cfg.dataset)
            if args.plot:
                plot(all_results(Path(cfg.out)), Path(cfg.out))
    return experiment.report_errors(run, cfg)


if __name__ == "__main__":
    sys.exit(main())
