"""Decoded size, not pixel count, bounds memory: a PNG whose decode would take
more than max_decoded_bytes is refused from its header, before any pixel is
decoded; the per-flavour peak model stays above what decoding really takes."""

from __future__ import annotations

import tracemalloc
import zlib

import cv2
import numpy as np
import pytest

from digitwatch.errors import ImageTooLargeError
from digitwatch.reader import imaging
from digitwatch.training import pngwrite
from tests.daemon_harness import DaemonProc, drop

CHANNELS = {pngwrite.GRAY: 1, pngwrite.RGB: 3, pngwrite.PALETTE: 1, pngwrite.GRAY_ALPHA: 2, pngwrite.RGBA: 4}


def flat_png(width: int, height: int, bit_depth: int, color_type: int, *, trns: bool = False) -> bytes:
    """A real, valid PNG of one flat colour, compressed row by row so a huge
    image is small on disk (6300x6300 RGBA 16-bit: ~0.3 MB) and cheap to make."""
    row = b"\x00" + b"\xf0" * (width * CHANNELS[color_type] * bit_depth // 8)
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    out = b"\x89PNG\r\n\x1a\n" + pngwrite.ihdr(width, height, bit_depth, color_type)
    if color_type == pngwrite.PALETTE:
        out += pngwrite.chunk(b"PLTE", bytes(range(256)) * 3)
    if trns:
        out += pngwrite.chunk(b"tRNS", {0: b"\0\0", 2: b"\0" * 6, 3: b"\xff" * 256}[color_type])
    return out + pngwrite.chunk(b"IDAT", idat) + pngwrite.chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def huge_rgba16() -> bytes:
    return flat_png(6300, 6300, 16, pngwrite.RGBA)


def test_6300_rgba16_refused_before_decoding(huge_rgba16):
    # 39.7 Mpx: under max_pixels, yet decoding it peaked at 1.67 GB.
    assert imaging.DEFAULT_MAX_PIXELS > 6300 * 6300
    assert len(huge_rgba16) < 2_000_000
    tracemalloc.start()
    try:
        with pytest.raises(ImageTooLargeError) as err:
            imaging.load_digit(huge_rgba16)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert str(err.value) == (
        "refused: decoding 6300x6300 RGBA 16-bit needs 1.6 GB, over the limit of 200 MB "
        "(max_decoded_bytes); refused before decoding"
    )
    assert "\n" not in str(err.value)
    assert peak < 20_000_000, f"refusal allocated {peak / 1e6:.0f} MB: something was decoded"


@pytest.mark.parametrize(
    ("color_type", "depth", "trns", "channels"),
    [(0, 8, False, 1), (0, 16, True, 1), (2, 8, False, 3), (2, 8, True, 4), (3, 4, False, 3),
     (3, 8, True, 4), (4, 8, False, 4), (6, 16, False, 4)],
)
def test_decoded_channels_match_opencv(color_type, depth, trns, channels):
    data = flat_png(16, 8, depth, color_type, trns=trns)
    header = imaging.read_png_header(data)
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    got = 1 if image.ndim == 2 else image.shape[2]
    assert header.decoded_channels() == channels == got
    assert (header.bit_depth == 16) == (image.dtype == np.uint16)


def test_limit_is_by_bytes_not_pixels():
    gray = imaging.read_png_header(flat_png(1000, 1000, 8, pngwrite.GRAY), max_decoded_bytes=3_000_000)
    assert gray.peak_decode_bytes() == 2_500_000
    with pytest.raises(ImageTooLargeError, match=r"decoding 1000x1000 RGBA 8-bit needs 37 MB, over the limit of 3 MB"):
        imaging.read_png_header(flat_png(1000, 1000, 8, pngwrite.RGBA), max_decoded_bytes=3_000_000)
    with pytest.raises(ImageTooLargeError, match=r"1000x1000 palette\+transparency 8-bit"):
        imaging.read_png_header(flat_png(1000, 1000, 8, pngwrite.PALETTE, trns=True), max_decoded_bytes=3_000_000)


@pytest.mark.parametrize("flavour", pngwrite.FLAVOURS)
def test_model_covers_the_real_decode_peak(flavour):
    """The table behind the limit must not go stale: for every flavour the
    estimate is at least what load_digit really allocates (tracemalloc sees numpy
    and OpenCV's output arrays; the table adds libpng's and the allocator's share)."""
    side = 800
    rng = np.random.default_rng(1)
    canvas = np.zeros((side, side), np.uint8)
    cv2.putText(canvas, "7", (250, 600), cv2.FONT_HERSHEY_SIMPLEX, 15, 255, 30)
    ink = canvas > 0
    rgb = np.full((side, side, 3), 0.95, np.float32)
    rgb[ink] = 0.1
    alpha = ink.astype(np.float32) if "alpha" in flavour or "rgba" in flavour else None
    rgb += rng.normal(0, 0.01, rgb.shape).astype(np.float32)
    data = pngwrite.encode_flavour(np.clip(rgb, 0, 1), alpha, flavour)
    header = imaging.read_png_header(data)
    tracemalloc.start()
    try:
        imaging.load_digit(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= header.peak_decode_bytes(), (flavour, peak, header.peak_decode_bytes())
    assert peak >= 0.5 * header.peak_decode_bytes() - 1_000_000, "model far above the real peak"


@pytest.mark.system
def test_daemon_reports_the_refusal(tmp_path, huge_rgba16):
    d = DaemonProc(tmp_path).start()
    try:
        drop(d.inbox, "huge.png", huge_rgba16)
        (row,) = d.wait_lines(1, timeout=60)
    finally:
        assert d.terminate() == 0
    assert row["status"] == "error"
    assert row["error"].startswith("refused: decoding 6300x6300 RGBA 16-bit needs 1.6 GB")
    assert (d.failed / row["moved_to"].split("/failed/")[1]).read_bytes() == huge_rgba16
