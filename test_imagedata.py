"""test_imagedata.py: the rebuild of the report's ImageData (imagedata.py).

    python -m pytest -q test_imagedata.py

No network and no real data: the PNGs and the archive are written here, by an
encoder that follows the PNG specification independently of the decoder.
"""
import hashlib
import math
import struct
import zipfile
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import imagedata
from data import DataError
from imagedata import (decode_png, gray8_from_rgb, load_imagedata, read_imagedata_glyphs,
                       resize_gray8, shear_images)


# ---------------------------------------------------------------------------
# A small PNG encoder (PNG specification, sections 5, 6 and 9)
# ---------------------------------------------------------------------------

CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}      # colour type -> samples per pixel


def paeth(left, up, upleft):
    p = left + up - upleft
    pa, pb, pc = abs(p - left), abs(p - up), abs(p - upleft)
    if pa <= pb and pa <= pc:
        return left
    return up if pb <= pc else upleft


def filtered(line: bytes, prior: bytes, bpp: int, kind: int) -> bytes:
    out = bytearray()
    for i, x in enumerate(line):
        left = line[i - bpp] if i >= bpp else 0
        upleft = prior[i - bpp] if i >= bpp else 0
        predictor = [0, left, prior[i], (left + prior[i]) // 2,
                     paeth(left, prior[i], upleft)][kind]
        out.append((x - predictor) % 256)
    return bytes(out)


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_bytes(samples: np.ndarray, depth: int, colour: int, filters, interlace=0,
              extra_chunks=()) -> bytes:
    """samples: (H, W) or (H, W, C) integers, each < 2**depth."""
    samples = samples.reshape(samples.shape[0], samples.shape[1], -1)
    height, width, channels = samples.shape
    if depth == 1:
        lines = [np.packbits(row[:, 0].astype(np.uint8)).tobytes() for row in samples]
    else:
        lines = [row.astype(f">u{depth // 8}").tobytes() for row in samples]
    bpp = max(1, channels * depth // 8)
    data, prior = bytearray(), bytes(len(lines[0]))
    for line, kind in zip(lines, filters):
        data += bytes([kind]) + filtered(line, prior, bpp, kind)
        prior = line
    packed = zlib.compress(bytes(data))
    half = len(packed) // 2                       # two IDAT chunks: the decoder must join them
    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, interlace)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + b"".join(chunk(kind, body) for kind, body in extra_chunks)
            + chunk(b"IDAT", packed[:half]) + chunk(b"IDAT", packed[half:]) + chunk(b"IEND", b""))


FLAVOURS = [(1, 0), (8, 0), (8, 2)]              # (bit depth, colour type) the archive has


def random_samples(rng, height, width, depth, colour, top=None):
    """Random samples below `top` (default 2**depth); a small top makes
    neighbours equal often, which exercises the Paeth predictor's tie rules."""
    shape = (height, width) if CHANNELS[colour] == 1 else (height, width, CHANNELS[colour])
    return rng.integers(0, min(top or 2 ** depth, 2 ** depth), size=shape)


def expected_pixels(samples, depth):
    return (samples * 255 if depth == 1 else samples).astype(np.uint8)


# ---------------------------------------------------------------------------
# PNG decoding
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("depth, colour", FLAVOURS)
def test_png_decoder_undoes_all_five_filter_types(depth, colour):
    samples = random_samples(np.random.default_rng(0), 10, 13, depth, colour)
    filters = [0, 1, 2, 3, 4, 4, 3, 2, 1, 0]
    data = png_bytes(samples, depth, colour, filters,
                     extra_chunks=[(b"gAMA", struct.pack(">I", 45455))])
    assert np.array_equal(decode_png(data, "t.png"), expected_pixels(samples, depth))


@settings(max_examples=60, deadline=None)
@given(flavour=st.sampled_from(FLAVOURS), height=st.integers(1, 9), width=st.integers(1, 19),
       top=st.sampled_from([2, 4, 256]), seed=st.integers(0, 2**32 - 1), data=st.data())
def test_png_decoder_returns_the_pixels_written(flavour, height, width, top, seed, data):
    depth, colour = flavour
    samples = random_samples(np.random.default_rng(seed), height, width, depth, colour, top)
    filters = data.draw(st.lists(st.integers(0, 4), min_size=height, max_size=height))
    decoded = decode_png(png_bytes(samples, depth, colour, filters), "t.png")
    assert decoded.dtype == np.uint8
    assert np.array_equal(decoded, expected_pixels(samples, depth))


@pytest.mark.parametrize("depth, colour, interlace, words", [
    (8, 0, 1, "interlaced"),
    (1, 0, 1, "interlaced"),
    (8, 3, 0, "palette"),
    (16, 0, 0, "16-bit"),
    (8, 6, 0, "alpha"),
    (8, 4, 0, "alpha"),
    (16, 2, 0, "16-bit"),
])
def test_png_decoder_refuses_other_flavours(depth, colour, interlace, words):
    samples = random_samples(np.random.default_rng(1), 4, 4, 8, colour)
    extra = [(b"PLTE", bytes(range(256)) * 3)] if colour == 3 else []
    data = png_bytes(samples, depth, colour, [0] * 4, interlace, extra)
    with pytest.raises(DataError, match=words) as error:
        decode_png(data, "odd.png")
    assert "odd.png" in str(error.value)


def test_png_decoder_refuses_a_damaged_file():
    data = bytearray(png_bytes(np.zeros((3, 3), np.uint8), 8, 0, [0, 0, 0]))
    idat = data.index(b"IDAT")
    data[idat + 5] ^= 0x01                       # one bit of the compressed pixels
    with pytest.raises(DataError, match="CRC"):
        decode_png(bytes(data), "bad.png")
    with pytest.raises(DataError, match="not a PNG"):
        decode_png(b"GIF89a" + bytes(20), "bad.png")


# ---------------------------------------------------------------------------
# Grayscale, resize, shear
# ---------------------------------------------------------------------------

def test_rgb_to_gray_matches_pil_convert_L():
    # Values PIL's Image.new("RGB", (1, 1), colour).convert("L") returns.
    rgb = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255], [0, 0, 0]]], np.uint8)
    assert gray8_from_rgb(rgb).tolist() == [[76, 150, 29, 255, 0]]


@pytest.mark.parametrize("height, width", [(105, 105), (63, 63), (63, 78), (7, 5)])
def test_resize_keeps_a_flat_image_flat(height, width):
    for value in (0, 1, 128, 254, 255):
        flat = np.full((height, width), value, np.uint8)
        assert np.all(resize_gray8(flat, 20) == value)


def test_resize_to_the_same_size_is_the_identity():
    image = np.random.default_rng(2).integers(0, 256, (20, 20)).astype(np.uint8)
    assert np.array_equal(resize_gray8(image, 20), image)


def test_shrinking_averages_instead_of_sampling():
    # A one-pixel checkerboard shrunk 105 -> 20 is a flat mid-grey when the
    # filter covers each output pixel's footprint (nearest neighbour would keep
    # 0s and 255s).
    board = ((np.indices((105, 105)).sum(0) % 2) * 255).astype(np.uint8)
    assert np.abs(resize_gray8(board, 20).astype(int) - 127).max() <= 4


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 12), seed=st.integers(0, 2**32 - 1))
def test_the_zero_shear_is_the_identity(n, seed):
    images = np.random.default_rng(seed).integers(0, 256, (2, n, n)).astype(np.uint8)
    assert np.array_equal(shear_images(images, np.array([[0.0, 0.0]]))[:, 0], images)


@pytest.mark.parametrize("a, b, source, target", [
    # Computed by hand on a 20x20 image, centre 9.5; (row, column).
    # a = 0.5: output column x takes input column x + 0.5*y. Row 15 has
    # y = 5.5, so x + 2.75 -> rounds to x + 3: the pixel moves 3 columns left.
    (0.5, 0.0, (15, 10), (15, 7)),
    # Row 2 has y = -7.5: x - 3.75 -> x - 4, the pixel moves 4 columns right.
    (0.5, 0.0, (2, 10), (2, 14)),
    # b = -0.3: output row y takes input row y - 0.3*x. Column 2 has x = -7.5,
    # so y + 2.25 -> y + 2: the pixel moves 2 rows up.
    (0.0, -0.3, (6, 2), (4, 2)),
    # a = 1: at row 12 (y = 2.5) the input column is x + 2.5, an exact half
    # that rounds up: output column 7 (x = -2.5) reads x = 0 -> column 10.
    (1.0, 0.0, (12, 10), (12, 7)),
    # a = 0.2 at row 12: x + 0.5, again an exact half, rounded up although 0.2
    # is not exact in binary: output column 9 reads column 10.
    (0.2, 0.0, (12, 10), (12, 9)),
])
def test_a_shear_moves_a_pixel_where_the_formula_says(a, b, source, target):
    image = np.zeros((1, 20, 20), np.uint8)
    image[0][source] = 200
    sheared = shear_images(image, np.array([[a, b]]))[0, 0]
    assert sheared[target] == 200 and sheared.sum() == 200


def test_a_shear_fills_what_comes_from_outside_with_zero():
    image = np.full((1, 20, 20), 7, np.uint8)
    sheared = shear_images(image, np.array([[1.0, 0.0]]))[0, 0]
    # Row 0 (y = -9.5): output column 19 reads column 10, column 9 would read -0.5 -> 0.
    assert sheared[0].tolist() == [0] * 9 + [7] * 11
    assert sheared[19].tolist() == [7] * 10 + [0] * 10     # row 19 (y = 9.5): +9.5


# ---------------------------------------------------------------------------
# The recipe, on a tiny archive shaped like the real one
# ---------------------------------------------------------------------------

# file stem -> (bit depth, colour type, size): kept classes first, then dropped ones.
TINY_KEPT = {"0b": (1, 0, (9, 7)), "90b": (8, 2, (6, 8)), "180delta": (8, 0, (10, 10)),
             "270delta": (1, 0, (8, 8)), "0circle": (8, 2, (5, 5))}
TINY_DROPPED = {"0delta": (1, 0, (8, 8)), "90delta": (8, 0, (8, 8)),
                "90circle": (8, 2, (5, 5)), "270z": (1, 0, (6, 6))}
TINY_NAMES = {"0 b", "90 b", "180 delta", "270 delta", "0 circle"}


def make_tiny_archive(path):
    rng = np.random.default_rng(3)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("images_rotate/", b"")
        for stem, (depth, colour, (h, w)) in {**TINY_KEPT, **TINY_DROPPED}.items():
            samples = random_samples(rng, h, w, depth, colour)
            zf.writestr(f"images_rotate/{stem}.png", png_bytes(samples, depth, colour, [4] * h))
            # macOS resource forks: named like PNGs, but not PNGs
            zf.writestr(f"__MACOSX/images_rotate/._{stem}.png", b"\0\5\26\7 not a png")
        zf.writestr("images_rotate/white.txt", b"not an image")
    return path


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """A data folder holding the tiny archive, accepted as the real one."""
    (tmp_path / "data").mkdir()
    archive = make_tiny_archive(tmp_path / "data" / "images_rotate.zip")
    monkeypatch.setattr(imagedata, "IMAGEDATA_SHA256",
                        hashlib.sha256(archive.read_bytes()).hexdigest())
    monkeypatch.setattr(imagedata, "IMAGEDATA_URL", (tmp_path / "nowhere.zip").as_uri())
    return archive.parent


def test_glyphs_are_kept_by_name_and_inverted(tmp_path):
    path = tmp_path / "a.zip"
    with zipfile.ZipFile(path, "w") as zf:
        white, black = np.ones((6, 6)), np.zeros((6, 6, 3))
        zf.writestr("images_rotate/0b.png", png_bytes(white, 1, 0, [0] * 6))
        zf.writestr("images_rotate/90b.png", png_bytes(black, 8, 2, [0] * 6))
        zf.writestr("images_rotate/90circle.png", b"dropped by name, never decoded")
    glyphs, names = read_imagedata_glyphs(path)
    assert names == ["0 b", "90 b"]
    assert glyphs.shape == (2, 20, 20) and glyphs.dtype == np.uint8
    assert np.all(glyphs[0] == 0) and np.all(glyphs[1] == 255)


def test_imagedata_tasks_follow_the_recipe(tiny):
    (task,) = load_imagedata(tiny, seed=0)     # 5 classes, 5 per task
    # Dropped classes are gone, "180 delta" and "270 delta" stay (missing comma).
    assert set(task.class_names) == TINY_NAMES
    n = 5 * 441                                               # 2205 images
    assert len(task.test) == math.ceil(n / 4) == 552          # 75/25, test rounded up
    assert len(task.train) + len(task.val) == n - 552 == 1653
    for label in range(5):
        in_train, in_val = int((task.train.y == label).sum()), int((task.val.y == label).sum())
        assert in_train + in_val + int((task.test.y == label).sum()) == 441
        assert in_val == math.floor(0.15 * (in_train + in_val) + 0.5)
    for split in (task.train, task.val, task.test):
        assert split.x.shape[1:] == (1, 20, 20) and split.x.dtype == torch.float32
        assert set(split.y.tolist()) <= set(range(5))
    train = torch.cat([task.train.x, task.val.x]).double()
    assert abs(train.mean()) < 1e-5 and abs(train.std() - 1) < 1e-3


def test_the_last_task_holds_the_remaining_classes(tiny):
    tasks = load_imagedata(tiny, seed=0, classes_per_task=2)
    assert [t.num_classes for t in tasks] == [2, 2, 1]        # no phantom class
    assert {name for t in tasks for name in t.class_names} == TINY_NAMES


def test_the_seed_draws_class_order_and_validation_but_not_the_test_images(tiny):
    runs = [load_imagedata(tiny, seed=seed, classes_per_task=1)
            for seed in (0, 1, 0)]
    assert all(np.array_equal(a.val.x.numpy(), b.val.x.numpy()) and a.class_names == b.class_names
               for a, b in zip(runs[0], runs[2]))                  # same seed, same tasks
    orders = [[t.class_names[0] for t in tasks] for tasks in runs[:2]]
    assert orders[0] != orders[1]
    for name in TINY_NAMES:
        task = [next(t for t in tasks if t.class_names == [name]) for tasks in runs[:2]]
        assert np.array_equal(task[0].test.x.numpy(), task[1].test.x.numpy())
        assert not np.array_equal(task[0].val.x.numpy(), task[1].val.x.numpy())


def test_a_wrong_archive_is_refused_and_nothing_is_cached(tiny, monkeypatch):
    monkeypatch.setattr(imagedata, "IMAGEDATA_SHA256", "0" * 64)
    with pytest.raises(DataError, match="0" * 64) as error:
        load_imagedata(tiny, seed=0)
    message = str(error.value)
    assert "images_rotate.zip" in message and imagedata.IMAGEDATA_URL in message
    assert sorted(p.name for p in tiny.iterdir()) == ["images_rotate.zip"]


def test_offline_without_the_archive_says_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setattr(imagedata, "IMAGEDATA_URL", "http://127.0.0.1:9/images_rotate.zip")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    with pytest.raises(DataError) as error:
        load_imagedata(data_dir, seed=0)
    message = str(error.value)
    for words in ("http://127.0.0.1:9/images_rotate.zip", "images_rotate.zip",
                  str(data_dir), imagedata.IMAGEDATA_SHA256):
        assert words in message
    assert list(data_dir.iterdir()) == []


def test_the_archive_is_downloaded_verified_and_kept(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(imagedata, "IMAGEDATA_URL", (tiny / "images_rotate.zip").as_uri())
    fresh = tmp_path / "fresh"
    assert len(load_imagedata(fresh, seed=0)) == 1
    assert (fresh / "images_rotate.zip").read_bytes() == (tiny / "images_rotate.zip").read_bytes()
    monkeypatch.setattr(imagedata, "IMAGEDATA_SHA256", "f" * 64)
    other = tmp_path / "other"
    with pytest.raises(DataError, match="sha256"):
        load_imagedata(other, seed=0)
    assert list(other.iterdir()) == []                        # no partial or wrong file left


def test_the_second_load_reads_the_cache(tiny, monkeypatch):
    first = load_imagedata(tiny, seed=4, classes_per_task=1)

    def no_rebuild(archive):
        raise AssertionError("rebuilt although the cache was there")

    monkeypatch.setattr(imagedata, "build_imagedata_arrays", no_rebuild)
    second = load_imagedata(tiny, seed=4, classes_per_task=1)
    for a, b in zip(first, second):
        assert a.class_names == b.class_names
        for split in ("train", "val", "test"):
            assert np.array_equal(getattr(a, split).x.numpy(), getattr(b, split).x.numpy())
            assert np.array_equal(getattr(a, split).y.numpy(), getattr(b, split).y.numpy())


def test_a_changed_recipe_builds_a_new_cache(tiny, monkeypatch):
    load_imagedata(tiny, seed=0)
    builds = []
    build = imagedata.build_imagedata_arrays
    monkeypatch.setattr(imagedata, "build_imagedata_arrays",
                        lambda archive: builds.append(archive) or build(archive))
    monkeypatch.setattr(imagedata, "IMAGEDATA_SPLIT_SEED", 1)
    load_imagedata(tiny, seed=0)
    assert len(builds) == 1
    assert len(list(tiny.glob("imagedata_*.npz"))) == 2


def test_the_command_line_names_the_glyphs_of_every_task(tiny, capsys):
    assert imagedata.main(["--data-dir", str(tiny)]) == 0
    out = capsys.readouterr().out
    assert "imagedata: 1 tasks, input (1, 20, 20)" in out
    assert all(name in out for name in TINY_NAMES)
