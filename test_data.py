"""test_data.py: the task streams of data.py (CIFAR-100, glyphs, npz), batches and sequences."""
import ast
import gzip
import hashlib
import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import data
from data import DataError, Sequences, Split, load_tasks

# ---------------------------------------------------------------------------
# Tests of data.py: the task streams every method trains on.
#
# Fast and offline. CIFAR-100 tests build tiny archives in the official format
# in tmp_path (all 100 classes, 20 training and 4 test images per class); they
# never read ./data or a downloaded file. Each tiny image encodes where it came
# from in its pixels (red = class id, green = index within its class, blue =
# 0 for the training file, 1 for the test file), so a test can check that every
# image carries the label of its class after splitting and normalising.
# ---------------------------------------------------------------------------

TINY_TRAIN_PER_CLASS = 20     # -> 17 train + 3 validation per class (15%)
TINY_TEST_PER_CLASS = 4
UNREACHABLE = "http://127.0.0.1:9/cifar-100-python.tar.gz"   # port 9: discard


# --- tiny CIFAR-100 in the official format ---------------------------------

def _cifar_batch(per_class: int, file_code: int, label: bytes) -> dict:
    labels = np.repeat(np.arange(100), per_class)
    within = np.tile(np.arange(per_class), 100)
    order = np.random.RandomState(file_code).permutation(len(labels))  # mixed, like the real files
    labels, within = labels[order], within[order]
    pixels = np.zeros((len(labels), 3, 1024), dtype=np.uint8)   # channel-major rows
    pixels[:, 0] = labels[:, None]
    pixels[:, 1] = within[:, None]
    pixels[:, 2] = file_code
    return {b"batch_label": label,
            b"filenames": [b"img_%05d.png" % i for i in range(len(labels))],
            b"fine_labels": labels.tolist(),
            b"coarse_labels": (labels // 5).tolist(),
            b"data": pixels.reshape(len(labels), 3072)}


def _cifar_files() -> dict[str, bytes]:
    meta = {b"fine_label_names": [b"class%03d" % c for c in range(100)],
            b"coarse_label_names": [b"super%02d" % c for c in range(20)]}
    objects = {"train": _cifar_batch(TINY_TRAIN_PER_CLASS, 0, b"training batch 1 of 1"),
               "test": _cifar_batch(TINY_TEST_PER_CLASS, 1, b"testing batch 1 of 1"),
               "meta": meta}
    return {name: pickle.dumps(obj, protocol=4) for name, obj in objects.items()}


def _write_folder(data_dir, files=None):
    folder = data_dir / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, content in (files or _cifar_files()).items():
        (folder / name).write_bytes(content)


def _write_archive(data_dir, extra=()) -> str:
    """Write cifar-100-python.tar.gz (plus `extra` TarInfo members); its md5."""
    data_dir.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        folder = tarfile.TarInfo("cifar-100-python")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for name, content in _cifar_files().items():
            info = tarfile.TarInfo(f"cifar-100-python/{name}")
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
        for info in extra:
            tar.addfile(info, io.BytesIO(b"x" * info.size))
    archive = data_dir / "cifar-100-python.tar.gz"
    archive.write_bytes(gzip.compress(buffer.getvalue(), compresslevel=1))
    return hashlib.md5(archive.read_bytes()).hexdigest()


def _decode(split: Split):
    """(class id, index within class, file code) of every image, from its pixels."""
    mean = torch.tensor(data.CIFAR100_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(data.CIFAR100_STD).view(1, 3, 1, 1)
    raw = (split.x * std + mean).round().to(torch.int64)      # (N, 3, 32, 32)
    assert (raw == raw[:, :, :1, :1]).all()                   # planes stay constant
    return raw[:, 0, 0, 0], raw[:, 1, 0, 0], raw[:, 2, 0, 0]


@pytest.fixture
def offline(monkeypatch):
    """No test may download: point the URL at a port that refuses."""
    monkeypatch.setattr(data, "CIFAR100_URL", UNREACHABLE)


# --- CIFAR-100 ----------------------------------------------------------------

def test_cifar100_from_the_archive_is_20_tasks_of_5_with_every_image_labelled_by_its_class(
        tmp_path, monkeypatch, offline):
    monkeypatch.setattr(data, "CIFAR100_MD5", _write_archive(tmp_path))
    tasks = load_tasks("cifar100", data_dir=tmp_path, seed=0)

    assert sorted(p.name for p in (tmp_path / "cifar-100-python").iterdir()) == ["meta", "test", "train"]
    assert not (tmp_path / "cifar-100-python.partial").exists()
    assert len(tasks) == 20
    assert sorted(c for task in tasks for c in task.class_ids) == list(range(100))
    order = np.random.RandomState(0).permutation(100)          # the documented class order
    for t, task in enumerate(tasks):
        assert task.index == t
        assert task.class_ids == order[5 * t:5 * t + 5].tolist()
        assert task.class_names == ["class%03d" % c for c in task.class_ids]
        # 15% of each class's 20 training images is validation: 5 x (17, 3); test 5 x 4
        assert (len(task.train), len(task.val), len(task.test)) == (85, 15, 20)
        for split, file_code in ((task.train, 0), (task.val, 0), (task.test, 1)):
            assert split.x.dtype == torch.float32 and split.x.shape[1:] == (3, 32, 32)
            assert split.y.dtype == torch.int64
            assert torch.bincount(split.y, minlength=5).tolist() == [len(split) // 5] * 5
            cls, _, code = _decode(split)
            assert (cls == torch.tensor(task.class_ids)[split.y]).all()
            assert (code == file_code).all()
        # train and validation share no image and together hold all of it
        tr_cls, tr_idx, _ = _decode(task.train)
        va_cls, va_idx, _ = _decode(task.val)
        keys = torch.cat([tr_cls * 100 + tr_idx, va_cls * 100 + va_idx])
        assert sorted(keys.tolist()) == sorted(c * 100 + i for c in task.class_ids for i in range(20))


def test_cifar100_reads_an_unpacked_folder_without_checking_md5_and_gets_the_same_stream(
        tmp_path, offline):
    _write_folder(tmp_path / "unpacked")           # no archive, official md5 unmatched
    from_folder = load_tasks("cifar100", data_dir=tmp_path / "unpacked", seed=3)
    assert len(from_folder) == 20
    all_ids = [c for task in from_folder for c in task.class_ids]
    assert sorted(all_ids) == list(range(100))     # every class in exactly one task


def test_same_seed_gives_the_same_stream_and_another_seed_another_class_order(tmp_path, offline):
    _write_folder(tmp_path)
    a, b = load_tasks("cifar100", data_dir=tmp_path, seed=0), load_tasks("cifar100", data_dir=tmp_path, seed=0)
    c = load_tasks("cifar100", data_dir=tmp_path, seed=1)
    for ta, tb in zip(a, b):
        assert ta.class_ids == tb.class_ids
        for split in ("train", "val", "test"):
            assert torch.equal(getattr(ta, split).x, getattr(tb, split).x)
            assert torch.equal(getattr(ta, split).y, getattr(tb, split).y)
    assert [t.class_ids for t in a] != [t.class_ids for t in c]
    assert sorted(i for t in c for i in t.class_ids) == list(range(100))


def test_num_tasks_keeps_the_first_tasks_of_the_full_stream(tmp_path, offline):
    _write_folder(tmp_path)
    full = load_tasks("cifar100", data_dir=tmp_path, seed=5)
    first = load_tasks("cifar100", data_dir=tmp_path, seed=5, num_tasks=3)
    assert len(first) == 3
    for short, long in zip(first, full):
        assert short.class_ids == long.class_ids
        assert torch.equal(short.train.x, long.train.x) and torch.equal(short.val.y, long.val.y)


def test_an_archive_with_the_wrong_md5_is_refused_and_nothing_is_unpacked(tmp_path, offline):
    _write_archive(tmp_path)                         # its md5 is not the official one
    with pytest.raises(DataError, match="md5") as err:
        load_tasks("cifar100", data_dir=tmp_path)
    assert data.CIFAR100_MD5 in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar-100-python.tar.gz"]


def _member(name, kind=tarfile.REGTYPE, link=""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    info.size = 4 if kind == tarfile.REGTYPE else 0
    return info


@pytest.mark.parametrize("make_member", [
    lambda root: _member("../evil"),
    lambda root: _member("cifar-100-python/../../evil"),
    lambda root: _member(str(root / "evil")),                      # absolute path
    lambda root: _member("cifar-100-python/evil", tarfile.SYMTYPE, str(root / "evil")),
    lambda root: _member("cifar-100-python/evil", tarfile.LNKTYPE, "cifar-100-python/train"),
    lambda root: _member("README"),                                 # outside the folder
], ids=["dotdot", "nested-dotdot", "absolute", "symlink", "hardlink", "outside-folder"])
def test_an_archive_member_that_would_land_outside_the_folder_is_refused(
        tmp_path, monkeypatch, offline, make_member):
    data_dir = tmp_path / "a" / "b"
    monkeypatch.setattr(data, "CIFAR100_MD5", _write_archive(data_dir, [make_member(tmp_path)]))
    with pytest.raises(DataError, match="refusing to unpack"):
        load_tasks("cifar100", data_dir=data_dir)
    assert sorted(p.name for p in data_dir.iterdir()) == ["cifar-100-python.tar.gz"]
    assert not list(tmp_path.rglob("evil")) and not (data_dir / "README").exists()


def test_a_pickle_that_calls_a_function_is_refused_before_the_call(tmp_path, offline):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):          # what a tampered file would carry
            return (os.mkdir, (str(marker),))

    files = _cifar_files()
    files["train"] = pickle.dumps({b"data": Exploit()}, protocol=4)
    _write_folder(tmp_path / "d", files)
    with pytest.raises(DataError, match="refusing to load .*tampered"):
        load_tasks("cifar100", data_dir=tmp_path / "d")
    assert not marker.exists()


def test_offline_the_error_names_the_address_the_file_the_folder_and_the_md5(tmp_path, offline):
    with pytest.raises(DataError) as err:
        load_tasks("cifar100", data_dir=tmp_path)
    message = str(err.value)
    for needed in (UNREACHABLE, "cifar-100-python.tar.gz", str(tmp_path.resolve()),
                   "eb9058c3a382ffc7106e4002c42a8d85"):
        assert needed in message
    assert list(tmp_path.iterdir()) == []            # no half-downloaded file left


def test_a_download_cut_off_halfway_leaves_no_file_that_looks_like_the_archive(tmp_path, monkeypatch):
    class CutOff(io.BytesIO):          # one chunk arrives, then the line drops
        headers = {"Content-Length": str(3 << 20)}

        def read(self, size=-1):
            if self.tell():
                raise ConnectionResetError("connection reset")
            return super().read(size)

    monkeypatch.setattr(data.urllib.request, "urlopen", lambda url, timeout: CutOff(b"x" * (1 << 20)))
    with pytest.raises(DataError, match="connection reset"):
        load_tasks("cifar100", data_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_the_command_line_prints_a_data_error_without_traceback_and_exits_1(tmp_path, offline, capsys):
    assert data.main(["--dataset", "cifar100", "--data-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "error:" in err and UNREACHABLE in err and "Traceback" not in err


def test_the_command_line_summarises_every_task(tmp_path, offline, capsys):
    _write_folder(tmp_path)
    assert data.main(["--dataset", "cifar100", "--data-dir", str(tmp_path), "--num-tasks", "4"]) == 0
    out = capsys.readouterr().out
    assert "4 tasks" in out and out.count("train    85  val   15  test   20") == 4


# --- glyphs -------------------------------------------------------------------

def _glyph_images_by_class(tasks):
    """{class id: (its training + validation images in a canonical order, its test images)}"""
    images = {}
    for t in tasks:
        for i, c in enumerate(t.class_ids):
            seen = torch.cat([t.train.x[t.train.y == i], t.val.x[t.val.y == i]]).flatten(1)
            images[c] = (seen[seen.sum(1).argsort()], t.test.x[t.test.y == i])
    return images


def test_glyphs_are_balanced_normalised_and_the_same_images_for_every_seed():
    a, b = load_tasks("glyphs", seed=0), load_tasks("glyphs", seed=1)
    assert len(a) == 15
    for tasks in (a, b):
        assert sorted(c for t in tasks for c in t.class_ids) == list(range(75))
    for t in a:
        assert t.input_shape == (1, 20, 20) and t.train.x.dtype == torch.float32
        assert t.class_names == [f"glyph{c:02d}" for c in t.class_ids]
        for split, per_class in ((t.train, 238), (t.val, 42), (t.test, 80)):
            assert torch.bincount(split.y).tolist() == [per_class] * 5
    x = torch.cat([t.train.x for t in a] + [t.val.x for t in a])   # all training images
    assert abs(x.mean().item()) < 1e-3 and abs(x.std().item() - 1) < 1e-3
    # Generated twice, every class has exactly the same images: the data is
    # deterministic, and the seed changes only the class order and validation rows.
    assert [t.class_ids for t in a] != [t.class_ids for t in b]
    first, second = _glyph_images_by_class(a), _glyph_images_by_class(b)
    for c in range(75):
        assert torch.equal(first[c][0], second[c][0]) and torch.equal(first[c][1], second[c][1])


# --- npz ------------------------------------------------------------------------

def _npz_arrays(classes=6, per_class=10, test_per_class=3):
    rng = np.random.RandomState(0)
    y_train = np.repeat(np.arange(classes), per_class)
    y_test = np.repeat(np.arange(classes), test_per_class)
    return dict(x_train=rng.randint(0, 256, (len(y_train), 8, 8, 3)).astype(np.uint8),
                y_train=y_train,
                x_test=rng.randint(0, 256, (len(y_test), 8, 8, 3)).astype(np.uint8),
                y_test=y_test,
                class_names=np.array([f"thing{c}" for c in range(classes)]))


def test_npz_channels_last_and_first_give_the_same_normalised_tasks(tmp_path):
    arrays = _npz_arrays()
    np.savez(tmp_path / "last.npz", **arrays)
    first = dict(arrays, x_train=arrays["x_train"].transpose(0, 3, 1, 2),
                 x_test=arrays["x_test"].transpose(0, 3, 1, 2))
    np.savez(tmp_path / "first.npz", **first)
    a = load_tasks("npz", path=tmp_path / "last.npz", classes_per_task=2, seed=4)
    b = load_tasks("npz", path=tmp_path / "first.npz", classes_per_task=2, seed=4)
    assert len(a) == 3 and a[0].input_shape == (3, 8, 8)
    for ta, tb in zip(a, b):
        assert ta.class_names == [f"thing{c}" for c in ta.class_ids]
        assert torch.equal(ta.train.x, tb.train.x) and torch.equal(ta.test.x, tb.test.x)
        assert set(ta.train.y.tolist()) == {0, 1}
    # normalised per channel with the statistics of the training images
    x = torch.cat([t.train.x for t in a] + [t.val.x for t in a])          # all training images
    assert torch.allclose(x.mean((0, 2, 3)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(x.std((0, 2, 3), unbiased=False), torch.ones(3), atol=1e-4)


def test_npz_grayscale_n_h_w_becomes_one_channel(tmp_path):
    arrays = _npz_arrays()
    gray = dict(arrays, x_train=arrays["x_train"][..., 0].astype(np.float32),
                x_test=arrays["x_test"][..., 0].astype(np.float32))
    np.savez(tmp_path / "gray.npz", **gray)
    tasks = load_tasks("npz", path=tmp_path / "gray.npz", classes_per_task=3)
    assert len(tasks) == 2 and tasks[0].input_shape == (1, 8, 8)


NPZ_ERRORS = {
    # name: (change to the arrays, classes_per_task, words the message must contain)
    "missing key": (lambda a: a.pop("y_test"), 2, "lacks y_test"),
    "five channels": (lambda a: a.update(x_train=np.zeros((60, 8, 8, 5), np.uint8)), 2, "shape (60, 8, 8, 5)"),
    "int images": (lambda a: a.update(x_train=a["x_train"].astype(np.int32)), 2, "dtype int32"),
    "lengths": (lambda a: a.update(y_train=a["y_train"][:-1]), 2, "59 labels but x_train has 60"),
    "negative": (lambda a: a["y_train"].__setitem__(0, -1), 2, "negative labels"),
    "fractional": (lambda a: a.update(y_train=a["y_train"] + 0.5), 2, "non-integer"),
    "2-d labels": (lambda a: a.update(y_test=a["y_test"][:, None]), 2, "must be 1-d"),
    "indivisible": (lambda a: None, 4, "6 classes do not divide into tasks of 4"),
    "unseen test class": (lambda a: a["y_test"].__setitem__(0, 9), 2, "never occur in y_train"),
    "object names": (lambda a: a.update(class_names=np.array(["a", 1], dtype=object)), 2, "dtype=str"),
    "sizes differ": (lambda a: a.update(x_test=np.zeros((18, 9, 9, 3), np.uint8)), 2, "same size"),
}


@pytest.mark.parametrize("case", list(NPZ_ERRORS))
def test_npz_problems_are_named_in_the_error(tmp_path, case):
    change, classes_per_task, words = NPZ_ERRORS[case]
    arrays = _npz_arrays()
    change(arrays)
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=words.replace("(", r"\(").replace(")", r"\)")):
        load_tasks("npz", path=tmp_path / "bad.npz", classes_per_task=classes_per_task)


def test_npz_without_a_path_looks_in_the_data_dir_and_says_where(tmp_path):
    with pytest.raises(DataError, match="tasks.npz"):
        load_tasks("npz", data_dir=tmp_path)
    np.savez(tmp_path / "tasks.npz", **_npz_arrays())
    assert len(load_tasks("npz", data_dir=tmp_path)) == 3


def test_an_unknown_dataset_is_a_data_error():
    with pytest.raises(DataError, match="cifar100, glyphs, npz"):
        load_tasks("mnist")
    with pytest.raises(DataError, match="market_data.load_market"):     # a stream of days, not tasks
        load_tasks("market")
    with pytest.raises(DataError, match="imagedata.load_imagedata"):    # a module of its own
        load_tasks("imagedata")


def test_data_py_imports_neither_imagedata_nor_market_data():
    """Imports run one way (the two modules import data.py), so deleting
    either module leaves cifar100, glyphs and npz working."""
    tree = ast.parse(Path(data.__file__).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.Import) for alias in node.names}
    imported |= {(node.module or "").split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom)}
    assert not imported & {"imagedata", "market_data"}
    text = Path(data.__file__).read_text()
    assert "import_module" not in text and "__import__" not in text    # nor lazily, by name


def test_only_an_explicit_opt_in_allows_a_short_last_task():
    arrays = _npz_arrays(classes=7)
    x_train, x_test = arrays["x_train"].transpose(0, 3, 1, 2), arrays["x_test"].transpose(0, 3, 1, 2)
    args = (x_train, arrays["y_train"], x_test, arrays["y_test"], [f"c{i}" for i in range(7)],
            [0.0] * 3, [1.0] * 3)
    options = dict(seed=0, num_tasks=None, classes_per_task=3, val_fraction=0.15)
    with pytest.raises(DataError, match="7 classes do not divide into tasks of 3"):
        data.make_tasks("npz", *args, **options)
    tasks = data.make_tasks("imagedata", *args, **options, allow_short_last_task=True)
    assert [t.num_classes for t in tasks] == [3, 3, 1]
    assert sorted(c for t in tasks for c in t.class_ids) == list(range(7))


# --- Split.batches ----------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 300), batch_size=st.integers(1, 64), seed=st.integers(0, 2**31))
def test_batches_cover_every_row_once_per_epoch_reproducibly(n, batch_size, seed):
    split = Split(torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1), torch.arange(n))
    epoch = list(split.batches(batch_size, torch.Generator().manual_seed(seed)))
    again = list(split.batches(batch_size, torch.Generator().manual_seed(seed)))
    rows = torch.cat([b.y for b in epoch]) if epoch else torch.zeros(0, dtype=torch.int64)
    assert sorted(rows.tolist()) == list(range(n))                      # each row exactly once
    assert all(len(b) == batch_size for b in epoch[:-1]) and all(0 < len(b) <= batch_size for b in epoch)
    assert all(torch.equal(b.x.view(-1).long(), b.y) for b in epoch)    # x stays with its y
    assert [b.y.tolist() for b in epoch] == [b.y.tolist() for b in again]
    in_order = torch.cat([b.y for b in split.batches(batch_size, shuffle=False)]) if n else rows
    assert in_order.tolist() == list(range(n))


# --- Sequences ----------------------------------------------------------------------

def _numbered_sequences(lengths: list[int], max_length: int) -> Sequences:
    """Row i holds i + 1 in its first lengths[i] steps (3 features), zeros after."""
    n = len(lengths)
    lengths = torch.tensor(lengths, dtype=torch.int64)
    valid = torch.arange(max_length)[None, :] < lengths[:, None]                  # (N, L)
    x = torch.arange(1, n + 1, dtype=torch.float32)[:, None, None] * valid[..., None]
    return Sequences(x.expand(n, max_length, 3).contiguous(), lengths)          # (N, L, 3)


def _rows_are_intact(seqs: Sequences) -> list[int]:
    """The row ids of seqs, checking that every row's length still fits its x."""
    ids = []
    for x, length in zip(seqs.x, seqs.lengths.tolist()):          # x (L, 3)
        ids.append(int(x[0, 0]) - 1)
        assert (x[:length] == x[0, 0]).all() and (x[length:] == 0).all()
    return ids


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(1, 9), min_size=0, max_size=40),
       chunk=st.integers(1, 16), seed=st.integers(0, 2**31))
def test_sequences_indexing_and_split_keep_each_rows_x_and_length_together(lengths, chunk, seed):
    seqs = _numbered_sequences(lengths, 9)
    n = len(lengths)
    index = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:n // 2 + 1]
    picked = seqs[index]
    assert isinstance(picked, Sequences) and len(picked) == len(index)
    assert _rows_are_intact(picked) == index.tolist()
    assert picked.lengths.tolist() == [lengths[i] for i in index.tolist()]
    assert _rows_are_intact(seqs[1:4]) == list(range(n))[1:4]
    pieces = seqs.split(chunk)
    assert [len(p) for p in pieces] == [len(t) for t in torch.arange(n).split(chunk)]
    assert [i for p in pieces for i in _rows_are_intact(p)] == list(range(n))   # all rows, in order
    assert seqs.shape == (n, 9, 3) and seqs.to("cpu").device.type == "cpu" and not seqs.is_cuda


def test_batches_of_a_sequence_split_keep_x_lengths_and_labels_together():
    seqs = _numbered_sequences([3, 1, 4, 1, 5, 9, 2, 6], 9)
    split = Split(seqs, torch.arange(8))
    for batch in split.batches(3, torch.Generator().manual_seed(0)):
        assert _rows_are_intact(batch.x) == batch.y.tolist()
        assert batch.x.lengths.tolist() == [[3, 1, 4, 1, 5, 9, 2, 6][i] for i in batch.y.tolist()]


