"""MNIST loading: a folder of IDX files (.gz or raw), a Keras-style mnist.npz,
or Keras' own downloader when no path is given.

Every loader returns the same `Mnist` record and validates shapes, dtypes,
counts and label ranges, so a wrong or truncated file is a one-line
`DataError` naming the file rather than a numpy traceback.
"""

from __future__ import annotations

import gzip
import hashlib
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from digitwatch.errors import DataError
from digitwatch.reader.contract import DIGITS, SIDE

IMAGE_MAGIC = 2051
LABEL_MAGIC = 2049
TRAIN_COUNT = 60_000
TEST_COUNT = 10_000
VALIDATION_SIZE = 5_000  # training digits held out for validation and calibration

IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


@dataclass(frozen=True)
class Mnist:
    """The four MNIST arrays (uint8 images, white ink on black) and their provenance."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    source: str
    checksums: dict[str, str]


def load_mnist(path: Path | None = None, *, expect_full: bool = True) -> Mnist:
    """Load MNIST from an IDX folder, an .npz file, or (path None) Keras' loader."""
    if path is None:
        return _load_keras()
    path = Path(path)
    if path.is_dir():
        return _load_idx_folder(path, expect_full=expect_full)
    if path.is_file():
        return _load_npz(path, expect_full=expect_full)
    raise DataError(f"{path}: no such MNIST folder or .npz file")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_idx_bytes(folder: Path, stem: str) -> tuple[Path, bytes]:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            raw = candidate.read_bytes()
            if candidate.suffix == ".gz":
                try:
                    raw = gzip.decompress(raw)
                except (OSError, EOFError, gzip.BadGzipFile) as exc:
                    raise DataError(f"{candidate}: not a valid gzip file ({exc})") from exc
            return candidate, raw
    raise DataError(f"{folder}: missing {stem}.gz (or {stem})")


def parse_idx(raw: bytes, *, name: str, images: bool) -> np.ndarray:
    """Parse IDX bytes into a uint8 array, checking magic, dimensions and length."""
    want_magic, ndim = (IMAGE_MAGIC, 3) if images else (LABEL_MAGIC, 1)
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise DataError(f"{name}: too short for an IDX header ({len(raw)} bytes)")
    magic = struct.unpack(">i", raw[:4])[0]
    if magic != want_magic:
        kind = "image" if images else "label"
        raise DataError(f"{name}: magic {magic} is not the IDX {kind} magic {want_magic}")
    dims = struct.unpack(f">{ndim}i", raw[4:header_len])
    if images and dims[1:] != (SIDE, SIDE):
        raise DataError(f"{name}: images are {dims[1]}x{dims[2]}, expected {SIDE}x{SIDE}")
    expected = int(np.prod(dims))
    body = len(raw) - header_len
    if body != expected:
        raise DataError(
            f"{name}: truncated or padded, header promises {expected} bytes of data, "
            f"file has {body}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(dims)


def _load_idx_folder(folder: Path, *, expect_full: bool) -> Mnist:
    arrays: dict[str, np.ndarray] = {}
    checksums: dict[str, str] = {}
    for key, stem in IDX_FILES.items():
        file, raw = _read_idx_bytes(folder, stem)
        checksums[file.name] = _sha256(raw)
        arrays[key] = parse_idx(raw, name=str(file), images=key.startswith("x"))
    return _validated(arrays, source=str(folder), checksums=checksums, expect_full=expect_full)


def _load_npz(file: Path, *, expect_full: bool) -> Mnist:
    try:
        with np.load(file, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in IDX_FILES}
    except KeyError as exc:
        raise DataError(f"{file}: .npz lacks array {exc}; expected {sorted(IDX_FILES)}") from exc
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{file}: not a readable .npz file ({exc})") from exc
    checksums = {file.name: _sha256(file.read_bytes())}
    return _validated(arrays, source=str(file), checksums=checksums, expect_full=expect_full)


def _load_keras() -> Mnist:
    try:
        from keras.datasets import mnist  # imported lazily: tensorflow is heavy
    except ImportError as exc:
        raise DataError("no --data given and Keras is not installed (pip install .[train])") from exc
    try:
        (x_train, y_train), (x_test, y_test) = mnist.load_data()
    except Exception as exc:  # network errors come in many types
        raise DataError(f"Keras could not download MNIST ({exc}); pass --data PATH") from exc
    arrays = {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}
    return _validated(arrays, source="keras.datasets.mnist", checksums={}, expect_full=True)


def _validated(
    arrays: dict[str, np.ndarray], *, source: str, checksums: dict[str, str], expect_full: bool
) -> Mnist:
    for split, count in (("train", TRAIN_COUNT), ("test", TEST_COUNT)):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.dtype != np.uint8 or y.dtype != np.uint8:
            raise DataError(f"{source}: {split} arrays are {x.dtype}/{y.dtype}, expected uint8")
        if x.ndim != 3 or x.shape[1:] != (SIDE, SIDE):
            raise DataError(f"{source}: x_{split} has shape {x.shape}, expected (N, {SIDE}, {SIDE})")
        if y.ndim != 1 or len(y) != len(x):
            raise DataError(f"{source}: {len(x)} {split} images but {y.shape} labels")
        if expect_full and len(x) != count:
            raise DataError(f"{source}: {len(x)} {split} images, expected {count}")
        if len(y) and int(y.max()) >= DIGITS:
            raise DataError(f"{source}: y_{split} has label {int(y.max())}, expected 0-{DIGITS - 1}")
    return Mnist(source=source, checksums=checksums, **arrays)


def split_indices(count: int, *, seed: int, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) indices into MNIST's training split. Calibration uses
    the same validation indices (same seed), so it never sees a trained digit."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(count)
    if limit is not None:
        order = order[:limit]
    n_val = min(VALIDATION_SIZE, max(1, len(order) // 10))
    return order[n_val:], order[:n_val]
