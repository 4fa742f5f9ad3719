"""MNIST loading from IDX folders and .npz files, and its errors."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from digitwatch.errors import DataError
from digitwatch.training.data import IDX_FILES, load_mnist, parse_idx


def idx_images(images: np.ndarray) -> bytes:
    n, h, w = images.shape
    return struct.pack(">iiii", 2051, n, h, w) + images.astype(np.uint8).tobytes()


def idx_labels(labels: np.ndarray) -> bytes:
    return struct.pack(">ii", 2049, len(labels)) + labels.astype(np.uint8).tobytes()


def tiny_mnist(rng, n_train=50, n_test=20):
    return {
        "x_train": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "y_train": rng.integers(0, 10, n_train, dtype=np.uint8),
        "x_test": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "y_test": rng.integers(0, 10, n_test, dtype=np.uint8),
    }


def write_idx_folder(folder: Path, arrays: dict, *, gz: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for key, stem in IDX_FILES.items():
        raw = idx_images(arrays[key]) if key.startswith("x") else idx_labels(arrays[key])
        if gz:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(raw))
        else:
            (folder / stem).write_bytes(raw)


class TestLoading:
    """Every supported layout gives the same arrays."""

    @pytest.mark.parametrize("gz", [True, False])
    def test_idx_folder_roundtrip(self, tmp_path, gz):
        arrays = tiny_mnist(np.random.default_rng(0))
        write_idx_folder(tmp_path / "m", arrays, gz=gz)
        m = load_mnist(tmp_path / "m", expect_full=False)
        for key, value in arrays.items():
            np.testing.assert_array_equal(getattr(m, key), value)
        assert len(m.checksums) == 4

    def test_npz_roundtrip(self, tmp_path):
        arrays = tiny_mnist(np.random.default_rng(1))
        np.savez(tmp_path / "mnist.npz", **arrays)
        m = load_mnist(tmp_path / "mnist.npz", expect_full=False)
        np.testing.assert_array_equal(m.x_test, arrays["x_test"])
        np.testing.assert_array_equal(m.y_train, arrays["y_train"])

    def test_real_mnist_matches_published_checksums(self, mnist):
        assert mnist.x_train.shape == (60000, 28, 28)
        assert mnist.x_test.shape == (10000, 28, 28)
        assert mnist.checksums["t10k-labels-idx1-ubyte.gz"].startswith("ff7bcfd4")
        assert np.bincount(mnist.y_train).tolist()[:3] == [5923, 6742, 5958]


class TestErrors:
    """A wrong or truncated file is a DataError naming the file."""

    def test_truncated_gz_names_file(self, tmp_path):
        arrays = tiny_mnist(np.random.default_rng(2))
        write_idx_folder(tmp_path, arrays, gz=True)
        f = tmp_path / "t10k-images-idx3-ubyte.gz"
        f.write_bytes(f.read_bytes()[:-40])
        with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz"):
            load_mnist(tmp_path, expect_full=False)

    def test_truncated_raw_data(self, tmp_path):
        arrays = tiny_mnist(np.random.default_rng(3))
        write_idx_folder(tmp_path, arrays, gz=False)
        f = tmp_path / "train-images-idx3-ubyte"
        f.write_bytes(f.read_bytes()[:-100])
        with pytest.raises(DataError, match=r"train-images-idx3-ubyte: truncated"):
            load_mnist(tmp_path, expect_full=False)

    def test_missing_file(self, tmp_path):
        write_idx_folder(tmp_path, tiny_mnist(np.random.default_rng(4)), gz=True)
        (tmp_path / "train-labels-idx1-ubyte.gz").unlink()
        with pytest.raises(DataError, match="missing train-labels-idx1-ubyte"):
            load_mnist(tmp_path, expect_full=False)

    def test_wrong_magic(self):
        raw = struct.pack(">iiii", 2049, 1, 28, 28) + bytes(784)
        with pytest.raises(DataError, match="magic 2049"):
            parse_idx(raw, name="x", images=True)

    def test_wrong_image_size(self):
        raw = struct.pack(">iiii", 2051, 1, 32, 32) + bytes(1024)
        with pytest.raises(DataError, match="32x32"):
            parse_idx(raw, name="x", images=True)

    def test_label_out_of_range(self, tmp_path):
        arrays = tiny_mnist(np.random.default_rng(5))
        arrays["y_test"][3] = 12
        write_idx_folder(tmp_path, arrays, gz=True)
        with pytest.raises(DataError, match="label 12"):
            load_mnist(tmp_path, expect_full=False)

    def test_counts_must_match_full_mnist(self, tmp_path):
        write_idx_folder(tmp_path, tiny_mnist(np.random.default_rng(6)), gz=True)
        with pytest.raises(DataError, match="expected 60000"):
            load_mnist(tmp_path)

    def test_labels_images_mismatch(self, tmp_path):
        arrays = tiny_mnist(np.random.default_rng(7))
        arrays["y_train"] = arrays["y_train"][:-1]
        write_idx_folder(tmp_path, arrays, gz=True)
        with pytest.raises(DataError, match="50 train images"):
            load_mnist(tmp_path, expect_full=False)

    def test_npz_missing_array(self, tmp_path):
        np.savez(tmp_path / "m.npz", x_train=np.zeros((1, 28, 28), np.uint8))
        with pytest.raises(DataError, match="lacks array"):
            load_mnist(tmp_path / "m.npz", expect_full=False)

    def test_not_an_npz(self, tmp_path):
        (tmp_path / "m.npz").write_text("hello")
        with pytest.raises(DataError, match="not a readable .npz"):
            load_mnist(tmp_path / "m.npz")

    def test_no_such_path(self, tmp_path):
        with pytest.raises(DataError, match="no such MNIST"):
            load_mnist(tmp_path / "nope")
