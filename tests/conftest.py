"""Shared fixtures: where MNIST and the shipped model are, and helpers to run the CLI."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
SCAN_FIXTURES = Path(__file__).parent / "fixtures" / "scans"


def _find_mnist() -> Path:
    """DIGITWATCH_MNIST, else a shared/datasets/mnist beside or above the checkout."""
    if "DIGITWATCH_MNIST" in os.environ:
        return Path(os.environ["DIGITWATCH_MNIST"])
    for parent in ROOT.parents:
        candidate = parent / "shared" / "datasets" / "mnist"
        if candidate.is_dir():
            return candidate
    return ROOT.parent / "shared" / "datasets" / "mnist"


MNIST_DIR = _find_mnist()


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    if not (MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"MNIST not found at {MNIST_DIR} (set DIGITWATCH_MNIST to its folder)")
    return MNIST_DIR


@pytest.fixture(scope="session")
def mnist(mnist_dir):
    from digitwatch.training.data import load_mnist

    return load_mnist(mnist_dir)


@pytest.fixture(scope="session")
def shipped_tflite() -> Path:
    return MODELS / "digits.tflite"


@pytest.fixture(scope="session")
def classifier(shipped_tflite):
    from digitwatch.reader.model import load_classifier

    # As the product loads it by default: the pair card.
    return load_classifier()


def label_of(path: Path) -> int:
    """Fixture names end in -<label>.png."""
    return int(path.stem.rsplit("-", 1)[1])


def run_cli(*args: str, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    """Run the real console entry point in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "digitwatch.cli", *args],
        capture_output=True, text=True, timeout=timeout, cwd=kwargs.pop("cwd", ROOT), **kwargs,
    )


@contextlib.contextmanager
def disk_fills_half_way(monkeypatch):
    """Every Path.write_text writes half its text, then fails as a full disk
    (or a power cut mid-write) would; undone on leaving."""
    real = Path.write_text

    def half_then_full(self, data, *args, **kwargs):
        real(self, data[: len(data) // 2], *args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", half_then_full)
    try:
        yield
    finally:
        monkeypatch.undo()


def classify_pngs(classifier, pngs: list[bytes], low_confidence: float | None = None) -> list:
    """PNG bytes through the product's path (prepare_bytes, classify_batch);
    `low_confidence` None: the card's thresholds, as classify reads."""
    from digitwatch.reader.prepare import classify_batch, prepare_bytes

    items = [prepare_bytes(f"{i}.png", png, 0.0, max_pixels=40_000_000) for i, png in enumerate(pngs)]
    return classify_batch(classifier, items, low_confidence=low_confidence)
