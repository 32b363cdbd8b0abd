"""mutants.py: does the test suite catch the mistakes that matter?

    python mutants.py              # every mutant, its tests only (about a minute on 2 cores)
    python mutants.py --full       # every mutant against the whole suite (slower)
    python mutants.py --list       # what each mutant breaks
    python mutants.py b4-shares-one-kb meta-sign-flipped

A test that cannot fail proves nothing. Each mutant below is one deliberate,
plausible mistake (the sign of the meta-update, a forgotten 1/K, a resume that
restores nothing, ...). For each, this script copies the project's modules to a
temporary folder, makes that one change there (the project itself is never
touched), and runs the tests named for it. The mutant is "killed" when a test
fails. The script fails unless every mutant is killed, and also when a mutant
no longer applies (the code it breaks was rewritten: update the mutant), or when
the unchanged copy does not pass the selected tests (a kill would mean nothing).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Mutant:
    name: str
    breaks: str        # what the mistake is, in words
    file: str
    old: str           # must occur exactly once in file
    new: str
    tests: str         # pytest -k expression: the tests that must catch it


MUTANTS = [
    # -- resume (run_seed): every restoring call matters ----------------------
    Mutant("resume-forgets-the-model", "--resume does not load the model's weights",
           "experiment.py", 'model.load_state_dict(saved)', "pass", "resume"),
    Mutant("resume-forgets-the-batch-order", "--resume does not restore the data generator",
           "experiment.py", 'gen.set_state(state["generator"])', "pass", "resume"),
    Mutant("resume-forgets-the-rng", "--resume does not restore torch's random state",
           "experiment.py", 'torch.set_rng_state(state["torch_rng"])', "pass", "resume"),
    # -- evaluation and task isolation ---------------------------------------
    Mutant("evaluated-with-the-wrong-task", "R[t, u] scored with task t's modules instead of task u's",
           "experiment.py", "R[t, u] = evaluate(model, u, tasks[u].test)",
           "R[t, u] = evaluate(model, t, tasks[u].test)", "end_to_end"),
    Mutant("b4-shares-one-kb", "Baseline 4's tasks all use the first KB",
           "mark_min.py", "return self.kbs[t if len(self.kbs) > 1 else 0]", "return self.kbs[0]",
           "baseline4"),
    Mutant("other-tasks-module-trained", "step 1 of task t trains task t-1's feature extractor",
           "mark_min.py", "fe, probe = model.extractors[t], model.new_head(",
           "fe, probe = model.extractors[t - 1], model.new_head(", "leaves_every_earlier"),
    Mutant("frozen-modules-left-in-train-mode", "freeze_all_but does not put frozen modules in eval mode",
           "mark_min.py", "    model.train(not frozen_eval)\n    model.requires_grad_(False)",
           "    model.train(True)\n    model.requires_grad_(False)", "frozen_module_is_in_eval_mode or batchnorm"),
    Mutant("kb-pretrained-on-every-task", "step 2 (ordinary KB training) runs on every task",
           "mark_min.py", "    if task.index == 0:\n        with timer(\"2 KB pre-training\"):",
           "    if True:\n        with timer(\"2 KB pre-training\"):", "only_by_the_meta_update"),
    Mutant("masks-not-applied", "the KB ignores the masks",
           "mark_min.py", "h = h * masks[l][:, :, None, None]", "h = h", "zeroed_mask"),
    # -- the meta-update (step 4) ----------------------------------------------
    Mutant("meta-sign-flipped", "the outer step's sign is swapped (Reptile <-> authors)",
           "mark_min.py", 'sign = {"reptile": +1.0, "authors": -1.0}[cfg.meta_sign]',
           'sign = {"reptile": -1.0, "authors": +1.0}[cfg.meta_sign]', "direct_computation or towards"),
    Mutant("meta-without-1/K", "the outer step forgets the 1/K factor",
           "mark_min.py", "g = sum(w * d[name] for w, d in zip(weights, deltas)) / K",
           "g = sum(w * d[name] for w, d in zip(weights, deltas))",
           "direct_computation or divides_by_k"),
    Mutant("meta-weights-uniform", "the meta-tasks are weighted equally, not by their accuracy",
           "mark_min.py", "weights = meta_weights(accs)", "weights = torch.full_like(accs, 1 / len(accs))",
           "direct_computation"),
    Mutant("meta-weights-unnormalised", "w_i = acc_i without dividing by the sum",
           "mark_min.py", "accs / total.clamp_min(1e-12)", "accs", "normalised_accuracies"),
    Mutant("inner-loop-without-dropout", "the meta-tasks' inner steps run with dropout off",
           "mark_min.py", "    p = cfg.dropout\n    if p == 0:\n        return None",
           "    p = cfg.dropout\n    if True:\n        return None", "direct_computation"),
    Mutant("inner-loop-without-momentum", "the inner SGD drops the momentum buffer",
           "mark_min.py", "bufs = {k: bufs[k] * momentum + (grads[k] + weight_decay * p)",
           "bufs = {k: 0 * momentum + (grads[k] + weight_decay * p)",
           "written_out_sgd or direct_computation"),
    # -- --authors-code: each of the authors' choices must really switch ------
    Mutant("acc-dropout-ignored", "--meta-acc-dropout measures acc_i without dropout all the same",
           "mark_min.py", "acc_noise = noise[cfg.meta_inner_steps] if cfg.meta_acc_dropout and noise is not None else None",
           "acc_noise = None", "direct_computation"),
    Mutant("clipping-everywhere", "--no-clip-every-step still clips in steps 2, 3 and 5",
           "mark_min.py", "if clip and cfg.clip > 0:", "if cfg.clip > 0:", "clip_every_step"),
    Mutant("frozen-eval-ignored", "--no-frozen-eval still reuses F_t's cached queries",
           "mark_min.py", "    if not cfg.frozen_eval:\n        # DEVIATION 2 undone",
           "    if False:\n        # DEVIATION 2 undone", "frozen_eval"),
    # -- EWC (baselines.py): its state and its penalty -------------------------
    Mutant("ewc-fisher-not-accumulated", "EWC keeps only the latest task's Fisher instead of the sum",
           "baselines.py", 'self.get_buffer(self.key("fisher", name)).add_(fisher[name])',
           'self.get_buffer(self.key("fisher", name)).copy_(fisher[name])', "ewc_state_accumulates"),
    Mutant("ewc-anchor-not-updated", "EWC's anchor theta* stays at zero instead of the latest KB",
           "baselines.py", 'self.get_buffer(self.key("anchor", name)).copy_(p)', "pass",
           "ewc_state_accumulates or ewc_resume"),
    Mutant("ewc-state-not-attached", "EWC's state is kept beside the model, not as its submodule",
           "baselines.py", "model.method_state = self.make_state(cfg, model)",
           'object.__setattr__(model, "method_state", self.make_state(cfg, model))', "ewc_resume"),
    Mutant("ewc-fisher-not-saved", "EWC's Fisher is a non-persistent buffer: checkpoints lack it",
           "baselines.py", 'self.register_buffer(self.key("fisher", name), torch.zeros_like(p))',
           'self.register_buffer(self.key("fisher", name), torch.zeros_like(p), persistent=False)',
           "ewc_resume"),
    Mutant("ewc-fisher-of-the-batch-gradient", "EWC squares the chunk's summed gradient, not each sample's",
           "baselines.py", "fisher[name] += g.pow(2).sum(0)", "fisher[name] += g.sum(0).pow(2)",
           "per_sample_gradient"),
    Mutant("extra-loss-ignored", "step 2 drops its extra loss (EWC trains as Baseline 1)",
           "mark_min.py", "task_loss, loss = loss, lambda i: task_loss(i) + extra_loss()",
           "task_loss = loss", "ewc_forgets_less"),
    # -- metrics --------------------------------------------------------------
    Mutant("bwt-divided-by-T", "BWT divides by T instead of T - 1",
           "metrics.py", '    if divide_by == "T-1":\n        return max(T - 1, 1)',
           '    if divide_by == "T-1":\n        return T',
           "backward_transfer or bwt"),
    Mutant("day-matrix-ends-without-the-last-row", "MarketCL's --day-matrix ends never re-tests the "
           "day's earlier symbols at its end", "market.py",
           'if cfg.day_matrix == "full" or i == len(tested) - 1 else [i])',
           'if cfg.day_matrix == "full" else [i])', "day_matrix"),
    # -- SupSup ---------------------------------------------------------------
    Mutant("supsup-wrong-scores", "a SupSup layer builds task t's supermask from another task's scores",
           "supsup.py", "return binarize(self.scores[t], self.how, self.density)",
           "return binarize(self.scores[t - 1], self.how, self.density)", "supsup_training_task_t"),
    # -- data -----------------------------------------------------------------
    Mutant("market-target-strict", "a close exactly at the target does not count as reaching it",
           "market_data.py", "(close[None, :] >= (close * (1 + target))[:, None])",
           "(close[None, :] > (close * (1 + target))[:, None])", "label_rule or threshold_ties"),
    Mutant("market-stop-inclusive", "a close exactly at the stop level stops",
           "market_data.py", "(close[None, :] < (close * (1 - stop))[:, None])",
           "(close[None, :] <= (close * (1 - stop))[:, None])", "label_rule or threshold_ties"),
    Mutant("unpickler-unrestricted", "CIFAR-100's pickles may call any function",
           "data.py", "    def find_class(self, module, name):\n        if (module, name) in _PICKLE_GLOBALS:",
           "    def find_class(self, module, name):\n        return super().find_class(module, name)\n"
           "        if (module, name) in _PICKLE_GLOBALS:", "pickle_that_calls"),
    Mutant("one-shot-ascends-the-entropy", "SupSup's one-shot rule picks the task whose alpha raises the entropy most",
           "task_inference.py", "    return int(gradient.argmin())", "    return int(gradient.argmax())",
           "entropys_descent"),
    # -- the layout -----------------------------------------------------------
    Mutant("core-imports-an-extension", "mark_min.py imports supsup.py (lazily, inside main)",
           "mark_min.py", "    cfg, given, args = parse(argv)\n",
           "    import supsup  # noqa\n    cfg, given, args = parse(argv)\n", "lower_layers"),
]


def copy_project(into: Path) -> None:
    """The project's modules (what the tests import) into a fresh folder."""
    for path in HERE.glob("*.py"):
        shutil.copy2(path, into / path.name)


def apply(mutant: Mutant, folder: Path) -> None:
    path = folder / mutant.file
    text = path.read_text()
    found = text.count(mutant.old)
    if found != 1:
        raise LookupError(f"mutant {mutant.name}: the code it changes occurs {found} times in "
                          f"{mutant.file} (expected once); update the mutant to the current code")
    path.write_text(text.replace(mutant.old, mutant.new))


def run_tests(folder: Path, selection: str | None) -> tuple[int, str]:
    """pytest in `folder` on the tests matching `selection` (None: all); stops at the first failure."""
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider"]
    if selection:
        command += ["-k", selection]
    done = subprocess.run(command, cwd=folder, capture_output=True, text=True)
    return done.returncode, done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr


def check(mutant: Mutant | None, full: bool, selection: str) -> tuple[str, str, float]:
    """Run one mutant (None: the unchanged code) in its own copy. Returns
    (verdict, pytest's last line, seconds)."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mutant-") as tmp:
        folder = Path(tmp)
        copy_project(folder)
        if mutant:
            apply(mutant, folder)
        code, last = run_tests(folder, None if full else selection)
    seconds = time.perf_counter() - start
    if code == 5:
        return "NO TESTS", f"no test matches -k {selection!r}", seconds
    if mutant is None:
        return ("clean" if code == 0 else "CLEAN COPY FAILS"), last, seconds
    return {0: "SURVIVED", 1: "killed"}.get(code, f"ERROR (pytest exit {code})"), last, seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="mutants to run (default: all)")
    parser.add_argument("--full", action="store_true", help="run the whole suite for every mutant")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="mutants run at once")
    args = parser.parse_args(argv)
    if args.list:
        for m in MUTANTS:
            print(f"{m.name:<36s} {m.breaks}  [{m.file}; tests: -k {m.tests!r}]")
        return 0
    known = {m.name: m for m in MUTANTS}
    unknown = [n for n in args.names if n not in known]
    if unknown:
        parser.error(f"unknown mutant(s) {', '.join(unknown)}; --list shows them")
    chosen = [known[n] for n in args.names] or MUTANTS
    start = time.perf_counter()
    # The unchanged code must pass every selection, or a "kill" would mean nothing.
    union = " or ".join(f"({m.tests})" for m in chosen)
    verdict, last, _ = check(None, args.full, union)
    print(f"{'unchanged code':<36s} {verdict:<10s} {last}")
    if verdict != "clean":
        return 1
    with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
        futures = {m: pool.submit(check, m, args.full, m.tests) for m in chosen}
        results = {}
        for m in chosen:
            try:
                results[m] = futures[m].result()
            except LookupError as err:
                results[m] = ("STALE", str(err), 0.0)
            verdict, last, seconds = results[m]
            print(f"{m.name:<36s} {verdict:<10s} {seconds:5.1f}s  {last}")
    bad = [m.name for m, (verdict, _, _) in results.items() if verdict != "killed"]
    print(f"{len(chosen) - len(bad)}/{len(chosen)} mutants killed in "
          f"{time.perf_counter() - start:.0f} s" + (f"; not killed: {', '.join(bad)}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
