"""test_experiment.py: run folders that never mix or lose results, and one clear
error for every bad input (flags, run files, data).

    python -m pytest -q test_experiment.py

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
import experiment
import mark_min as mm
import market
from data import DataError, load_tasks
from market_data import read_market_csv, write_synthetic_market
from test_data import _npz_arrays
from test_mark import tiny_cfg, tiny_tasks

torch.set_num_threads(1)


def cli_flags(cfg: mm.Config) -> list[str]:
    """The flags that give cfg's hyperparameters on the command line, so a
    command runs exactly tiny_cfg's model and schedule."""
    flags = []
    for name in sorted(experiment.fields_with_role(mm.Config, "hyper")):
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
    monkeypatch.setattr(experiment, "load_task_stream", lambda cfg, seed, device: tiny_tasks(T=3, seed=seed))


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
            if p.is_file() and p.name != experiment.LOCK_FILE}


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
        patch.setattr(experiment, "load_task_stream", lambda cfg, seed, device: tiny_tasks(T=3, seed=seed))
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


def test_every_run_records_its_identity_in_results_json_and_checkpoint(two_seeds):
    cfg, _, _ = mm.parse(TINY)
    for run in read(two_seeds)["runs"]:
        assert run["identity"] == experiment.run_identity(cfg, "mark", run["seed"])
        state = torch.load(two_seeds / f"checkpoint_mark_seed{run['seed']}.pt", weights_only=True)
        assert state["identity"] == run["identity"]


WIDER = [*SAVED.kb_channels[:-1], 2 * SAVED.kb_channels[-1]]


@pytest.mark.parametrize("change, saved, now", [
    (["--lr", str(SAVED.lr / 2)], f"--lr {SAVED.lr}", str(SAVED.lr / 2)),
    (["--epoch-scale", "2"], f"--epochs-kb {SAVED.epochs_kb}", str(2 * SAVED.epochs_kb)),
    (["--meta-sign", "authors"], "'reptile'", "'authors'"),
    (["--mask-activation", "sigmoid"], "'relu'", "'sigmoid'"),
    (["--dataset", "imagedata"], "'glyphs'", "'imagedata'"),
    (["--num-tasks", "2"], "--num-tasks None", "2"),
    (["--kb-channels", *map(str, WIDER)], str(list(SAVED.kb_channels)), str(WIDER)),
])
def test_resume_with_other_settings_is_refused_naming_each_difference(folder, change, saved, now,
                                                                     tiny_stream, no_training, capsys):
    before = snapshot(folder)
    code, err = run(mm.main, TINY + change + ["--runs", "2", "--out", str(folder), "--resume"], capsys)
    line = one_error_line(err)
    assert code == 1 and f"{saved} saved" in line and f"{now} now" in line
    assert snapshot(folder) == before


def test_another_method_cannot_resume_the_folder(folder, tiny_stream, no_training, capsys):
    code, err = run(baselines.main, TINY + ["--method", "b1", "--out", str(folder), "--resume"], capsys)
    assert code == 1 and "method 'mark' saved, 'b1' now" in one_error_line(err)


def test_a_checkpoint_of_other_settings_is_refused_without_results_json(folder, tiny_stream,
                                                                       no_training, capsys):
    (folder / "results.json").unlink()
    code, err = run(mm.main, TINY + ["--lr", str(SAVED.lr / 2), "--seed", "1", "--out", str(folder),
                                     "--resume"], capsys)
    line = one_error_line(err)
    assert code == 1 and "checkpoint_mark_seed1.pt ran with other settings" in line and "--lr" in line


def test_resume_of_another_seed_keeps_every_finished_seed(folder, tiny_stream, capsys):
    seed0 = read(folder)["runs"][0]
    assert mm.main(TINY + ["--seed", "1", "--out", str(folder), "--resume"]) == 0
    saved = read(folder)
    assert [run["seed"] for run in saved["runs"]] == [0, 1]
    assert saved["runs"][0] == seed0 and saved["runs"][1]["tasks_done"] == 3
    assert saved["summary"]["runs"] == 2


def test_a_folder_holding_a_run_needs_resume_and_force_says_what_it_replaces(folder, tiny_stream,
                                                                            capsys):
    before = snapshot(folder)
    code, err = run(mm.main, TINY + ["--out", str(folder)], capsys)
    line = one_error_line(err)
    assert code == 1 and "results.json" in line and "checkpoint_mark_seed0.pt" in line
    assert "--resume" in line and "--force" in line
    assert snapshot(folder) == before
    assert mm.main(TINY + ["--out", str(folder), "--force"]) == 0
    assert ("--force: replacing checkpoint_mark_seed0.pt, checkpoint_mark_seed1.pt, results.json"
            in capsys.readouterr().out)
    assert [run["seed"] for run in read(folder)["runs"]] == [0]
    assert not (folder / "checkpoint_mark_seed1.pt").exists()


def test_a_second_process_cannot_write_into_a_folder_in_use(folder, tiny_stream, no_training, capsys):
    before = snapshot(folder)
    with experiment.folder_lock(folder):
        code, err = run(mm.main, TINY + ["--runs", "2", "--out", str(folder), "--resume"], capsys)
    assert code == 1 and f"being written by another run (process {os.getpid()})" in one_error_line(err)
    assert snapshot(folder) == before


def test_a_killed_run_leaves_no_stale_lock(tmp_path):
    """The lock is the operating system's: a process killed with SIGKILL holds
    it no longer, and the next run takes it without any clean-up."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); "
         "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)",
         str(tmp_path / experiment.LOCK_FILE)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(experiment.RunError, match="being written by another run"):
            with experiment.folder_lock(tmp_path):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with experiment.folder_lock(tmp_path):
        pass


# ---------------------------------------------------------------------------
# MarketCL: the same identity check (no checkpoints inside a seed)
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def market_run(tmp_path_factory):
    """A finished MarketCL run of 2 symbols x 2 training days, and its source folder."""
    root = tmp_path_factory.mktemp("market")
    write_synthetic_market(root / "bars", seed=0, num_symbols=2, num_days=4)
    assert market.main(MARKET + ["--source", str(root / "bars"), "--out", str(root / "run")]) == 0
    return root


@pytest.mark.parametrize("change, saved_now", [
    (["--num-days", "2"], ("3 saved", "2 now")),
    (["--epoch-scale", "2"], ("--epochs-fe 1 saved", "2 now")),
    ("other source", ("bars' saved", "bars2' now")),
])
def test_market_resume_with_other_settings_is_refused(market_run, tmp_path, change, saved_now,
                                                      no_training, capsys):
    folder = shutil.copytree(market_run / "run", tmp_path / "run")
    source = market_run / "bars"
    if change == "other source":
        source, change = shutil.copytree(source, tmp_path / "bars2"), []
    before = snapshot(folder)
    code, err = run(market.main, MARKET + change + ["--source", str(source), "--out", str(folder),
                                                "--resume"], capsys)
    line = one_error_line(err)
    assert code == 1 and all(words in line for words in saved_now)
    assert snapshot(folder) == before


# ---------------------------------------------------------------------------
# Tables take the dataset and the schedule from the runs
# ---------------------------------------------------------------------------

def table_folder(tmp_path, two_seeds, **other_method):
    """OUT/mark holds the two-seed run; OUT/b1 a copy whose identity differs by other_method."""
    out = tmp_path / "table"
    shutil.copytree(two_seeds, out / "mark")
    results = read(two_seeds)
    for run in results["runs"]:
        run["identity"] |= {"method": "b1", **other_method}
    (out / "b1").mkdir()
    (out / "b1" / "results.json").write_text(json.dumps(results))
    return out


def test_the_table_takes_the_dataset_from_the_runs(tmp_path, two_seeds, capsys):
    out = table_folder(tmp_path, two_seeds)
    assert baselines.main(["--table", str(out)]) == 0
    assert (out / "table.md").read_text().startswith("Dataset glyphs;")
    before = snapshot(out)
    code, err = run(baselines.main, ["--table", str(out), "--dataset", "cifar100"], capsys)
    assert code == 1 and "ran on glyphs, not cifar100" in one_error_line(err)
    assert snapshot(out) == before


@pytest.mark.parametrize("other", [{"dataset": "imagedata"}, {"lr": SAVED.lr / 2},
                                   {"epochs_kb": SAVED.epochs_kb + 1}])
def test_the_table_refuses_runs_of_different_datasets_or_schedules(tmp_path, two_seeds, other, capsys):
    out = table_folder(tmp_path, two_seeds, **other)
    code, err = run(baselines.main, ["--table", str(out)], capsys)
    line = one_error_line(err)
    assert code == 1 and "mixes runs of different settings" in line
    assert not (out / "table.md").exists()


def test_all_into_a_folder_of_another_dataset_is_refused_before_training(tmp_path, two_seeds,
                                                                        tiny_stream, no_training, capsys):
    out = tmp_path / "all"
    shutil.copytree(two_seeds, out / "mark")
    code, err = run(baselines.main, TINY + ["--all", "--dataset", "imagedata", "--out", str(out)], capsys)
    assert code == 1 and "--dataset 'glyphs' saved, 'imagedata' now" in one_error_line(err)


def test_a_table_of_runs_written_before_identities_takes_the_saved_configuration(tmp_path, two_seeds):
    out = tmp_path / "old"
    (out / "mark").mkdir(parents=True)
    results = read(two_seeds)
    for run in results["runs"]:
        del run["identity"]
    (out / "mark" / "results.json").write_text(json.dumps(results))
    baselines.build_table(out, log=lambda _: None)
    assert (out / "table.md").read_text().startswith("Dataset glyphs;")


# ---------------------------------------------------------------------------
# Damaged, empty or foreign run files: one error naming the file
# ---------------------------------------------------------------------------

def legacy_checkpoint(path):
    state = torch.load(path, weights_only=True)
    del state["identity"]
    torch.save(state, path)


def checkpoint_of_other_settings(path):
    state = torch.load(path, weights_only=True)
    state["identity"]["lr"] = 5 * SAVED.lr
    torch.save(state, path)


def legacy_results(path):
    results = json.loads(path.read_text())
    for run in results["runs"]:
        del run["identity"]
    path.write_text(json.dumps(results))


RUN_FILE_DAMAGE = {
    # name: (file, how it is changed, words of the error)
    "empty checkpoint": ("checkpoint_mark_seed1.pt", lambda p: p.write_bytes(b""), "cannot be read"),
    "cut-off checkpoint": ("checkpoint_mark_seed1.pt",
                           lambda p: p.write_bytes(p.read_bytes()[:len(p.read_bytes()) // 2]), "cannot be read"),
    "not a checkpoint": ("checkpoint_mark_seed1.pt", lambda p: p.write_text("hello"), "cannot be read"),
    "foreign checkpoint": ("checkpoint_mark_seed1.pt", lambda p: torch.save({"weights": torch.ones(2)}, p),
                           "is not a checkpoint of this program"),
    "old checkpoint": ("checkpoint_mark_seed1.pt", legacy_checkpoint, "before runs recorded their settings"),
    "another run's checkpoint": ("checkpoint_mark_seed1.pt", checkpoint_of_other_settings,
                                 f"--lr {5 * SAVED.lr} saved, {SAVED.lr} now"),
    "empty results": ("results.json", lambda p: p.write_text(""), "cannot be read"),
    "cut-off results": ("results.json", lambda p: p.write_text(p.read_text()[:300]), "cannot be read"),
    "results a list": ("results.json", lambda p: p.write_text("[]"), "is not a results.json"),
    "runs not a list": ("results.json", lambda p: p.write_text('{"runs": 3}'), "is not a results.json"),
    "run without keys": ("results.json", lambda p: p.write_text('{"runs": [{}]}'), "is not a results.json"),
    "not UTF-8": ("results.json", lambda p: p.write_bytes(b"\xff\xfe{"), "cannot be read"),
    "old results": ("results.json", legacy_results, "before runs recorded their settings"),
}


@pytest.mark.parametrize("case", list(RUN_FILE_DAMAGE))
def test_damaged_run_files_stop_resume_with_one_error_naming_the_file(folder, case, tiny_stream,
                                                                      no_training, capsys):
    name, damage, words = RUN_FILE_DAMAGE[case]
    damage(folder / name)
    before = snapshot(folder)
    code, err = run(mm.main, TINY + ["--runs", "2", "--out", str(folder), "--resume"], capsys)
    line = one_error_line(err)
    assert code == 1 and str(folder / name) in line and words in line
    assert snapshot(folder) == before


@pytest.mark.parametrize("case", [case for case, (name, _, _) in RUN_FILE_DAMAGE.items()
                                  if name == "results.json" and case != "old results"])
def test_damaged_results_stop_the_table_with_one_error_naming_the_file(tmp_path, two_seeds, case, capsys):
    _, damage, words = RUN_FILE_DAMAGE[case]
    shutil.copytree(two_seeds, tmp_path / "mark")
    damage(tmp_path / "mark" / "results.json")
    code, err = run(baselines.main, ["--table", str(tmp_path)], capsys)
    line = one_error_line(err)
    assert code == 1 and str(tmp_path / "mark" / "results.json") in line and words in line


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
    (["--force", "--resume", "--out", "x"], "give one"),
    (["--force"], "--force needs --out"),
])
def test_bad_flags_are_refused_by_the_parser_with_a_reason(argv, words, capsys):
    with pytest.raises(SystemExit) as stop:
        mm.parse(argv)
    assert stop.value.code == 2 and words in one_error_line(capsys.readouterr().err)


def a_file(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    return tmp_path / "file.txt"


def under_a_file(tmp_path):
    return a_file(tmp_path) / "run"


def read_only(tmp_path):
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):          # root writes anyway
        pytest.skip("this user can write into a read-only folder")
    return folder / "run"


@pytest.mark.parametrize("make_out, words", [(a_file, "is a file"), (under_a_file, "cannot write to --out"),
                                             (read_only, "cannot write to --out")])
def test_an_out_that_cannot_be_written_is_refused_before_training(tmp_path, make_out, words,
                                                                 tiny_stream, no_training, capsys):
    out = make_out(tmp_path)
    code, err = run(mm.main, TINY + ["--out", str(out)], capsys)
    line = one_error_line(err)
    assert code == 1 and str(out) in line and words in line


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


def forget_setting(folder, name):
    """Make the folder look written before Config had the setting `name`."""
    saved = read(folder)
    for run in saved["runs"]:
        del run["identity"][name]
    (folder / "results.json").write_text(json.dumps(saved))
    for path in folder.glob("checkpoint_*.pt"):
        state = torch.load(path, weights_only=True)
        del state["identity"][name]
        record = json.loads(state["record"])
        del record["identity"][name]
        state["record"] = json.dumps(record)
        torch.save(state, path)


def test_a_run_saved_before_a_setting_existed_resumes_with_its_default_only(folder, tiny_stream, capsys):
    """Settings added to Config later enter an old run's identity at their
    default (which keeps the old arithmetic): the run resumes with the
    default, and another value is refused."""
    forget_setting(folder, "meta_acc_dropout")
    code, err = run(mm.main, TINY + ["--meta-acc-dropout", "--runs", "2", "--out", str(folder), "--resume"],
                    capsys)
    assert code == 1 and "--meta-acc-dropout False saved, True now" in one_error_line(err)
    assert mm.main(TINY + ["--runs", "2", "--out", str(folder), "--resume"]) == 0
    assert [r["tasks_done"] for r in read(folder)["runs"]] == [3, 3]


def test_classes_per_task_cuts_the_stream_as_asked_and_defaults_per_dataset(tmp_path):
    """--classes-per-task reaches the loader; without it an npz stream has
    tasks of 2 (Split-MNIST's), and a size that does not divide is refused."""
    path = tmp_path / "six.npz"
    np.savez(path, **_npz_arrays(classes=6))
    load = lambda **kw: experiment.load_task_stream(mm.Config(dataset="npz", path=str(path), **kw), 0, "cpu")
    assert [task.num_classes for task in load()] == [2, 2, 2]
    assert [task.num_classes for task in load(classes_per_task=3)] == [3, 3]
    with pytest.raises(DataError, match="6 classes do not divide into tasks of 4"):
        load(classes_per_task=4)
    cfg, _, _ = mm.parse(["--dataset", "npz", "--path", str(path), "--classes-per-task", "3"])
    assert cfg.classes_per_task == 3
    with pytest.raises(SystemExit):
        mm.parse(["--classes-per-task", "0"])
