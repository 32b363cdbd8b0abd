"""test_runs.py: run folders that never mix or lose results, and one clear
error for every bad input (flags, run files, data).

    python -m pytest -q test_runs.py

Every test reproduces a mistake a careful or a careless user can make and
checks the outcome: the right result, or one `error:` line that names what is
wrong, exit code 1 (2 for flags), no traceback, and nothing already computed
changed. Runs use the tiny stream of test_mark.py (a run takes a fraction of a
second); nothing here downloads anything.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
import torch

import baselines
import mark_min as mm
from data import DataError, load_tasks, read_market_csv, write_synthetic_market
from test_mark import tiny_cfg, tiny_tasks

torch.set_num_threads(1)


def cli_flags(cfg: mm.Config) -> list[str]:
    """The flags that give cfg's hyperparameters on the command line, so a
    command runs exactly tiny_cfg's model and schedule."""
    flags = []
    for name in sorted(mm.HYPERPARAMETERS):
        value, default = getattr(cfg, name), getattr(mm.Config(), name)
        if value == default:
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        else:
            flags += [flag, *map(str, value)] if isinstance(value, tuple) else [flag, str(value)]
    return flags


# tiny_cfg's model with one epoch per step: these tests check run folders and
# messages, not learning. SAVED is what TINY runs.
SAVED = tiny_cfg(epochs_fe=1, epochs_kb=1, epochs_masks=1, epochs_consolidate=1)
TINY = ["--profile", "paper"] + cli_flags(SAVED)
MARKET = ["--dataset", "market", "--num-tasks", "2", "--num-days", "3", "--profile", "paper",
          "--seq-query", "8", "--seq-channels", "8", "8", "8", "--epochs-fe", "1", "--epochs-kb", "1",
          "--epochs-masks", "1", "--epochs-consolidate", "1", "--meta-epochs", "1", "--meta-k", "1",
          "--meta-inner-steps", "1"]


@pytest.fixture
def tiny_stream(monkeypatch):
    """The programs load test_mark's tiny stream (3 tasks) instead of a dataset."""
    monkeypatch.setattr(mm, "load_tasks", lambda name, seed, **kw: tiny_tasks(T=3, seed=seed))


@pytest.fixture
def no_training(monkeypatch):
    """Every training step fails the test: the command must stop before training."""
    def refuse(*args, **kwargs):
        raise AssertionError("trained although the command should have stopped before training")
    monkeypatch.setattr(mm, "fit", refuse)


def run(program, argv, capsys):
    """(exit code, stderr) of a command line; an argparse error is exit code 2."""
    try:
        code = program(argv)
    except SystemExit as stop:
        code = stop.code
    return code, capsys.readouterr().err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines, "no error printed"
    assert lines[-1].startswith("error: ") or ": error: " in lines[-1], err
    assert "Traceback" not in err
    return lines[-1]


def snapshot(folder) -> dict:
    """Every file under folder and its bytes (the lock file aside)."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != mm.LOCK_FILE}


# ---------------------------------------------------------------------------
# A run folder of two seeds: seed 0 finished, seed 1 stopped in its second task
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory):
    folder, train = tmp_path_factory.mktemp("runs") / "two_seeds", mm.train_task_mark

    def stop_in_seed1_task2(model, t, task, cfg, gen, timer):
        if gen.initial_seed() == 1 and t == 1:
            raise KeyboardInterrupt
        return train(model, t, task, cfg, gen, timer)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mm, "load_tasks", lambda name, seed, **kw: tiny_tasks(T=3, seed=seed))
        patch.setattr(mm, "train_task_mark", stop_in_seed1_task2)
        assert mm.main(TINY + ["--runs", "2", "--out", str(folder)]) == 130
    return folder


@pytest.fixture
def folder(two_seeds, tmp_path):
    """A fresh copy of the two-seed folder, for a test to change."""
    return shutil.copytree(two_seeds, tmp_path / "run")


def read(folder):
    return json.loads((folder / "results.json").read_text())


def test_summaries_count_finished_runs_only_in_results_json_and_in_the_table(two_seeds):
    saved = read(two_seeds)
    done, stopped = saved["runs"]
    assert (done["tasks_done"], stopped["tasks_done"]) == (3, 1)
    assert saved["summary"]["runs"] == 1 and saved["summary"]["acc_mean"] == done["acc"]
    row, = baselines.table_rows({"mark": saved}, "glyphs")
    assert row["acc_mean"] == saved["summary"]["acc_mean"] and row["runs"] == "1"


# ---------------------------------------------------------------------------
# Flags and --out: refused before anything is loaded or trained
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("argv, words", [
    (["--epoch-scale", "1e308"], "makes the epoch counts infinite"),
    (["--seed", "-1"], "numpy takes seeds 0..4294967295"),
    (["--seed", "4294967296"], "numpy takes seeds 0..4294967295"),
    (["--seed", "4294967295", "--runs", "2"], "uses seeds 4294967295..4294967296"),
    (["--device", "bogus"], "unknown device 'bogus'"),
    (["--path", "x.npz"], "--path is read by --dataset npz only"),
    (["--kb-channels", "64"], "--kb-channels gives 1 layer(s) but --kb-kernels 3"),
    (["--fe-kernels", "3"], "--fe-channels gives 2 layer(s) but --fe-kernels 1"),
])
def test_bad_flags_are_refused_by_the_parser_with_a_reason(argv, words, capsys):
    with pytest.raises(SystemExit) as stop:
        mm.parse_config(argv)
    assert stop.value.code == 2 and words in one_error_line(capsys.readouterr().err)


# ---------------------------------------------------------------------------
# Data the loaders used to accept but training could not use
# ---------------------------------------------------------------------------

def write_npz(path, size=(20, 20), classes=4, per_class=6, test_classes=None, dtype=np.uint8, value=None):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (classes * per_class, *size)).astype(dtype)
    if value is not None:
        x[0, 0, 0] = value
    test_classes = classes if test_classes is None else test_classes
    np.savez(path, x_train=x, y_train=np.repeat(np.arange(classes), per_class),
             x_test=x[:2 * test_classes], y_test=np.repeat(np.arange(test_classes), 2))
    return path


@pytest.mark.parametrize("size, words", [
    ((8, 8), "images of 8x8 px are too small"), ((1, 1), "images of 1x1 px are too small"),
    ((20, 24), "images are 20x24 px; the KB and F_t take square images")])
def test_images_the_networks_cannot_take_are_refused_before_training(tmp_path, size, words,
                                                                    no_training, capsys):
    path = write_npz(tmp_path / "small.npz", size=size)
    code, err = run(mm.main, TINY + ["--dataset", "npz", "--path", str(path)], capsys)
    line = one_error_line(err)
    assert code == 1 and str(path) in line and words in line
    if size[0] == size[1]:
        assert "smallest size they accept is 19x19" in line
        assert "--kb-kernels 4 3 2" in line and "--fe-kernels 4 3" in line


NPZ_PROBLEMS = {
    # name: (write the file, words of the error)
    "a task without test images": (lambda p: write_npz(p, test_classes=1), "has no test image"),
    "images too large": (lambda p: write_npz(p, size=(257, 257), classes=2, per_class=2),
                         "257x257 px, larger than the 256x256 accepted"),
    "beyond float32": (lambda p: write_npz(p, dtype=np.float64, value=1e39), "beyond float32"),
    "a folder": (lambda p: p.mkdir(), "is a folder"),
    "a text file": (lambda p: p.write_text("x_train,y_train\n"), "is not an .npz file"),
}


@pytest.mark.parametrize("case", list(NPZ_PROBLEMS))
def test_npz_data_training_cannot_use_is_refused_where_it_is_loaded(tmp_path, case):
    write, words = NPZ_PROBLEMS[case]
    path = tmp_path / "data.npz"
    write(path)
    with pytest.raises(DataError, match=words):
        load_tasks("npz", path=path, classes_per_task=2)


HEADER = "datetime,symbol,open,high,low,close,volume\n"
ROW = "2021-08-02 09:15:00,NSE:ABC,100,101,99,100.5,10\n"
NEXT = "2021-08-02 09:16:00,NSE:ABC,{},101,99,100.5,10\n"

CSV_PROBLEMS = {
    # name: (file bytes, line, words of the error)
    "not UTF-8": ((HEADER + ROW).encode() + NEXT.format("100").replace("NSE", "N\xffSE").encode("latin-1"),
                  3, "byte 22 of the line (b'\\xff') is not UTF-8"),
    "a very long line": ((HEADER + ROW + NEXT.format("1" * 5_000_000)).encode(), 3, "longer than 65536 bytes"),
    "a quoted field over 128 kB": ((HEADER + ROW + NEXT.format('"' + ("1" * 60_000 + "\n") * 3 + '"')).encode(),
                                   5, "field larger than field limit"),
    "high below low": ((HEADER + "2021-08-02 09:15:00,NSE:ABC,100,98,99,100.5,10\n").encode(), 2,
                       "the high 98 is below the low 99"),
    "old Mac line ends": ((HEADER + ROW).replace("\n", "\r").encode(), 1, "bare carriage return"),
}


@pytest.mark.parametrize("case", list(CSV_PROBLEMS))
def test_market_csv_problems_name_file_and_line_in_bounded_memory(tmp_path, case):
    content, line, words = CSV_PROBLEMS[case]
    path = tmp_path / "ABC.csv"
    path.write_bytes(content)
    tracemalloc.start()
    try:
        with pytest.raises(DataError) as error:
            read_market_csv(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert f"ABC.csv, line {line}: " in str(error.value) and words in str(error.value)
    assert peak < 2_000_000                 # the 5 MB line is never read whole


def test_a_byte_order_mark_from_a_spreadsheet_is_dropped(tmp_path):
    path = tmp_path / "ABC.csv"
    path.write_bytes(b"\xef\xbb\xbf" + (HEADER + ROW).encode())
    times, ohlcv = read_market_csv(path)["NSE:ABC"]
    assert len(times) == 1 and ohlcv[0].tolist() == [100, 101, 99, 100.5, 10]
