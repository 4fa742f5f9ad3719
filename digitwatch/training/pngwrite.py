"""A small PNG encoder for tests: every colour type, 8 or 16 bit, palettes with
transparency, and Adam7 interlacing, which OpenCV's writer cannot produce.
Writing the container by hand also lets the tests build precisely broken files.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

GRAY, RGB, PALETTE, GRAY_ALPHA, RGBA = 0, 2, 3, 4, 6
CHANNELS = {GRAY: 1, RGB: 3, PALETTE: 1, GRAY_ALPHA: 2, RGBA: 4}
# Adam7 passes: (row start, column start, row step, column step)
ADAM7 = [(0, 0, 8, 8), (0, 4, 8, 8), (4, 0, 8, 4), (0, 2, 4, 4), (2, 0, 4, 2), (0, 1, 2, 2), (1, 0, 2, 1)]


def chunk(kind: bytes, body: bytes) -> bytes:
    """One PNG chunk with its length and CRC."""
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def ihdr(width: int, height: int, bit_depth: int, color_type: int, interlace: bool = False) -> bytes:
    body = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, int(interlace))
    return chunk(b"IHDR", body)


def _scanlines(pixels: np.ndarray, bit_depth: int) -> bytes:
    dtype = ">u2" if bit_depth == 16 else np.uint8
    rows = pixels.astype(dtype).reshape(pixels.shape[0], -1)
    filtered = np.zeros((rows.shape[0], rows.shape[1] * rows.itemsize + 1), np.uint8)
    filtered[:, 1:] = np.frombuffer(rows.tobytes(), np.uint8).reshape(rows.shape[0], -1)
    return filtered.tobytes()  # filter type 0 on every row


def encode(
    pixels: np.ndarray,
    color_type: int,
    *,
    bit_depth: int = 8,
    interlace: bool = False,
    palette: np.ndarray | None = None,
    alpha: np.ndarray | None = None,
) -> bytes:
    """pixels: (H, W) or (H, W, C) integers in the channel order PNG uses (RGB[A])."""
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    height, width, channels = pixels.shape
    assert channels == CHANNELS[color_type], (channels, color_type)
    if interlace:
        raw = b""
        for r0, c0, dr, dc in ADAM7:
            sub = pixels[r0::dr, c0::dc]
            if sub.size:
                raw += _scanlines(sub, bit_depth)
    else:
        raw = _scanlines(pixels, bit_depth)
    out = b"\x89PNG\r\n\x1a\n" + ihdr(width, height, bit_depth, color_type, interlace)
    if color_type == PALETTE:
        assert palette is not None
        out += chunk(b"PLTE", palette.astype(np.uint8).tobytes())
        if alpha is not None:
            out += chunk(b"tRNS", alpha.astype(np.uint8).tobytes())
    out += chunk(b"IDAT", zlib.compress(raw, 6))
    return out + chunk(b"IEND", b"")


FLAVOURS = [
    "gray8",
    "gray16",
    "gray_alpha8",
    "gray_alpha16",
    "rgb8",
    "rgb16",
    "rgba8",
    "rgba16",
    "palette",
    "palette_alpha",
    "interlaced_gray8",
    "interlaced_rgb8",
]


def encode_flavour(rgb: np.ndarray, alpha: np.ndarray | None, flavour: str) -> bytes:
    """rgb: float (H, W, 3) in [0, 1]; alpha: float (H, W) or None (opaque).

    Flavours without an alpha channel get the image composited onto white,
    as a user's export would; flavours with one keep the transparency.
    """
    if alpha is None:
        alpha = np.ones(rgb.shape[:2], np.float32)
    flat = rgb * alpha[..., None] + (1.0 - alpha[..., None])
    gray = flat @ np.array([0.299, 0.587, 0.114], np.float32)
    gray_t = rgb @ np.array([0.299, 0.587, 0.114], np.float32)

    def q(x: np.ndarray, depth: int) -> np.ndarray:
        top = 65535 if depth == 16 else 255
        return np.clip(np.rint(x * top), 0, top)

    interlace = flavour.startswith("interlaced_")
    base = flavour.removeprefix("interlaced_")
    if base in ("gray8", "gray16"):
        depth = int(base[4:])
        return encode(q(gray, depth), GRAY, bit_depth=depth, interlace=interlace)
    if base in ("gray_alpha8", "gray_alpha16"):
        depth = int(base[10:])
        px = np.stack([q(gray_t, depth), q(alpha, depth)], -1)
        return encode(px, GRAY_ALPHA, bit_depth=depth, interlace=interlace)
    if base in ("rgb8", "rgb16"):
        depth = int(base[3:])
        return encode(q(flat, depth), RGB, bit_depth=depth, interlace=interlace)
    if base in ("rgba8", "rgba16"):
        depth = int(base[4:])
        px = np.concatenate([q(rgb, depth), q(alpha, depth)[..., None]], -1)
        return encode(px, RGBA, bit_depth=depth, interlace=interlace)
    if base == "palette":
        levels = q(gray, 8).astype(np.uint8)
        palette = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, 1)
        return encode(levels, PALETTE, palette=palette, interlace=interlace)
    if base == "palette_alpha":
        # 16 gray levels x 16 alpha levels, as a quantizing exporter would make.
        g = np.clip(np.rint(gray_t * 15), 0, 15).astype(np.uint8)
        a = np.clip(np.rint(alpha * 15), 0, 15).astype(np.uint8)
        index = g * 16 + a
        levels = (np.arange(256) // 16) * 17
        palette = np.repeat(levels[:, None], 3, 1)
        trns = (np.arange(256) % 16) * 17
        return encode(index, PALETTE, palette=palette, alpha=trns, interlace=interlace)
    raise ValueError(flavour)
