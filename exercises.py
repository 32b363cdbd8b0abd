"""exercises.py: course assignments made from the reference, with no second copy of the code.

    python exercises.py list                            # the exercises, what they grade with
    python exercises.py make --out student/             # the project, every exercise's bodies removed
    python exercises.py make --out student/ kb-forward  # only some exercises
    python exercises.py check                           # the reference and a student copy, graded

A teacher hands out the folder `make` writes: the whole project, in which the
functions of each chosen exercise keep their signature and docstring but
their body is `raise NotImplementedError("<the exercise>")`. The functions are
found by name in the reference (ast), so the reference carries no exercise
markers and there is no second copy to keep in step. The project's own tests
grade the student: `python -m pytest -q -k "<the exercise's tests>"` runs the
tests that pin the exercise's properties; the whole suite passes again once
every exercise is solved. ASSIGNMENTS.md gives each exercise's goal, its
place in the paper, and an experiment to run once it works.

`check` proves that grading works: in a copy where every exercise function
records which test calls it, the reference passes the whole suite; in a
student copy with every exercise removed, the tests that fail are exactly
those that call an exercise function (nothing else breaks), and for each
exercise alone, its named tests fail. About two minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import ast
import concurrent.futures
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
# What a copy of the project holds: the modules, the tests and the texts.
PROJECT_FILES = ("*.py", "*.md", "requirements.txt")


@dataclass(frozen=True)
class Exercise:
    name: str
    file: str
    functions: tuple[str, ...]    # "function" or "Class.method", found by name in file
    task: str                     # what to write, in one or two sentences (the stub's message)
    tests: str                    # pytest -k expression: the tests that pin its properties


EXERCISES = [
    Exercise("kb-forward", "mark_min.py", ("KnowledgeBase.forward",),
             "Run the KB on x: each conv block as conv_relu_pool, its output scaled by the block's "
             "mask, one scale per image and channel (masks=None: no scaling); then flatten, the "
             "linear layer, ReLU, and dropout (or the given noise).",
             "all_ones_mask or zeroed_mask_channel or sizes_follow_the_input_shape"),
    Exercise("meta-outer-step", "mark_min.py", ("meta_weights", "apply_meta_step"),
             "The outer step of the meta-update: the weights w_i = acc_i / sum_j acc_j (uniform if "
             "all are zero), g = sum_i w_i delta_i / K, and theta <- theta + sign * eps * g - "
             "eps * wd * theta, in place on the KB's parameters.",
             "meta_update_matches or reptile_moves or meta_weights or outer_step or zero_step_size"),
    Exercise("bwt-forgetting", "metrics.py", ("backward_transfer", "forgetting"),
             "Backward transfer (GEM's definition, divided by T - 1 unless told otherwise) and "
             "average forgetting (the best earlier accuracy minus the final one) of an accuracy "
             "matrix R, after checking R as average_accuracy does.",
             "backward_transfer or bwt or forgetting or single_task or bad_matrices or unknown_divisor"),
    Exercise("supsup-binarize", "supsup.py", ("binarize",),
             "Scores -> a {0, 1} mask: topk keeps the round(density * n) largest |score|, sign "
             "keeps score >= 0; the gradient passes straight through to the scores (through "
             "abs() for topk).",
             "supermasks or straight_through"),
    Exercise("class-weights", "market.py", ("MultiLabelMARKNet.set_class_weights",),
             "Inverse-frequency class weights of task t, per label: w_c = n / (k * n_c) from the "
             "training labels y (n, labels); a class absent from y gets weight 1.",
             "class_weighted or class_absent"),
    Exercise("baseline-3", "baselines.py", ("train_task_b3",),
             "Baseline 3 from MARK's steps: F_t trained as in step 1, then the KB, M_t and C_t "
             "trained together with the masks applied (epochs_kb epochs at lr), on every task.",
             "baseline3"),
]
BY_NAME = {exercise.name: exercise for exercise in EXERCISES}


# ---------------------------------------------------------------------------
# Finding a function and rewriting its body
# ---------------------------------------------------------------------------

def find_function(tree: ast.Module, qualified: str):
    """The FunctionDef `name` or `Class.name` at the top level of a module."""
    *owner, name = qualified.split(".")
    scope = tree.body
    if owner:
        (cls,) = [n for n in scope if isinstance(n, ast.ClassDef) and n.name == owner[0]] or [None]
        if cls is None:
            raise LookupError(f"no class {owner[0]}")
        scope = cls.body
    for node in scope:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            return node
    raise LookupError(f"no function {qualified}")


def edit_bodies(source: str, functions, new_lines, keep_body=False) -> str:
    """source with new_lines(qualified name, indentation) put in each function
    right after its docstring: in place of the rest of the body, or, with
    keep_body, in front of it."""
    tree, lines = ast.parse(source), source.split("\n")
    nodes = sorted(((find_function(tree, f), f) for f in functions), key=lambda nf: -nf[0].lineno)
    for node, name in nodes:                      # bottom up: earlier line numbers stay valid
        body = node.body
        has_doc = isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str)
        rest = body[1:] if has_doc else body
        if not rest:
            raise LookupError(f"{name} has nothing but a docstring")
        start = rest[0].lineno - 1                  # 0-based index of the first line after the docstring
        end = start if keep_body else node.end_lineno
        lines[start:end] = new_lines(name, " " * rest[0].col_offset)
    return "\n".join(lines)


def stub_source(source: str, exercise: Exercise) -> str:
    message = f"exercise {exercise.name} (ASSIGNMENTS.md): {exercise.task}"
    return edit_bodies(source, exercise.functions,
                       lambda name, indent: [f"{indent}raise NotImplementedError({message!r})"])


def removed(folder: Path = HERE) -> list[str]:
    """The exercises whose functions are stubs in folder (a student copy)."""
    def stubbed(exercise):
        tree = ast.parse((folder / exercise.file).read_text())
        for name in exercise.functions:
            body = find_function(tree, name).body
            last = body[-1]
            if isinstance(last, ast.Raise) and "exercise " in ast.unparse(last):
                return True
        return False
    return [exercise.name for exercise in EXERCISES if stubbed(exercise)]


def copy_project(into: Path):
    into.mkdir(parents=True, exist_ok=True)
    for pattern in PROJECT_FILES:
        for path in HERE.glob(pattern):
            shutil.copy2(path, into / path.name)


def make(out: Path, exercises) -> None:
    """Write the student copy: the project with the exercises' bodies removed."""
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"error: {out} is not empty; give a new folder for the student copy")
    copy_project(out)
    for exercise in exercises:
        path = out / exercise.file
        path.write_text(stub_source(path.read_text(), exercise))


# ---------------------------------------------------------------------------
# check: the reference passes, the student copy fails exactly the right tests
# ---------------------------------------------------------------------------

# The line the traced copy puts at the top of every exercise function: it
# appends "test<TAB>exercise" to $EXERCISE_TRACE_FILE, the test named by
# $EXERCISE_TRACE_TEST (set by the conftest below, and inherited by a test's
# subprocesses). Standard library only, so a module copied elsewhere by a
# test still runs.
TRACE_LINE = ("__import__('os').environ.get('EXERCISE_TRACE_FILE') and open(__import__('os').environ"
              "['EXERCISE_TRACE_FILE'], 'a').write(__import__('os').environ.get('EXERCISE_TRACE_TEST', '')"
              " + '\\t{name}\\n')")
# The running test's id, for the whole of its setup, call and teardown; while
# a fixture is set up, the fixture's name, and every test lists its fixtures:
# a test whose module-scoped fixture called an exercise function depends on it
# too, though the call happened once, before it.
TRACE_CONFTEST = '''"""Written by exercises.py check: which test (or fixture) is running."""
import os

import pytest


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    os.environ["EXERCISE_TRACE_TEST"] = item.nodeid
    with open(os.environ["EXERCISE_TRACE_FILE"], "a") as f:
        f.write("".join(f"{item.nodeid}\\tfixture::{name}\\n" for name in item.fixturenames))
    yield
    os.environ.pop("EXERCISE_TRACE_TEST", None)


@pytest.hookimpl(hookwrapper=True)
def pytest_fixture_setup(fixturedef, request):
    running = os.environ.get("EXERCISE_TRACE_TEST")
    os.environ["EXERCISE_TRACE_TEST"] = f"fixture::{fixturedef.argname}"
    yield
    if running is None:
        os.environ.pop("EXERCISE_TRACE_TEST", None)
    else:
        os.environ["EXERCISE_TRACE_TEST"] = running
'''


def pytest_run(folder: Path, *args, env=None) -> tuple[int, set[str], str]:
    """(exit code, node ids of failed or erroring tests, output) of pytest in folder."""
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", *args],
                          cwd=folder, capture_output=True, text=True, env=env)
    failed = {re.split(r" - ", line.split(" ", 1)[1])[0] for line in done.stdout.splitlines()
              if line.startswith(("FAILED ", "ERROR "))}
    return done.returncode, failed, done.stdout[-3000:] + done.stderr[-3000:]


def traced_reference(folder: Path) -> tuple[int, dict[str, set[str]], str]:
    """Run the whole suite on a copy whose exercise functions record their
    callers; returns (exit code, exercise -> node ids of the tests that call
    one of its functions, output)."""
    copy_project(folder)
    if (folder / "conftest.py").exists():
        raise SystemExit("error: the project has a conftest.py; exercises.py check needs to write its own")
    (folder / "conftest.py").write_text(TRACE_CONFTEST)
    by_file = {}
    for exercise in EXERCISES:
        by_file.setdefault(exercise.file, []).append(exercise)
    for file, exercises in by_file.items():
        owner = {f: e.name for e in exercises for f in e.functions}
        path = folder / file
        path.write_text(edit_bodies(path.read_text(), list(owner), lambda name, indent: [
            indent + TRACE_LINE.format(name=owner[name])], keep_body=True))
    trace = folder / "trace.tsv"
    env = os.environ | {"EXERCISE_TRACE_FILE": str(trace)}
    code, _, output = pytest_run(folder, env=env)
    called, fixtures = {}, {}                          # who called what; which test uses which fixture
    for line in trace.read_text().splitlines() if trace.exists() else []:
        who, what = line.split("\t")
        if what.startswith("fixture::"):
            fixtures.setdefault(who, set()).add(what)
        else:
            called.setdefault(what, set()).add(who)
    callers = {e.name: {test for test in called.get(e.name, set()) if not test.startswith("fixture::")}
               | {test for test, used in fixtures.items() if used & called.get(e.name, set())}
               for e in EXERCISES}
    return code, callers, output



def counts(output: str) -> dict[str, int]:
    """{"passed": n, "failed": n, ...} from pytest's last line."""
    return {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|errors?|deselected|skipped)", output)}


def check(log=print) -> bool:
    """The three checks of the module docstring; True if all hold."""
    with tempfile.TemporaryDirectory(prefix="exercises-") as tmp:
        tmp = Path(tmp)
        make(tmp / "student", EXERCISES)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:     # the two long runs side by side
            reference = pool.submit(traced_reference, tmp / "reference")
            student = pool.submit(pytest_run, tmp / "student")
            ref_code, callers, ref_output = reference.result()
            _, failed, student_output = student.result()
        ok = ref_code == 0
        log(f"reference, whole suite: {'passes' if ok else 'FAILS'}")
        if not ok:
            log(ref_output)
        expected = set().union(*callers.values())
        for exercise in EXERCISES:
            log(f"  {exercise.name:<16s} called by {len(callers[exercise.name]):3d} tests")
            ok &= bool(callers[exercise.name])
        same = failed == expected
        log(f"student copy, every exercise removed: {len(failed)} tests fail, "
            f"{'exactly' if same else 'NOT exactly'} those that call an exercise function")
        if not same:
            log(f"    fail but call none: {sorted(failed - expected)[:10]}\n"
                f"    call one but pass: {sorted(expected - failed)[:10]}")
        ok &= same
        for exercise in EXERCISES:
            alone = tmp / f"alone-{exercise.name}"
            make(alone, [exercise])
            code, _, output = pytest_run(alone, "-k", exercise.tests)
            n = counts(output)
            graded = n.get("failed", 0) > 0 and n.get("passed", 0) == 0 and n.get("error", 0) == 0
            log(f"  {exercise.name:<16s} alone: {n.get('failed', 0)} of its tests fail, "
                f"{n.get('passed', 0)} pass{'' if graded else '   <- should all fail'}")
            ok &= graded
        return ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="the exercises, their functions and the tests that grade them")
    maker = commands.add_parser("make", help="write a student copy of the project")
    maker.add_argument("--out", required=True, type=Path, help="a new folder for the student copy")
    maker.add_argument("names", nargs="*", help=f"exercises (default all): {', '.join(BY_NAME)}")
    commands.add_parser("check", help="grade the reference and a student copy (about two minutes)")
    args = parser.parse_args(argv)
    if args.command == "list":
        for e in EXERCISES:
            print(f"{e.name:<16s} {e.file}: {', '.join(e.functions)}\n{'':<16s} graded by: "
                  f"python -m pytest -q -k \"{e.tests}\"")
        return 0
    if args.command == "make":
        unknown = [n for n in args.names if n not in BY_NAME]
        if unknown:
            parser.error(f"unknown exercise(s) {', '.join(unknown)}; choose from {', '.join(BY_NAME)}")
        chosen = [BY_NAME[n] for n in args.names] or EXERCISES
        make(args.out, chosen)
        print(f"wrote the student copy to {args.out} ({', '.join(e.name for e in chosen)})")
        return 0
    return 0 if check() else 1


if __name__ == "__main__":
    sys.exit(main())
