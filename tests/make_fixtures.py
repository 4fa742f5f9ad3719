"""Regenerate the committed scan fixtures: `python -m tests.make_fixtures`.

Names are `<source>-<variation>-<flavour>-<label>.png`, so tests read the true
label from the name. Pages are kept small so the fixtures stay under a few MB.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from digitwatch.training import pngwrite, scans
from digitwatch.training.data import load_mnist

HERE = Path(__file__).parent / "fixtures" / "scans"
MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "mnist"


def main() -> None:
    rng = np.random.default_rng(20261124)
    mnist = load_mnist(MNIST)
    if HERE.exists():
        shutil.rmtree(HERE)
    HERE.mkdir(parents=True)
    # Digits from the far end of the test set, one per variation and flavour.
    picks = rng.choice(np.arange(5000, 10000), size=len(scans.VARIATIONS) * 2, replace=False)
    written = []
    for i, k in enumerate(picks):
        variation = scans.VARIATIONS[i % len(scans.VARIATIONS)]
        flavour = pngwrite.FLAVOURS[i % len(pngwrite.FLAVOURS)]
        scan = scans.make_scan(
            lambda h, im=mnist.x_test[k]: scans.ink_from_mnist(im, min(h, 90)),
            int(mnist.y_test[k]), variation, flavour, rng, "mnist",
        )
        written.append(scan)
    for source in ("strokes", "font"):
        for scan in scans.other_scans(14, source, rng):
            written.append(scan)
    for i, scan in enumerate(written):
        name = f"{scan.source}-{scan.variation}-{scan.flavour}-{i:02d}-{scan.label}.png"
        (HERE / name).write_bytes(scan.png)
    total = sum(p.stat().st_size for p in HERE.iterdir())
    print(f"wrote {len(written)} fixtures, {total / 1e6:.2f} MB, to {HERE}")


if __name__ == "__main__":
    main()
