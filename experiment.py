"""experiment.py: running a continual learner over a stream, and keeping what it learned.

Everything around the method that a trustworthy run needs, written once for
MARK, its baselines and its extensions:

    run_experiment    seeds seed..seed+runs-1 over a task stream; the accuracy
                      matrix R (R[i][j]: accuracy on task j after training
                      task i), ACC and BWT, written to OUT/results.json after
                      every task, with a checkpoint, so --resume continues
    run identity      what a run's numbers depend on (its hyperparameters, its
                      data, method and seed), saved with it: --resume and the
                      merge of results.json refuse to mix two configurations
    the run folder    --out is checked before anything trains and locked while
                      a run writes into it; --force replaces its runs
    the command line  one flag per field of a settings dataclass, with the
                      field's help, checked on parse (make_parser, parse_config)

It knows nothing of MARK: a method is a name, a function that builds its
model and a function that trains one task (mark_min.py, baselines.py). It
sits above data.py and metrics.py and below every method.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import fcntl
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import metrics
from data import DataError, load_tasks


class TrainingDiverged(RuntimeError):
    """A loss became NaN or infinite; the message names task, step and epoch."""


# ---------------------------------------------------------------------------
# Settings: a dataclass whose fields carry their help and their role
# ---------------------------------------------------------------------------
#
# Every field of a settings dataclass (mark_min.Config and its extensions) is
# declared with param(default, help, role). The role says whether the field
# belongs to a run's identity:
#   "hyper"  a hyperparameter: changes the numbers (in the identity)
#   "data"   which data: dataset, file, tasks kept (in the identity)
#   "run"    where and how it runs: folders, device, threads, seeds to run,
#            and settings that give the same numbers (not in the identity)
# The profile and epoch scale are "run": they enter the identity through the
# epoch counts they resolve to.

def param(default, help: str, role: str = "hyper", *, choices=None, type=None):
    """A settings field: its default, the help of its flag, its role, and
    optionally the values it takes (choices) or an argparse type."""
    assert role in ("hyper", "data", "run"), role
    metadata = {"help": help, "role": role}
    if choices is not None:
        metadata["choices"] = list(choices)
    if type is not None:
        metadata["type"] = type
    return dataclasses.field(default=default, metadata=metadata)


def fields_with_role(cfg_or_class, *roles) -> list[str]:
    return [f.name for f in dataclasses.fields(cfg_or_class) if f.metadata.get("role", "hyper") in roles]


def run_identity(cfg, method: str, seed: int) -> dict:
    """The identity of one run, as saved in its checkpoint and results.json:
    the hyperparameter and data fields, method and seed (JSON types: tuples
    become lists, a file or folder its absolute path)."""
    identity = {name: getattr(cfg, name) for name in fields_with_role(cfg, "hyper", "data")}
    for name in ("path", "source"):
        if identity.get(name) is not None:
            identity[name] = str(Path(identity[name]).resolve())
    return json.loads(json.dumps(identity | {"method": method, "seed": seed}))


def with_new_settings(saved: dict, cfg) -> dict:
    """A saved identity made comparable with one of today's settings class.

    Added settings: a run saved before a setting existed ran with its default
    (the rule for whoever adds one: its default keeps the arithmetic as it
    was), so the saved identity is completed with today's defaults.
    Moved settings: a setting that left this class for an extension's (for
    example the SupSup options, now in supsup.SupSupConfig) is listed in the
    class's MOVED_SETTINGS with the value that meant "not used"; a saved run
    with that value never used it, and the setting is dropped. Any other value
    stays, and the identities differ."""
    defaults = run_identity(type(cfg)(), saved.get("method"), saved.get("seed"))
    moved = getattr(type(cfg), "MOVED_SETTINGS", {})
    kept = {k: v for k, v in saved.items()
            if not (k in moved and k not in defaults and v == moved[k])}
    return {name: value for name, value in defaults.items() if name not in kept} | kept


def identity_differences(a: dict, b: dict, names=("saved", "now")) -> str:
    """'--lr 0.1 saved, 0.05 now; ...' for every key whose values differ."""
    flag = lambda key: key if key in ("method", "seed") else "--" + key.replace("_", "-")
    return "; ".join(f"{flag(key)} {a.get(key)!r} {names[0]}, {b.get(key)!r} {names[1]}"
                     for key in sorted(set(a) | set(b)) if a.get(key) != b.get(key))


# ---------------------------------------------------------------------------
# Loading a task stream
# ---------------------------------------------------------------------------

def load_task_stream(cfg, seed: int, device) -> list:
    """The task list of cfg.dataset for one seed, on the device. ImageData
    lives in imagedata.py (deleting it removes only --dataset imagedata)."""
    options = dict(data_dir=cfg.data_dir, seed=seed, num_tasks=cfg.num_tasks, device=device,
                   classes_per_task=getattr(cfg, "classes_per_task", None))
    if cfg.dataset == "imagedata":
        try:        # imagedata.py imports data.py, never the reverse
            import imagedata
        except ModuleNotFoundError as err:
            if err.name != "imagedata":
                raise
            raise DataError("--dataset imagedata needs imagedata.py beside mark_min.py, "
                            "and it is missing") from None
        return imagedata.load_imagedata(**options)
    return load_tasks(cfg.dataset, **options, **({"path": cfg.path} if cfg.path else {}))


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


@torch.inference_mode()
def evaluate(model, t, split, chunk=1000) -> float:
    """Accuracy (a fraction) of task t's model on a split, in eval mode (MARK:
    F_t, M_t, KB, C_t; the model's forward(x, t) and predict(logits))."""
    model.eval()
    correct = sum((model.predict(model(xb, t)) == yb).sum() for xb, yb in
                  zip(split.x.split(chunk), split.y.split(chunk)))
    return float(correct) / split.y.numel()       # several labels: the mean over labels


# Buffers that models saved before they moved to an extension, dropped when
# such a checkpoint is loaded: task inference's query statistics (now
# computed by task_inference.py) and MarketCL's class weights (market.py).
MOVED_BUFFERS = ("query_means", "query_var", "class_weights")


def run_seed(cfg, method: str, seed: int, tasks, train_task, build_model, device,
             out: Path | None, log, on_task_done=None, after_run=None) -> dict:
    """Train `method` on the whole stream for one seed and fill the accuracy matrix.

    R[i][j] = test accuracy on task j after training task i (j <= i).
    After every task: results for this seed (via on_task_done) and a
    checkpoint (model, R, times, random generator states) are written, so an
    interruption loses at most the task in progress. With cfg.resume the run
    continues from the checkpoint and ends with exactly the results of an
    uninterrupted run (same seed, same device). The checkpoint and the
    record carry the run's identity; a checkpoint of another run is refused.

    build_model(cfg, input_shape, classes_per_task, device) -> the model;
    train_task(model, t, task, cfg, gen, timer) trains task t. after_run:
    (key, fn) or None; fn(model, tasks, record, log) -> a dict kept in the
    record under key, computed once when the last task is done.
    """
    T = len(tasks)
    seed_everything(seed)
    try:        # a model that cannot take the data (images too small) says so, naming the data
        model = build_model(cfg, tasks[0].input_shape, [task.num_classes for task in tasks], device)
    except DataError as err:
        raise DataError(f"{getattr(cfg, 'path', None) or cfg.dataset}: {err}") from None
    gen = torch.Generator(device=device).manual_seed(seed)
    R = np.full((T, T), np.nan)
    identity = run_identity(cfg, method, seed)
    record = {"seed": seed, "method": method, "identity": identity, "tasks_done": 0,
              "parameters": count_parameters(model),
              "task_seconds": [], "step_seconds": []}
    ckpt = checkpoint_path(out, method, seed) if out else None
    if cfg.resume and ckpt and ckpt.exists():
        state = read_checkpoint(ckpt, identity, cfg)
        own = model.state_dict().keys()
        saved = {k: v for k, v in state["model"].items() if not (k in MOVED_BUFFERS and k not in own)}
        try:
            model.load_state_dict(saved)                 # copied onto the model's device
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
    if after_run and after_run[0] not in record:
        key, fn = after_run
        record[key] = fn(model, tasks, record, log)
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


def check_identity(saved: dict | None, wanted: dict, where, cfg):
    """Refuse to continue (or merge with) a run saved with another identity."""
    if saved is None:
        raise RunError(f"{where} was written before runs recorded their settings, so they cannot be "
                       "checked against this command; start again in a new --out")
    saved = with_new_settings(saved, cfg)
    if saved != wanted:
        raise RunError(f"{where} ran with other settings than this command: "
                       f"{identity_differences(saved, wanted)}. Give the saved settings to continue "
                       "it, or use another --out")


def read_checkpoint(path: Path, identity: dict, cfg) -> dict:
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
    check_identity(state.get("identity"), identity, path, cfg)
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


def saved_runs(cfg, method: str) -> dict:
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
                           f"{out / RESULTS_FILE} (seed {run['seed']})", cfg)
            runs[run["seed"]] = run
    for seed in range(cfg.seed, cfg.seed + cfg.runs):
        if checkpoint_path(out, method, seed).exists():
            read_checkpoint(checkpoint_path(out, method, seed), run_identity(cfg, method, seed), cfg)
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
def open_results(cfg, method: str, schedule: str, log, family=""):
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
    results = {"method": method, "schedule": schedule,
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


def run_experiment(cfg, method: str, train_task, build_model, schedule: str, log=log_line,
                   after_run=None) -> dict:
    """Run `method` over seeds seed..seed+runs-1; write results.json after every
    task. schedule: one line saying which schedule runs (saved and printed);
    build_model, train_task, after_run: see run_seed."""
    out = Path(cfg.out) if cfg.out else None
    with open_results(cfg, method, schedule, log) as (device, results, previous, save):
        for seed in range(cfg.seed, cfg.seed + cfg.runs):
            old = previous.get(seed)
            if old and run_finished(old):
                # A finished run is not trained again. With an after_run whose
                # result it lacks, its last checkpoint is evaluated (run_seed
                # resumes after the last task and trains nothing).
                ckpt = checkpoint_path(out, method, seed)
                wanted = after_run is not None and after_run[0] not in old
                if not (wanted and ckpt.exists()):
                    log(f"[{method} seed {seed}] already finished, skipped"
                        + (f" (no {ckpt.name} to evaluate)" if wanted else ""))
                    continue
            tasks = load_task_stream(cfg, seed, device)
            if getattr(cfg, "channels_last", False):
                for task in tasks:
                    for split in (task.train, task.val, task.test):
                        if isinstance(split.x, torch.Tensor) and split.x.dim() == 4:   # images: NHWC in memory
                            split.x = split.x.contiguous(memory_format=torch.channels_last)
            record = run_seed(cfg, method, seed, tasks, train_task, build_model, device, out, log,
                              on_task_done=save, after_run=after_run)
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
# --describe: parameter counts and storage, counted on the real modules
# ---------------------------------------------------------------------------

# Input shape of one sample and classes per task of each image dataset, so
# --describe needs no data.
KNOWN_SHAPES = {"cifar100": (3, 32, 32), "glyphs": (1, 20, 20), "imagedata": (1, 20, 20)}
KNOWN_CLASSES = {"cifar100": [5] * 20, "glyphs": [5] * 15, "imagedata": [5] * 14 + [4]}


def count_parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())


def stored_floats(model) -> tuple[int, int]:
    """(parameters stored, bytes on disk) of a model kept as float32."""
    n = count_parameters(model)
    return n, 4 * n


def storage_of(build, stored=stored_floats, **options):
    """storage(cfg, shape, k, T) -> stored(the model build(..., **options) for
    T tasks of k classes): (parameters, bytes). Built on the 'meta' device:
    even 1000 tasks allocate no memory."""
    def storage(cfg, shape, k, T):
        with torch.device("meta"):
            return stored(build(cfg, shape, [k] * T, "meta", **options))
    return storage


def with_settings(storage, **settings):
    """storage computed with some settings changed (e.g. shared_fe=True)."""
    return lambda cfg, shape, k, T: storage(dataclasses.replace(cfg, **settings), shape, k, T)


def storage_table(cfg, shape, k, storage: dict, tasks=(20, 100, 308, 1000)) -> str:
    """One row per T: every method's storage(cfg, shape, k, T) (storage_of)."""
    lines = ["Storage for T tasks (parameters stored / megabytes on disk, float32"
             + (", SupSup masks as bits" if any("SupSup" in name for name in storage) else "") + "):",
             f"{'T':>6s}  " + "  ".join(f"{name:>24s}" for name in storage)]
    for T in tasks:
        cells = [f"{p:>12,d} / {b / 1e6:7.1f} MB" for p, b in (fn(cfg, shape, k, T) for fn in storage.values())]
        lines.append(f"{T:>6d}  " + "  ".join(f"{c:>24s}" for c in cells))
    return "\n".join(lines)


def describe(cfg, build, log=print, *, storage: dict, shape=None, classes=None, note="") -> int:
    """Print the parameter table per component of a MARK model (build(cfg,
    shape, classes, device)) and in total for the stream's T tasks, and the
    storage table for growing T. shape, classes: the stream's input shape and
    classes per task (default: the image dataset's known ones)."""
    if shape is None:
        if cfg.dataset not in KNOWN_SHAPES:
            raise DataError(f"--describe knows the input shape of {', '.join(sorted(KNOWN_SHAPES))}; "
                            f"for {cfg.dataset} run a short training and read 'parameters' in results.json")
        shape, classes = KNOWN_SHAPES[cfg.dataset], KNOWN_CLASSES[cfg.dataset]
    if cfg.num_tasks:
        classes = (classes * cfg.num_tasks)[:cfg.num_tasks]
    with torch.device("meta"):
        model = build(cfg, shape, classes, "meta")
    shared_fe = getattr(model.extractors, "shared", False)          # mark_min.SharedAcrossTasks
    rows = [("knowledge base KB (shared)", count_parameters(model.kbs[0]), 1),
            ("feature extractor F (shared)" if shared_fe else "feature extractor F_t (per task)",
             count_parameters(model.extractors[0]), 1 if shared_fe else len(classes)),
            ("mask generator M_t (per task)", count_parameters(model.mask_generators[0]), len(classes)),
            ("classifier head C_t (per task)", count_parameters(model.heads[0]), len(classes))]
    log(f"MARK on {cfg.dataset}: input {shape}{note}, {len(classes)} tasks")
    log(f"{'component':<36s}{'each':>10s}{'x':>5s}{'total':>12s}")
    for name, n, times in rows:
        log(f"{name:<36s}{n:>10,d}{times:>5d}{n * times:>12,d}")
    total = count_parameters(model)
    log(f"{'total':<36s}{'':>15s}{total:>12,d}\n")
    log(storage_table(cfg, shape, classes[0], storage))
    return total


# ---------------------------------------------------------------------------
# The command line: one flag per settings field
# ---------------------------------------------------------------------------

MAX_SEED = 2**32 - 1          # numpy's RandomState takes seeds 0 .. 2**32 - 1


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


@dataclass
class RunSettings:
    """Where and how a run runs, the settings every method's configuration
    starts with (mark_min.Config and the extensions' classes inherit them).
    None of them changes a run's numbers (role "run")."""
    data_dir: str | None = param(None, "folder of the datasets (default: $MARK_DATA_DIR, else ./data)", "run")
    seed: int = param(0, "seed of python, numpy, torch and the class order (default 0)", "run", type=int)
    runs: int = param(1, "run seeds seed .. seed+runs-1 (default 1)", "run", type=positive(int))
    device: str = param("auto", "auto (CUDA if torch sees a device, else the CPU) | cpu | cuda | cuda:N",
                        "run", type=device_flag)
    out: str | None = param(None, "folder for results.json and checkpoints (default: none, nothing saved)",
                            "run")
    resume: bool = param(False, "continue the runs in --out; refused if they ran with other settings",
                         "run")
    force: bool = param(False, "replace the results.json and checkpoints in --out (a folder that holds "
                        "a run is otherwise refused without --resume)", "run")
    threads: int | None = param(None, "torch CPU threads (default: torch's choice, one per core)", "run",
                                type=positive(int))
    deterministic: bool = param(False, "CUDA: deterministic kernels only, so a --resume'd run equals an "
                                "uninterrupted one; slower. The CPU is deterministic without it", "run")


def make_parser(config_class, description: str) -> argparse.ArgumentParser:
    """One flag per field of config_class (--meta-k, --epochs-fe, ...) with the
    field's help, its choices and its type, checked on parse. A field's
    metadata may give "choices" or "type" (an argparse type); otherwise
    booleans get --x / --no-x, tuples one or more positive ints, numbers must
    be finite and >= 0."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_field_flags(parser, dataclasses.fields(config_class))
    return parser


def add_field_flags(parser, fields):
    """make_parser's flags for some fields of a settings class, on a parser or
    an argument group (baselines.py: each method's own settings)."""
    for f in fields:
        flag = "--" + f.name.replace("_", "-")
        kwargs = {"default": argparse.SUPPRESS, "help": f.metadata.get("help")}
        if "choices" in f.metadata:
            parser.add_argument(flag, choices=f.metadata["choices"], **kwargs)
        elif "type" in f.metadata:
            parser.add_argument(flag, type=f.metadata["type"], **kwargs)
        elif isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif isinstance(f.default, tuple):
            parser.add_argument(flag, type=positive(int), nargs="+", **kwargs)
        elif isinstance(f.default, (int, float)):
            parser.add_argument(flag, type=non_negative(type(f.default)), **kwargs)
        else:
            parser.add_argument(flag, type=str, **kwargs)


def parse_config(argv, config_class, parser, resolve=lambda cfg, given: cfg):
    """Parse argv into config_class(...): the checks every run needs (the run
    folder's flags, the seed range), then the class's own (ValueError from
    its __post_init__), then resolve(cfg, given) (profiles and the like).
    Returns (cfg, the names of the fields given explicitly, the namespace)."""
    args = parser.parse_args(argv)
    field_names = {f.name for f in dataclasses.fields(config_class)}
    given = {k: v for k, v in vars(args).items() if k in field_names}
    if given.get("resume") and not given.get("out"):
        parser.error("--resume needs --out DIR (the folder of the interrupted run)")
    if given.get("force") and given.get("resume"):
        parser.error("--force replaces the runs in --out, --resume continues them: give one")
    if given.get("force") and not given.get("out"):
        parser.error("--force needs --out DIR (the folder whose results it replaces)")
    seed, runs = given.get("seed", 0), given.get("runs", 1)
    if not 0 <= seed <= MAX_SEED + 1 - runs:
        parser.error(f"--seed {seed} with --runs {runs} uses seeds {seed}..{seed + runs - 1}; "
                     f"numpy takes seeds 0..{MAX_SEED}")
    try:
        cfg = resolve(config_class(**given), set(given))
    except ValueError as err:
        parser.error(str(err))
    return cfg, set(given), args


def report_errors(run, cfg, unit="tasks") -> int:
    """Run run() and turn the errors a user can fix into one line on stderr and
    exit status 1 (130 after Ctrl-C), saying what is kept."""
    try:
        run()
    except (DataError, RunError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except TrainingDiverged as err:
        print(f"error: training diverged at {err}\nFinished {unit} are in "
              f"{cfg.out or '(no --out given)'}/results.json.", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        kept = (f" in {cfg.out}; continue with the same command plus --resume" if unit == "tasks"
                else f" in {cfg.out}/results.json (--resume keeps finished seeds only)")
        print(f"\ninterrupted: finished {unit} are saved" + (kept if cfg.out else " nowhere (no --out given)"),
              file=sys.stderr)
        return 130
    return 0
