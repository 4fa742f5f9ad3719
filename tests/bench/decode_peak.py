"""Peak memory of decoding one scan, per PNG flavour: the figures behind
`imaging._PEAK_BYTES_PER_PIXEL` and `max_decoded_bytes`.

    python -m tests.bench.decode_peak [SIDE] [FLAVOUR ...]

Each file is decoded in a fresh subprocess; reported are the tracemalloc peak
(numpy and OpenCV's output arrays) and the growth of VmHWM (peak RSS, which
also counts libpng's buffers and the allocator), both per pixel.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import tracemalloc
from pathlib import Path

import cv2
import numpy as np

from digitwatch.training import pngwrite

TRNS_BODY = {"gray8": 2, "gray16": 2, "rgb8": 6, "rgb16": 6}


def make(flavour: str, side: int) -> bytes:
    """A dark 7 on light paper; alpha flavours keep ink opaque on transparency;
    "+trns" adds a colour-key tRNS chunk to a gray or RGB flavour."""
    canvas = np.zeros((side, side), np.uint8)
    cv2.putText(canvas, "7", (side // 3, 2 * side // 3), cv2.FONT_HERSHEY_SIMPLEX, side / 80, 255,
                max(2, side // 60))
    ink = canvas > 0
    rgb = np.full((side, side, 3), 0.95, np.float32)
    rgb[ink] = 0.1
    base = flavour.removesuffix("+trns")
    alpha = ink.astype(np.float32) if "alpha" in base or "rgba" in base else None
    data = pngwrite.encode_flavour(rgb, alpha, base)
    if flavour.endswith("+trns"):
        data = data[:33] + pngwrite.chunk(b"tRNS", b"\0" * TRNS_BODY[base]) + data[33:]
    return data


def _status(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{key}:\s+(\d+)", text).group(1)) * 1024


def measure(path: str) -> dict:
    from digitwatch.errors import ImageError
    from digitwatch.reader import imaging

    # Lift the limit being measured for: load_digit takes the default.
    imaging.read_png_header.__kwdefaults__["max_decoded_bytes"] = 10**13
    data = Path(path).read_bytes()
    header = imaging.read_png_header(data, max_pixels=10**10, max_decoded_bytes=10**13)
    before = _status("VmRSS")
    tracemalloc.start()
    try:
        imaging.load_digit(data, max_pixels=10**10)
    except ImageError as exc:  # e.g. no ink: the decode still happened
        print(exc, file=sys.stderr)
    _, traced = tracemalloc.get_traced_memory()
    return dict(pixels=header.width * header.height, traced=traced, rss=_status("VmHWM") - before,
                model=header.peak_decode_bytes())


def main(argv: list[str]) -> None:
    if argv[:1] == ["--measure"]:
        print(json.dumps(measure(argv[1])))
        return
    side = int(argv[0]) if argv else 3000
    flavours = argv[1:] or [*pngwrite.FLAVOURS, "gray8+trns", "gray16+trns", "rgb8+trns", "rgb16+trns"]
    print(f"{'flavour':16s} {'traced B/px':>11s} {'RSS B/px':>9s} {'model B/px':>10s}   ({side}x{side})")
    with tempfile.TemporaryDirectory() as tmp:
        for flavour in flavours:
            path = Path(tmp) / f"{flavour}.png"
            path.write_bytes(make(flavour, side))
            out = subprocess.run([sys.executable, "-m", "tests.bench.decode_peak", "--measure", str(path)],
                                 capture_output=True, text=True, check=True)
            r = json.loads(out.stdout)
            px = r["pixels"]
            print(f"{flavour:16s} {r['traced'] / px:11.1f} {r['rss'] / px:9.1f} {r['model'] / px:10.1f}")


if __name__ == "__main__":
    main(sys.argv[1:])
