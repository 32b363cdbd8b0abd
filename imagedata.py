"""imagedata.py: the report's ImageData, rebuilt from the course's glyph PNGs.

    python imagedata.py --data-dir data                   # all 15 tasks, seed 0
    python imagedata.py --data-dir data --seed 1 --num-tasks 3

The command prints a summary of the task stream and how long loading took,
as data.py does for its datasets; a problem with the data prints one line
"error: ..." and exits 1.

ImageData is the second dataset of the course report: 20x20 grayscale glyphs
(letters, Greek letters, shapes, at 4 rotations), each under 441 affine
shears, 74 classes, cut into 14 tasks of 5 classes and a last task of 4. The
course published only its source images: the archive images_rotate.zip of
88 PNGs (<data_dir>/images_rotate.zip, else downloaded from the course's
repository, sha256-checked). This module rebuilds the dataset from them with
the course's recipe (shared/data/README.md) using nothing but zlib and
numpy: its own PNG decoder, PIL's grayscale conversion and bicubic resize
reproduced exactly, the shears, a fixed train/test split. The rebuild runs
once (under a second) and is cached in data_dir as imagedata_<hash>.npz,
the hash being that of the recipe, so a changed recipe builds anew.

Public interface:
    load_imagedata(data_dir, *, seed, num_tasks=None, classes_per_task=None,
                   device="cpu") -> list[Task]
        the same stream data.load_tasks gives for its datasets: cut by
        data.make_tasks (seeded class order, labels 0..k-1, validation rows).
    load_imagedata_arrays(data_dir) -> dict of arrays: the dataset before it
        is cut into tasks (train/test images, labels, class names).
    decode_png, gray8_from_rgb, resize_gray8, shear_images: the recipe's steps.
Every problem with the data raises data.DataError.

data.py knows nothing of this module (imports run one way: this one imports
data.py); deleting it leaves the other datasets working.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import struct
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np

from data import (VAL_FRACTION, DataError, Task, add_data_arguments, atomic_write,
                  data_dir_or_default, fetch_verified, make_tasks, positive_int, summarise_tasks)

# The course's archive of 88 source PNGs and its sha256; the recipe that turns
# them into the dataset is in shared/data/README.md (see build_imagedata_arrays).
IMAGEDATA_ARCHIVE = "images_rotate.zip"
IMAGEDATA_URL = ("https://github.com/gmshroff/metaLearning2022/raw/main/"
                 "data/images_rotate.zip")
IMAGEDATA_SHA256 = "691ef3f33a7017692c5abe8f7107b3bd12498c3a14609a2fa67e2ae94e7355b6"

# Bump when the code below changes what it builds in a way the recipe
# description (imagedata_recipe) does not already capture: the cache follows.
IMAGEDATA_RECIPE_VERSION = "1"
IMAGEDATA_SIZE = 20                       # glyphs are resized to 20x20 (README)
IMAGEDATA_CLASSES_PER_TASK = 5            # the report: 14 tasks of 5 and one of 4
# Rotations that look like another class (README). The course's list also meant
# to drop "180delta" and "270delta", but a missing comma between them made
# Python concatenate the two strings into "180delta270delta", which names no
# file: both stayed. We keep them too, so 88 - 14 = 74 classes, as the report.
IMAGEDATA_DROPPED = ("90circle", "180circle", "270circle",
                     "90square", "180square", "270square",
                     "0delta", "90delta",
                     "180theta", "270theta",
                     "180x", "270x",
                     "180z", "270z")
IMAGEDATA_SHEAR_VALUES = tuple(k / 10 for k in range(-10, 11))   # a, b in {-1.0, -0.9, ..., 1.0}
IMAGEDATA_TEST_FRACTION = 0.25
# The train/test split is part of the dataset, like CIFAR's official split: one
# fixed seed, so every run tests on the same images; the run's seed draws the
# class order and the validation images (as for 20-Split CIFAR-100).
IMAGEDATA_SPLIT_SEED = 0

IMAGEDATA_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# (bit depth, colour type) -> channels, for the flavours the archive uses:
# 1-bit grayscale (64 files), 8-bit grayscale (the 8 "-flip" files), 8-bit RGB (16).
IMAGEDATA_PNG_FLAVOURS = {(1, 0): 1, (8, 0): 1, (8, 2): 3}
IMAGEDATA_PNG_COLOUR_TYPES = {0: "grayscale", 2: "RGB", 3: "palette",
                              4: "grayscale+alpha", 6: "RGB+alpha"}


# ---------------------------------------------------------------------------
# ImageData: the course's glyphs, sheared 441 ways
# ---------------------------------------------------------------------------

def load_imagedata(data_dir, *, seed: int, num_tasks: int | None = None,
                   classes_per_task: int | None = None, device="cpu",
                   val_fraction: float = VAL_FRACTION) -> list[Task]:
    """ImageData, the report's second dataset, as a task stream on `device`.

    20x20 grayscale glyphs (letters, Greek letters, shapes, at 4 rotations,
    each under 441 affine shears), 74 classes. Rebuilt from the course's 88
    source PNGs (images_rotate.zip) with the recipe in shared/data/README.md,
    using nothing but zlib and numpy, and cached in data_dir: the rebuild
    (under a second) runs once, later loads read the cache.

    Cut by make_tasks like every dataset: a seeded class order (numpy
    RandomState(seed)), tasks of `classes_per_task` (74 classes, 5 per task ->
    14 tasks of 5 and a last task of 4: no phantom class), labels 0..k-1,
    `val_fraction` of each class's training images as validation.
    x: float32 (N, 1, 20, 20), y: int64 (N,). Class names read
    "<rotation> <shape>", e.g. "90 delta".

    Normalisation (our choice; the recipe says nothing about it): minus the
    mean, over the std of all training pixels (one channel), as for glyphs.

    The arguments are data.load_tasks's: data_dir None means $MARK_DATA_DIR
    or ./data; seed draws the class order and the validation rows;
    num_tasks=N keeps the first N tasks of the full stream; classes_per_task
    defaults to 5 (IMAGEDATA_CLASSES_PER_TASK).
    """
    arrays = load_imagedata_arrays(data_dir_or_default(data_dir))
    tasks = make_tasks("imagedata", arrays["x_train"][:, None], arrays["y_train"],
                       arrays["x_test"][:, None], arrays["y_test"],   # (N, 1, 20, 20) uint8
                       arrays["class_names"].tolist(),
                       [float(arrays["pixel_mean"])], [float(arrays["pixel_std"])], seed=seed,
                       num_tasks=num_tasks,
                       classes_per_task=classes_per_task or IMAGEDATA_CLASSES_PER_TASK,
                       val_fraction=val_fraction, allow_short_last_task=True)
    # Move everything once; training loops then never copy data again.
    return [task.to(device) for task in tasks]


def load_imagedata_arrays(data_dir: Path) -> dict[str, np.ndarray]:
    """The generated dataset (after shear and train/test split), from the cache
    in data_dir, or built from the archive and cached.

    The cache does not depend on the run's seed (see IMAGEDATA_SPLIT_SEED), and
    its name carries a hash of the recipe, so a changed recipe builds anew.
    """
    cache = imagedata_cache_path(data_dir)
    if cache.exists():
        try:
            with np.load(cache) as stored:
                return {key: stored[key] for key in stored.files}
        except (OSError, ValueError, zipfile.BadZipFile) as error:
            raise DataError(f"the ImageData cache {cache} is unreadable ({error}); "
                            f"delete it and it is rebuilt from {IMAGEDATA_ARCHIVE}") from None
    arrays = build_imagedata_arrays(find_imagedata_archive(data_dir))
    with atomic_write(cache) as f:
        np.savez(f, **arrays)
    return arrays


def imagedata_recipe() -> dict:
    """Everything that decides the generated arrays, for the cache key."""
    return {"version": IMAGEDATA_RECIPE_VERSION,
            "archive_sha256": IMAGEDATA_SHA256,
            "gray": "ITU-R 601-2 luma, PIL fixed point (19595, 38470, 7471) rounded",
            "resize": f"{IMAGEDATA_SIZE}x{IMAGEDATA_SIZE}, PIL BICUBIC a=-0.5, antialiased, 22 bit",
            "dropped": sorted(IMAGEDATA_DROPPED),
            "invert": "255 - v",
            "shear": "nearest, round half up, centre (n-1)/2, zero outside",
            "shear_values": list(IMAGEDATA_SHEAR_VALUES),
            "test_fraction": IMAGEDATA_TEST_FRACTION,
            "test_rounding": "ceil",
            "split_seed": IMAGEDATA_SPLIT_SEED}


def imagedata_cache_path(data_dir: Path) -> Path:
    recipe = json.dumps(imagedata_recipe(), sort_keys=True).encode()
    return Path(data_dir) / f"imagedata_{hashlib.sha256(recipe).hexdigest()[:12]}.npz"


def build_imagedata_arrays(archive: Path) -> dict[str, np.ndarray]:
    """The recipe of shared/data/README.md, from the PNGs to the train/test split.

    Returns x_train, x_test: uint8 (N, 20, 20) white glyphs on black;
    y_train, y_test: int64 class ids; class_names: str (C,);
    pixel_mean, pixel_std: of x_train, in 0..255 units (make_tasks's).
    """
    glyphs, names = read_imagedata_glyphs(archive)                  # (C, 20, 20)
    shears = np.array([(a, b) for a in IMAGEDATA_SHEAR_VALUES
                       for b in IMAGEDATA_SHEAR_VALUES])            # (441, 2)
    images = shear_images(glyphs, shears)                           # (C, 441, 20, 20)
    images = images.reshape(-1, IMAGEDATA_SIZE, IMAGEDATA_SIZE)     # (C*441, 20, 20)
    labels = np.repeat(np.arange(len(names)), len(shears))         # class-major, like images

    # Random 75/25 split of all images (not per class). The test size is rounded
    # up, as scikit-learn's train_test_split(test_size=0.25) does: of 32,634
    # images, ceil(8158.5) = 8,159 test and 24,475 train, the report's numbers.
    n_test = math.ceil(IMAGEDATA_TEST_FRACTION * len(labels))
    order = np.random.default_rng(IMAGEDATA_SPLIT_SEED).permutation(len(labels))
    test, train = np.sort(order[:n_test]), np.sort(order[n_test:])
    x_train = images[train]
    return {"x_train": x_train, "y_train": labels[train],
            "x_test": images[test], "y_test": labels[test],
            "class_names": np.array(names),
            "pixel_mean": np.array(x_train.mean(dtype=np.float64)),
            "pixel_std": np.array(x_train.std(dtype=np.float64))}


def read_imagedata_glyphs(archive: Path) -> tuple[np.ndarray, list[str]]:
    """The kept glyphs, uint8 (C, 20, 20), inverted to white strokes on black,
    and their names ("90 delta"), sorted by rotation then shape.

    Each PNG is converted to 8-bit grayscale as PIL's convert("L") does and
    resized to 20x20 as PIL's resize((20, 20)) does: the course used PIL.
    """
    glyphs = {}
    with zipfile.ZipFile(archive) as zf:
        for entry in zf.infolist():
            path = entry.filename
            # __MACOSX/ holds macOS resource forks named like the PNGs: not images.
            if entry.is_dir() or path.startswith("__MACOSX/") or not path.endswith(".png"):
                continue
            stem = path.rsplit("/", 1)[-1][:-len(".png")]       # "90delta"
            if stem in IMAGEDATA_DROPPED:
                continue
            match = re.fullmatch(r"(0|90|180|270)(.+)", stem)
            if match is None:
                raise DataError(f"{archive}: {path} is not named <rotation><shape>.png")
            image = decode_png(zf.read(entry), f"{archive}:{path}")
            gray = image if image.ndim == 2 else gray8_from_rgb(image)
            glyphs[int(match[1]), match[2]] = 255 - resize_gray8(gray, IMAGEDATA_SIZE)
    if not glyphs:
        raise DataError(f"{archive} holds no glyph PNGs")
    keys = sorted(glyphs)
    return np.stack([glyphs[k] for k in keys]), [f"{r} {shape}" for r, shape in keys]


def shear_images(images: np.ndarray, shears: np.ndarray) -> np.ndarray:
    """Shear every image by every (a, b): (C, n, n), (S, 2) -> (C, S, n, n).

    Output pixel (x, y) -- x to the right, y downwards, both measured from the
    image centre (n-1)/2 -- takes the input pixel at (x + a*y, b*x + y),
    nearest neighbour, zero where that falls outside the image. Exact halves
    are common (a = 0.2, y = 2.5) and round up: floor(v + 0.5).
    """
    n = images.shape[-1]
    centre = (n - 1) / 2
    y, x = np.mgrid[0:n, 0:n] - centre                  # (n, n) each
    a, b = shears[:, 0, None, None], shears[:, 1, None, None]   # (S, 1, 1)
    # a*y is a multiple of 0.05 up to float noise (0.2 is not exact in binary).
    # On this grid the halves happen to come out exact; rounding to 9 decimals
    # makes that hold by construction, so every half rounds up alike.
    col = np.floor(np.round(x + a * y, 9) + centre + 0.5).astype(np.int64)   # (S, n, n)
    row = np.floor(np.round(b * x + y, 9) + centre + 0.5).astype(np.int64)
    inside = (col >= 0) & (col < n) & (row >= 0) & (row < n)
    taken = images[:, row.clip(0, n - 1), col.clip(0, n - 1)]   # (C, S, n, n)
    return np.where(inside, taken, 0).astype(images.dtype)


def gray8_from_rgb(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W) uint8 by ITU-R 601-2 luma,
    L = R*299/1000 + G*587/1000 + B*114/1000, computed as PIL's convert("L"):
    16-bit fixed-point weights (they sum to 65536) and rounding to nearest.
    (Older PIL versions truncated (R*299 + G*587 + B*114) / 1000: at most 1 lower.)"""
    r, g, b = rgb.astype(np.uint32).transpose(2, 0, 1)
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)


def resize_gray8(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W) uint8 -> (size, size) uint8, as PIL's resize((size, size)) of an
    "L" image with its default filter since Pillow 7, BICUBIC: a separable
    filter, rows first, each pass rounded and clipped to 8 bits.

    The recipe leaves the interpolation open; PIL's default is the likeliest
    to match the course. It averages over the shrunk pixel's footprint
    (antialiasing), so thin strokes fade to grey instead of vanishing.
    """
    half = 1 << 21                                      # 0.5 in 22-bit fixed point
    across = pil_bicubic_weights(image.shape[1], size)  # (size, W)
    down = pil_bicubic_weights(image.shape[0], size)    # (size, H)
    rows = np.clip((image.astype(np.int64) @ across.T + half) >> 22, 0, 255)   # (H, size)
    return np.clip((down @ rows + half) >> 22, 0, 255).astype(np.uint8)     # (size, size)


def pil_bicubic_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) int64 weights with 22 fractional bits, as Pillow's
    precompute_coeffs computes them for BICUBIC (Keys kernel, a = -0.5)."""
    scale = n_in / n_out
    stretch = max(scale, 1.0)      # shrinking widens the kernel by the same factor
    support = 2.0 * stretch        # the cubic kernel is zero beyond 2 pixels
    a = -0.5                       # the cubic's free parameter, Pillow's choice
    weights = np.zeros((n_out, n_in))
    for out in range(n_out):
        centre = (out + 0.5) * scale                    # in input pixel units
        lo = max(int(centre - support + 0.5), 0)
        hi = min(int(centre + support + 0.5), n_in)
        t = np.abs((np.arange(lo, hi) - centre + 0.5) / stretch)   # distance, in kernel units
        taps = np.where(t < 1, ((a + 2) * t - (a + 3)) * t * t + 1,
                        np.where(t < 2, (((t - 5) * t + 8) * t - 4) * a, 0.0))
        weights[out, lo:hi] = taps / taps.sum()
    return np.trunc(weights * (1 << 22) + np.copysign(0.5, weights)).astype(np.int64)


def decode_png(data: bytes, name: str) -> np.ndarray:
    """A PNG's pixels: uint8 (H, W) for grayscale, (H, W, 3) for RGB.

    Only non-interlaced 1-bit and 8-bit grayscale and 8-bit RGB are read
    (1-bit samples scaled to 0/255, as PNG and PIL do); every other flavour
    raises DataError rather than being decoded wrongly. `name` goes into the
    messages.
    """
    if not data.startswith(IMAGEDATA_PNG_SIGNATURE):
        raise DataError(f"{name} is not a PNG file (wrong signature)")
    pos, header, idat = len(IMAGEDATA_PNG_SIGNATURE), None, []
    while True:
        # chunk = length (4 bytes) | type (4) | body (length) | CRC-32 of type + body (4)
        if pos + 12 > len(data):
            raise DataError(f"{name}: PNG truncated before its IEND chunk")
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if pos + 12 + length > len(data):
            raise DataError(f"{name}: PNG truncated inside its {kind!r} chunk")
        body = data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        if zlib.crc32(kind + body) != crc:
            raise DataError(f"{name}: CRC mismatch in the {kind!r} chunk (damaged file)")
        pos += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
        elif kind[0] & 0x20 == 0 and kind != b"PLTE":   # upper-case first letter: critical
            raise DataError(f"{name}: unknown critical PNG chunk {kind!r}")
    if header is None:
        raise DataError(f"{name}: PNG without an IHDR chunk")
    width, height, depth, colour, compression, filtering, interlace = header
    channels = IMAGEDATA_PNG_FLAVOURS.get((depth, colour))
    if channels is None or interlace or compression or filtering:
        raise DataError(
            f"{name}: unsupported PNG flavour: {depth}-bit "
            f"{IMAGEDATA_PNG_COLOUR_TYPES.get(colour, f'colour type {colour}')}"
            f"{', interlaced' if interlace else ''}; only non-interlaced 1-bit or 8-bit "
            f"grayscale and 8-bit RGB are read")
    try:
        raw = zlib.decompress(b"".join(idat))
    except zlib.error as error:
        raise DataError(f"{name}: damaged PNG image data ({error})") from None
    stride = (width * channels * depth + 7) // 8       # bytes per row, filter byte excluded
    if len(raw) != height * (stride + 1):
        raise DataError(f"{name}: PNG image data has {len(raw)} bytes, "
                        f"expected {height} rows of 1 + {stride}")
    rows = unfilter_png_rows(np.frombuffer(raw, np.uint8).reshape(height, stride + 1),
                             max(1, channels * depth // 8), name)    # (H, stride)
    if depth == 1:                                      # 8 pixels per byte, high bit first
        return np.unpackbits(rows, axis=1)[:, :width] * np.uint8(255)
    pixels = rows.reshape(height, width, channels)
    return pixels[:, :, 0] if channels == 1 else pixels


def unfilter_png_rows(scanlines: np.ndarray, bpp: int, name: str) -> np.ndarray:
    """Undo PNG's row filters: (H, 1 + stride) uint8, filter type first in each
    row -> (H, stride) uint8. Each byte was stored as x - predictor (mod 256),
    the predictor built from its decoded neighbours: left (bpp bytes back,
    one whole pixel), up (same byte, previous row) and up-left; all three are
    0 outside the image. uint8 arithmetic wraps, which is the mod 256."""
    height, stride = scanlines.shape[0], scanlines.shape[1] - 1
    out = np.zeros((height + 1, stride), np.uint8)     # out[0]: the zero row above the image
    for r in range(height):
        kind, raw, up = scanlines[r, 0], scanlines[r, 1:], out[r]
        if kind == 0:                                  # None: x
            out[r + 1] = raw
        elif kind == 1:                                # Sub: x + left, a running sum per byte lane
            out[r + 1] = np.cumsum(raw.reshape(-1, bpp), axis=0, dtype=np.uint8).reshape(-1)
        elif kind == 2:                                # Up: x + up
            out[r + 1] = raw + up
        elif kind in (3, 4):                           # Average, Paeth: need the decoded left byte
            out[r + 1] = unfilter_png_row_sequentially(raw.tolist(), up.tolist(), bpp, kind)
        else:
            raise DataError(f"{name}: unknown PNG filter type {kind} in row {r}")
    return out[1:]


def unfilter_png_row_sequentially(raw: list[int], up: list[int], bpp: int,
                                  kind: int) -> list[int]:
    """Average (kind 3: x + floor((left + up) / 2)) or Paeth (kind 4: x + the
    neighbour closest to left + up - upleft), one byte after the other."""
    row = [0] * len(raw)
    for i, x in enumerate(raw):
        left = row[i - bpp] if i >= bpp else 0
        upleft = up[i - bpp] if i >= bpp else 0
        if kind == 3:
            predictor = (left + up[i]) // 2
        else:
            guess = left + up[i] - upleft
            distances = abs(guess - left), abs(guess - up[i]), abs(guess - upleft)
            # ties go to left, then up, then upleft (the order matters: PNG spec 9.4)
            predictor = (left, up[i], upleft)[distances.index(min(distances))]
        row[i] = (x + predictor) & 0xFF
    return row


def find_imagedata_archive(data_dir: Path) -> Path:
    """data_dir/images_rotate.zip, downloaded first if missing, sha256 verified."""
    path = Path(data_dir) / IMAGEDATA_ARCHIVE
    hint = (f"Download {IMAGEDATA_URL} (sha256 {IMAGEDATA_SHA256}) on a machine with "
            f"internet access and put it at {path}, or point --data-dir at the folder "
            f"that holds {IMAGEDATA_ARCHIVE}.")
    return fetch_verified(IMAGEDATA_URL, path, algorithm="sha256", expected=IMAGEDATA_SHA256, hint=hint)


# ---------------------------------------------------------------------------
# Command line: a summary of the stream
# ---------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Summarise the ImageData task stream "
                                     "(built from images_rotate.zip and cached on first use).")
    add_data_arguments(parser)
    parser.add_argument("--num-tasks", type=positive_int, default=None, help="keep the first N tasks")
    args = parser.parse_args(argv)
    return summarise_tasks("imagedata", lambda: load_imagedata(
        args.data_dir, seed=args.seed, num_tasks=args.num_tasks), args.seed)


if __name__ == "__main__":
    sys.exit(main())
