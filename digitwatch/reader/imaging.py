"""Any scan in, one MNIST-normalized digit out. Pure functions over bytes and arrays.

The path is: check the PNG container (refusing bombs from the header alone),
decode, composite transparency onto white, turn ink dark-on-light, flatten
uneven lighting and paper tone, find the digit among noise, specks and ruled
lines, then apply MNIST's own normalization (LeCun, Cortes, Burges): crop to
the digit, scale its longer side to 20 px keeping aspect ratio with
anti-aliasing, and centre it in 28x28 by its centre of mass.

Finding the digit runs twice with the same code: once on a reduced copy of the
whole page (cheap, finds where the digit is), then on a crop around it
resampled so the digit is WORK_SIDE pixels tall (accurate, independent of how
large the page or the digit was).

Cost matters: the daemon runs this for every file, and decoding the PNG is the
floor (~1.2 ms for a 100 KB scan here). The full page is touched only by the
decoder and by a Gaussian pyramid; everything else works on arrays of about
25,000 pixels, where numpy's per-call overhead rivals the arithmetic, hence
partial sorts instead of np.median, cv2.boundingRect instead of np.nonzero.
"""

from __future__ import annotations

import struct
import zlib
from collections import deque
from dataclasses import dataclass

import cv2
import numpy as np

from digitwatch.errors import CorruptImageError, EmptyFileError, ImageTooLargeError, NoInkError, NotPNGError
from digitwatch.reader.contract import PAIR_WIDTH, SIDE

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DEFAULT_MAX_PIXELS = 40_000_000  # a 600 dpi A4 scan is 35 Mpx
# Peak memory one decode may take (README, "Memory"). The unit's MemoryMax is
# 512 MiB: two workers at this peak plus the daemon's ~120 MB stay under it.
DEFAULT_MAX_DECODED_BYTES = 200_000_000
# Peak bytes per pixel of load_digit, by the image OpenCV decodes to (channels,
# 16-bit?): the decoded array plus the float32 copies to_gray makes. Measured
# as VmHWM growth over 3000x3000 files of every flavour (8-bit gray 2.3, 16-bit
# gray 6.3, 8-bit RGB 6.3, 16-bit RGB 22.5, 8-bit 4-channel 36.5, 16-bit
# 4-channel 40.5), rounded up.
_PEAK_BYTES_PER_PIXEL = {(1, False): 2.5, (1, True): 6.5, (3, False): 6.5, (3, True): 23.0,
                         (4, False): 37.0, (4, True): 41.0}
_COLOR_NAMES = {0: "gray", 2: "RGB", 3: "palette", 4: "gray+alpha", 6: "RGBA"}
# What this module produces is the model input `digitwatch.reader.contract` states
# (SIDE x SIDE float32 in [0, 1], ink high); MNIST's normalization puts the
# digit's longer side at BOX and its centre of mass at COM_CENTRE.
BOX = 20  # MNIST: the digit's longer side, before centring in 28x28
COM_CENTRE = 14.0  # where MNIST's centres of mass sit (measured: 13.99, 14.00)
COARSE_SIDE = 160  # the whole page is searched at most this large (in area, squared) first
COARSE_RETRIES = 2  # then up to this many finer levels (2x, 4x) if nothing was found
WORK_SIDE = 80  # the digit's longer side while it is cleaned (4x MNIST's box)
WALL_SLENDER = 6  # a box's wall between ruled lines is this many times longer than thick
WALL_SOLID = 0.5  # ... and fills this much of its own box (a faint 1 px wall fills 0.67)
SMALL_PAGE = 64  # pages smaller than this on their longer side are enlarged to it first
MNIST_STROKE = 2.4  # median stroke width of MNIST digits at 20 px, measured
MIN_CONTRAST = 0.08  # weaker than this against the paper is not ink
NOISE_SPLIT = 3.0  # see _noise_sigma
ROW_MATE = 0.45  # a blob this fraction of the digit's height beside it is another digit
ROW_GAP = 1.5  # ... when no further sideways than this many digit heights
FRAME_TALL = 1.3  # a blob spanning the page is a frame only when this much taller than the digit
FRAME_SPAN = 0.9  # a blob hugging an edge and spanning this share of the page is a frame or a shadow
# Ruled lines removed before segmenting: ink runs `span` of the image long and
# `slenderness` times longer than thick. Pass 1 sees the whole page coarsely,
# pass 2 the crop around the digit, where lines are shorter but relatively thicker.
PAGE_LINES = (0.7, 25.0)
CROP_LINES = (0.8, 12.0)
FRAME_STRIP = 0.25  # ... or narrower than this for its length (a frame's side, a shadow band)
FRAME_SOLID = 0.6  # ... or filling this much of its box (a shadow; strokes fill far less)
FRAME_BAND = 0.1  # ... or, spanning both ways, with FRAME_ALONG of its ink this near its box's edges
FRAME_ALONG = 0.8
WIDE = 1.25  # ink wider than this many heights is cropped by its height, not its width
MAX_WORK_PIXELS = 400_000  # the cleaned crop of a long number stays about this small


@dataclass(frozen=True)
class PngHeader:
    """What IHDR says, read without decoding any pixels."""

    width: int
    height: int
    bit_depth: int
    color_type: int
    interlaced: bool
    transparency: bool = False  # a tRNS chunk: OpenCV then decodes palette and RGB with alpha

    def decoded_channels(self) -> int:
        """Channels of the array OpenCV's IMREAD_UNCHANGED gives: gray stays one
        (tRNS or not), gray+alpha becomes BGRA, palette becomes BGR (BGRA with tRNS)."""
        if self.color_type == 0:
            return 1
        if self.color_type in (2, 3):
            return 4 if self.transparency else 3
        return 4

    def peak_decode_bytes(self) -> int:
        """Peak memory `load_digit` needs for this image (see _PEAK_BYTES_PER_PIXEL)."""
        per_pixel = _PEAK_BYTES_PER_PIXEL[(self.decoded_channels(), self.bit_depth == 16)]
        return int(self.width * self.height * per_pixel)

    def describe(self) -> str:
        """e.g. "6300x6300 RGBA 16-bit"."""
        kind = _COLOR_NAMES.get(self.color_type, f"color type {self.color_type}")
        if self.color_type == 3 and self.transparency:
            kind += "+transparency"
        depth = "8-bit" if self.color_type == 3 else f"{self.bit_depth}-bit"
        return f"{self.width}x{self.height} {kind} {depth}"


@dataclass(frozen=True)
class Digit:
    """A normalized digit ready for the classifier, plus facts about its source."""

    pixels: np.ndarray  # float32 (28, 28) in [0, 1], ink high
    width: int
    height: int


# ---------------------------------------------------------------- container


def _describe_magic(data: bytes) -> str:
    known = {
        b"\xff\xd8\xff": "a JPEG",
        b"GIF8": "a GIF",
        b"BM": "a BMP",
        b"%PDF": "a PDF",
        b"II*\x00": "a TIFF",
        b"MM\x00*": "a TIFF",
        b"RIFF": "a RIFF/WebP",
    }
    for magic, name in known.items():
        if data.startswith(magic):
            return f"{name} file"
    if all(32 <= b < 127 or b in b"\r\n\t" for b in data[:64]):
        return "a text file"
    return "not an image"


def read_png_header(
    data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES,
) -> PngHeader:
    """Validate the PNG container (signature, chunk lengths, CRCs, IEND) and size.

    Walking the chunks costs one CRC pass over the file and turns truncated or
    corrupted files into precise messages before the decoder sees them. Size is
    bounded twice: by pixel count, and by the memory decoding would take (a
    16-bit RGBA page takes 16x what an 8-bit gray one of the same size does),
    so a file that would get the daemon OOM-killed is refused instead.
    """
    if not data:
        raise EmptyFileError("empty file (0 bytes)")
    if not data.startswith(PNG_SIGNATURE):
        raise NotPNGError(f"not a PNG: {_describe_magic(data)}")
    if len(data) < 33 or data[12:16] != b"IHDR":
        raise CorruptImageError("corrupt PNG: no IHDR header chunk")
    width, height, bit_depth, color_type, _, _, interlace = struct.unpack(">IIBBBBB", data[16:29])
    if width == 0 or height == 0 or width > 2**31 - 1 or height > 2**31 - 1:
        raise CorruptImageError(f"corrupt PNG: impossible size {width}x{height}")
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"image is {width}x{height} = {width * height / 1e6:.1f} Mpx, over the "
            f"limit of {max_pixels / 1e6:.1f} Mpx (max_pixels); refused before decoding"
        )
    pos, seen_idat, transparency = 8, False, False
    while True:
        if pos + 8 > len(data):
            raise CorruptImageError(f"truncated PNG: ends at byte {len(data)} with no IEND chunk")
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        end = pos + 12 + length
        if end > len(data):
            name = kind.decode("latin-1")
            raise CorruptImageError(
                f"truncated PNG: {name} chunk at byte {pos} needs {length} bytes, "
                f"file ends at byte {len(data)}"
            )
        crc = struct.unpack(">I", data[end - 4 : end])[0]
        if zlib.crc32(data[pos + 4 : end - 4]) != crc:
            name = kind.decode("latin-1")
            raise CorruptImageError(f"corrupt PNG: bad checksum in {name} chunk at byte {pos}")
        seen_idat |= kind == b"IDAT"
        transparency |= kind == b"tRNS"
        if kind == b"IEND":
            break
        pos = end
    if not seen_idat:
        raise CorruptImageError("corrupt PNG: no image data (IDAT) chunk")
    if color_type not in _COLOR_NAMES:
        raise CorruptImageError(f"corrupt PNG: unknown color type {color_type}")
    header = PngHeader(width, height, bit_depth, color_type, bool(interlace), transparency)
    if (need := header.peak_decode_bytes()) > max_decoded_bytes:
        raise ImageTooLargeError(
            f"refused: decoding {header.describe()} needs {_size(need)}, over the limit of "
            f"{_size(max_decoded_bytes)} (max_decoded_bytes); refused before decoding"
        )
    return header


def _size(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def decode_gray(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """PNG bytes -> gray (H, W), transparency composited onto white: uint8 for
    8-bit files without alpha (most scans; no full-page float copy is made),
    float32 in [0, 1] otherwise. `normalize` takes either."""
    header = read_png_header(data, max_pixels=max_pixels)
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None or image.shape[0] != header.height or image.shape[1] != header.width:
        raise CorruptImageError("corrupt PNG: image data does not decode")
    if image.dtype == np.uint8 and image.ndim == 2:
        return image
    if image.dtype == np.uint8 and image.shape[2] == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    return to_gray(image)


def decode_png(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """PNG bytes -> float32 gray (H, W) in [0, 1], transparency composited onto white."""
    return _unit(decode_gray(data, max_pixels=max_pixels))


def _unit(gray: np.ndarray) -> np.ndarray:
    """uint8 or float gray -> float32 in [0, 1]."""
    if gray.dtype == np.uint8:
        return gray.astype(np.float32) * np.float32(1.0 / 255.0)
    return gray.astype(np.float32, copy=False)


def to_gray(image: np.ndarray) -> np.ndarray:
    """Any OpenCV image (gray, BGR, BGRA; 8 or 16 bit) -> float32 gray on white."""
    scale = 65535.0 if image.dtype == np.uint16 else 255.0
    img = image.astype(np.float32) * np.float32(1.0 / scale)
    if img.ndim == 2:
        return img
    if img.shape[2] == 1:
        return img[:, :, 0]
    gray = cv2.cvtColor(img[:, :, :3], cv2.COLOR_BGR2GRAY)
    if img.shape[2] == 4:
        # Drawing apps export ink on transparency: what is see-through is paper.
        alpha = img[:, :, 3]
        gray = gray * alpha + (1.0 - alpha)
    return gray


def pyramid(gray: np.ndarray, side: int, levels: int) -> list[tuple[np.ndarray, int]]:
    """The page halved until it is at most `side` squared in area: the last `levels` steps,
    coarsest first, each with the factor k it was reduced by (coarse pixel (y, x)
    sits at page (y*k, x*k)). Gaussian pyramid steps: anti-aliased and, with
    SIMD, half the cost of one INTER_AREA resize to the same size."""
    kept: deque[tuple[np.ndarray, int]] = deque([(gray, 1)], maxlen=levels)
    k = 1
    # By area, not the longer side: a long strip (a number on a form line)
    # keeps enough rows for its digits to stay digits.
    while gray.shape[0] * gray.shape[1] > side * side and min(gray.shape) >= 2:
        gray = cv2.pyrDown(gray)
        k *= 2
        kept.append((gray, k))
    return list(reversed(kept))


# ---------------------------------------------------------------- page -> ink


def _quantile(values: np.ndarray, q: float) -> float:
    """The q-quantile (nearest rank) of a 1-D array by partial sort: np.median and
    np.percentile cost several times more on the small arrays used here."""
    i = min(values.size - 1, int(q * (values.size - 1) + 0.5))
    return float(np.partition(values, i)[i])


def _border(gray: np.ndarray) -> np.ndarray:
    h, w = gray.shape
    k = max(1, min(h, w) // 32)
    return np.concatenate([gray[:k].ravel(), gray[-k:].ravel(), gray[:, :k].ravel(), gray[:, -k:].ravel()])


# A page with a dark border is light paper in a frame when at least this share
# of its inside is light (see ink_is_light).
LIGHT_INSIDE = 0.75


def ink_is_light(gray: np.ndarray) -> bool:
    """Screens and chalkboards show light ink on dark paper.

    The paper is what the border shows; the ink is whichever extreme lies
    further from it. Extremes are read off a shrunken copy so noise cancels,
    and not off percentiles, because a thin digit can be under 1% of a page.
    Both tests matter: noise alone has extremes on both sides, and light
    paper is never "ink".
    """
    h, w = gray.shape
    f = min(1.0, 256 / max(h, w))
    small = gray if f == 1.0 else cv2.resize(
        gray, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA
    )
    paper = _quantile(_border(small), 0.5)
    if paper < 0.5:
        # A dark border round a light page is a frame, a scanner's lid or a
        # copier's edge, not dark paper: the inside of such a page is mostly
        # light paper. (Taken for dark paper, such a page was read inverted:
        # the paper became one solid blob, read "0".) Mostly, not half: a bold
        # light digit cropped tight (a postal scan, white on black) fills half
        # its page's inside, and a median test read 10% of those inverted.
        sh, sw = small.shape
        inside = small[sh // 8 : sh - sh // 8, sw // 8 : sw - sw // 8]
        if inside.size and _quantile(inside.ravel(), 1.0 - LIGHT_INSIDE) >= 0.5:
            return False
    lighter = float(small.max()) - paper
    darker = paper - float(small.min())
    return lighter > darker and paper < 0.5


def _poly_terms(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.stack([np.ones_like(u), u, v, u * u, u * v, v * v, u**3, u * u * v, u * v * v, v**3], -1)


@dataclass(frozen=True)
class Paper:
    """The page's brightness as a smooth cubic surface in page coordinates (0..1)."""

    coef: np.ndarray  # of the _poly_terms, in their order

    def over(self, shape: tuple[int, int], box: tuple[float, float, float, float]) -> np.ndarray:
        """Evaluate over an (h, w) grid covering page box (u0, v0, u1, v1).

        The surface is smooth, so it is computed on a coarse grid and resized.
        On a grid a cubic is separable: [1 v v2 v3] C [1 u u2 u3]^T, two tiny
        matrix products."""
        h, w = shape
        u0, v0, u1, v1 = box
        gh, gw = min(h, 24), min(w, 24)
        powers = np.arange(4)
        up = np.linspace(u0, u1, gw)[:, None] ** powers
        vp = np.linspace(v0, v1, gh)[:, None] ** powers
        c = self.coef
        # C[a, b] multiplies u**a * v**b.
        cm = np.array([[c[0], c[2], c[5], c[9]],
                       [c[1], c[4], c[8], 0.0],
                       [c[3], c[7], 0.0, 0.0],
                       [c[6], 0.0, 0.0, 0.0]])
        grid = np.maximum(vp @ cm.T @ up.T, 0.2).astype(np.float32)
        if (gh, gw) == (h, w):
            return grid
        return cv2.resize(grid, (w, h), interpolation=cv2.INTER_LINEAR)


PAPER_CELLS = 24
_PAPER_UV = (np.arange(PAPER_CELLS, dtype=np.float64) + 0.5) / PAPER_CELLS
_PAPER_TERMS = _poly_terms(*(a.ravel() for a in np.meshgrid(_PAPER_UV, _PAPER_UV)))
_PAPER_PINV = np.linalg.pinv(_PAPER_TERMS)  # the first, unweighted fit


def estimate_paper(gray: np.ndarray, *, envelope: bool = False) -> Paper:
    """Fit paper brightness, ignoring ink: blockwise bright levels, then a robust
    cubic. `envelope`: each block's level is the brightest of it and its
    neighbours' (see work_region: for pages whose ink fills whole blocks)."""
    cells = PAPER_CELLS
    # The coarse page is already low-passed; linear sampling is enough here.
    small = cv2.resize(gray, (cells * 4, cells * 4), interpolation=cv2.INTER_LINEAR)
    blocks = small.reshape(cells, 4, cells, 4).transpose(0, 2, 1, 3).reshape(cells, cells, 16)
    level = np.partition(blocks, 12, axis=2)[:, :, 12]  # about the 75th percentile of 16
    if envelope:
        level = cv2.dilate(level.astype(np.float32), np.ones((3, 3), np.uint8))
    level = level.ravel()
    terms = _PAPER_TERMS
    level = level.astype(np.float64)
    keep = np.ones(level.shape, bool)
    coef = _PAPER_PINV @ level
    for _ in range(3):
        resid = level - terms @ coef
        spread = 1.4826 * _quantile(np.abs(resid[keep]), 0.5) + 1e-3
        # Cells darker than the surface are ink; drop them and refit.
        keep = resid > -2.5 * spread
        if keep.sum() < terms.shape[1] * 3:
            break
        # Normal equations: a 10x10 solve, a fifth of what lstsq's SVD costs.
        sel = terms[keep]
        coef = np.linalg.solve(sel.T @ sel, sel.T @ level[keep])
    return Paper(coef)


def ink_map(gray: np.ndarray, paper: np.ndarray) -> np.ndarray:
    """How much darker than the paper each pixel is, as a fraction: 0 paper, 1 black."""
    return np.clip((paper - gray) / paper, 0.0, 1.0)


# ---------------------------------------------------------------- finding the digit


def _mad(values: np.ndarray) -> float:
    return 1.4826 * _quantile(np.abs(values - _quantile(values, 0.5)), 0.5)


def _noise_sigma(ink: np.ndarray) -> float:
    """The paper's noise: the spread of the ink map's values (robust: most of a
    page is paper). Where ink fills half of it (a bold number cropped tight)
    that spread is the ink's contrast, not noise, and would hide the ink: when
    the values split into two levels far apart for their own spreads
    (NOISE_SPLIT), the paper's level alone gives the noise. Noise alone never
    splits so (measured ratio at most 1.7; tight bold crops 3.9 and up)."""
    flat = ink.ravel()
    if flat.size > 2_048:
        flat = flat[:: flat.size // 2_048]
    spread = _mad(flat)
    if spread > 0.0:
        t = _otsu(flat)
        low, high = flat[flat <= t], flat[flat > t]
        if low.size and high.size:
            low_spread, high_spread = _mad(low), _mad(high)
            if float(high.mean() - low.mean()) > NOISE_SPLIT * (low_spread + high_spread):
                return min(spread, low_spread)
    return spread


def _otsu(values: np.ndarray) -> float:
    u8 = np.clip(values * 255.0, 0, 255).astype(np.uint8)
    t, _ = cv2.threshold(u8, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return float(t) / 255.0


def _line_mask(mask: np.ndarray, span: float, slenderness: float) -> np.ndarray:
    """Ruled lines: straight horizontal or vertical runs across `span` of the
    image, `slenderness` times longer than thick. The ratio keeps a tall '1' in
    a tight crop from counting. Lines on a page skewed by more than about a
    degree break into shorter runs and are not found (a known limit)."""
    h, w = mask.shape
    kw, kh = max(3, int(w * span)), max(3, int(h * span))
    runs = np.zeros_like(mask)
    # A run of kw pixels needs a row holding at least kw of them; the long
    # openings (the costly part) only visit such rows and columns, and an
    # opening along a row never looks at other rows, so this is exact.
    rows = np.flatnonzero(mask.sum(1, dtype=np.int32) >= kw)
    cols = np.flatnonzero(mask.sum(0, dtype=np.int32) >= kh)
    if rows.size:
        runs[rows] = cv2.morphologyEx(mask[rows], cv2.MORPH_OPEN, np.ones((1, kw), np.uint8))
    if cols.size:
        runs[:, cols] |= cv2.morphologyEx(
            np.ascontiguousarray(mask[:, cols]), cv2.MORPH_OPEN, np.ones((kh, 1), np.uint8)
        )
    if not runs.any():
        return runs
    count, labels, stats = _components(runs)
    length = np.maximum(stats[1:, cv2.CC_STAT_WIDTH], stats[1:, cv2.CC_STAT_HEIGHT])
    thickness = stats[1:, cv2.CC_STAT_AREA] / np.maximum(length, 1)
    slender = np.flatnonzero(length >= slenderness * thickness) + 1
    return _select(labels, count, slender)


def _frame_like(x: np.ndarray, y: np.ndarray, bw: np.ndarray, bh: np.ndarray,
                shape: tuple[int, int]) -> np.ndarray:
    """Blobs that hug an edge of the image and span FRAME_SPAN of it one way:
    page frames and scanner shadows, or digits cropped tightly (callers tell which)."""
    h, w = shape
    hugs = (x == 0) | (y == 0) | (x + bw == w) | (y + bh == h)
    return hugs & ((bw > FRAME_SPAN * w) | (bh > FRAME_SPAN * h))


def _segment(
    ink: np.ndarray, *, lines: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Smoothed ink, the uint8 mask of the ink to read (the digit, or the row of
    digits it stands in: specks and ruled lines, `lines` = (span, slenderness),
    removed), the component labels, their stats and the chosen labels."""
    h, w = ink.shape
    sigma = max(0.8, min(h, w) / 160)
    smooth = cv2.GaussianBlur(ink, (0, 0), sigma)
    noise = _noise_sigma(smooth)
    peak = float(smooth.max())
    threshold = max(MIN_CONTRAST, 4.0 * noise, 0.5 * _otsu(smooth), 0.25 * peak)
    if peak < MIN_CONTRAST or peak <= 4.0 * noise:
        raise NoInkError("no ink found: the image is blank or only noise")
    mask = (smooth > threshold).astype(np.uint8)

    ruled = _line_mask(mask, *lines)
    if ruled.any():
        stroke = max(3, int(round(2 * sigma + 1)))
        without = mask & ~cv2.dilate(ruled, np.ones((3, 3), np.uint8))
        # Strokes that crossed the line lost a piece; close the gap across it.
        bridged = cv2.morphologyEx(without, cv2.MORPH_CLOSE, np.ones((stroke * 2 + 1, 1), np.uint8))
        bridged |= cv2.morphologyEx(without, cv2.MORPH_CLOSE, np.ones((1, stroke * 2 + 1), np.uint8))
        mask = _drop_walls(without | (bridged & mask), ruled)

    count, labels, stats = _components(mask)
    if count <= 1:
        raise NoInkError("no ink found: only straight lines, no digit")
    chosen = _choose_row(stats[1:], (h, w), labels) + 1
    digit = _select(labels, count, chosen)
    return smooth, digit, labels, stats, chosen


def _drop_walls(mask: np.ndarray, lines: np.ndarray) -> np.ndarray:
    """`mask` without the walls between ruled lines: straight, solid strokes
    running from one line to another, as the walls of a form's digit boxes
    do. Left, each wall read as a "1" between the digits ("2054" in four
    boxes read "121015141", and ok). A 1 written in a box stands clear of at
    least one of its lines; a wall ends on both."""
    count, labels, stats = _components(mask)
    x, y, bw, bh, area = (stats[1:, i] for i in range(5))
    walls = np.flatnonzero((np.maximum(bw, bh) >= 8) & straight(bw, bh, area)) + 1
    if not walls.size:
        return mask
    # A wall stands across lines: a standing wall between lying lines, and
    # the other way round (the rest of a tall 1 taken for a standing line
    # lies along it, and is not a wall).
    _, line_labels, line_stats = _components(lines)
    lying = (line_stats[:, cv2.CC_STAT_WIDTH] >= line_stats[:, cv2.CC_STAT_HEIGHT]).astype(np.uint8)
    lying[0] = 0
    kernel = np.ones((5, 5), np.uint8)
    near_lying = cv2.dilate(lying[line_labels], kernel)
    near_standing = cv2.dilate((line_labels > 0).view(np.uint8) & (1 - lying[line_labels]), kernel)
    drop = []
    for k in walls:
        x0, y0, x1, y1 = x[k - 1], y[k - 1], x[k - 1] + bw[k - 1], y[k - 1] + bh[k - 1]
        if bh[k - 1] >= bw[k - 1]:
            near = near_lying
            ends = near[max(0, y0 - 2) : y0 + 2, x0:x1].any() and near[max(0, y1 - 2) : y1 + 2, x0:x1].any()
        else:
            near = near_standing
            ends = near[y0:y1, max(0, x0 - 2) : x0 + 2].any() and near[y0:y1, max(0, x1 - 2) : x1 + 2].any()
        if ends:
            drop.append(k)
    if not drop:
        return mask
    lut = np.ones(count, np.uint8)
    lut[drop] = 0
    return mask & lut[labels]


def straight(width, height, area):
    """Whether blobs of these box sizes and areas (numbers or arrays) are
    straight solid strokes, as a ruled box's wall is: WALL_SLENDER times
    longer than thick, filling WALL_SOLID of their box."""
    return (np.maximum(width, height) >= WALL_SLENDER * np.minimum(width, height)) & (
        area >= WALL_SOLID * np.multiply(width, height))


def _components(mask: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """8-connected components: count, labels, stats. 16-bit labels where they
    cannot overflow (a component needs at least one pixel and a gap): half the time."""
    ltype = cv2.CV_16U if mask.size < 2 * 65535 else cv2.CV_32S
    count, labels, stats, _ = cv2.connectedComponentsWithStatsWithAlgorithm(
        mask, 8, ltype, cv2.CCL_DEFAULT
    )
    return count, labels, stats


def _select(labels: np.ndarray, count: int, keep: np.ndarray) -> np.ndarray:
    """uint8 mask of the pixels whose component label is in `keep` (a lookup, not np.isin)."""
    if len(keep) == 1:
        return (labels == keep[0]).view(np.uint8)
    lut = np.zeros(count, np.uint8)
    lut[keep] = 1
    return lut[labels]


def _choose_components(stats: np.ndarray, shape: tuple[int, int], labels: np.ndarray) -> np.ndarray:
    """The digit is the largest blob plus sizeable blobs close to it; specks are
    dropped. `labels`: the components (label k + 1 is row k of `stats`)."""
    h, w = shape
    x, y, bw, bh, area = (stats[:, i].astype(np.float64) for i in range(5))
    # Page frames and scanner shadows hug an edge and span it; they are not the
    # digit. Digits cropped tightly (a field cut from a form) hug the edges and
    # span the page too, but have a digit's shape: not a thin strip (a frame's
    # side), not solid (a shadow), and not hollow where they span both ways
    # (a frame's ink lies along its box). Taken for frames, they left a stray
    # mark to be "the digit", and digits far taller than it could not join
    # it: a tight "33185" read "1", and ok.
    frame = _frame_like(x, y, bw, bh, shape)
    digit_shaped = (np.minimum(bw, bh) >= FRAME_STRIP * np.maximum(bw, bh)) & (area < FRAME_SOLID * bw * bh)
    for k in np.flatnonzero(frame & digit_shaped & (bw > FRAME_SPAN * w) & (bh > FRAME_SPAN * h)):
        digit_shaped[k] = not _along_its_box(labels, int(k) + 1, stats[k])
    frame &= ~digit_shaped
    score = np.where(frame, 0.0, area)
    if score.max() <= 0:
        score = area
    main = int(np.argmax(score))
    chosen = {main}
    x0, y0, x1, y1 = x[main], y[main], x[main] + bw[main], y[main] + bh[main]
    # Only sizeable blobs can join; noise leaves hundreds of specks not worth a look.
    candidates = np.flatnonzero(~frame & (area >= 0.06 * area[main]))
    candidates = candidates[np.argsort(-area[candidates])].tolist()
    grew = True
    while grew:
        grew = False
        reach = 0.35 * max(x1 - x0, y1 - y0)
        for i in candidates:
            if i in chosen:
                continue
            near = (
                x[i] < x1 + reach and x[i] + bw[i] > x0 - reach
                and y[i] < y1 + reach and y[i] + bh[i] > y0 - reach
            )
            if near:
                chosen.add(int(i))
                x0, y0 = min(x0, x[i]), min(y0, y[i])
                x1, y1 = max(x1, x[i] + bw[i]), max(y1, y[i] + bh[i])
                grew = True
    return np.array(sorted(chosen))


def _along_its_box(labels: np.ndarray, label: int, stat: np.ndarray) -> bool:
    """Most of a component's ink lies near the edges of its own box, as a
    frame's does (a number's strokes cross its box)."""
    x, y, bw, bh, area = (int(v) for v in stat[:5])
    band = max(2, int(round(FRAME_BAND * min(bw, bh))))
    inner = labels[y + band : y + bh - band, x + band : x + bw - band] == label
    return int(inner.sum()) < (1.0 - FRAME_ALONG) * area


def _choose_row(stats: np.ndarray, shape: tuple[int, int], labels: np.ndarray) -> np.ndarray:
    """The digit (as `_choose_components` finds it) plus the digits written beside
    it: blobs at least ROW_MATE of its height, overlapping a chosen blob's rows
    and within ROW_GAP heights of it sideways, repeatedly, so a whole number
    joins even with uneven spacing and a drifting baseline. A lone digit with
    nothing of its size beside it gets exactly what `_choose_components` gives."""
    picked = _choose_components(stats, shape, labels)
    bh = stats[:, cv2.CC_STAT_HEIGHT]
    ref = int(bh[picked].max())
    # Most pages hold one digit and specks: nothing tall enough beside it.
    tall = np.flatnonzero(bh >= ROW_MATE * ref).tolist()
    chosen = set(picked.tolist())
    if chosen.issuperset(tall):
        return picked
    x, y, bw = (stats[:, i].astype(np.float64) for i in range(3))
    frame = _frame_like(x, y, bw, bh.astype(np.float64), shape)
    pool = [
        i for i in tall
        if i not in chosen and bw[i] < 4 * ref
        # Page frames and scanner shadows hug an edge and span it; digits
        # cropped tightly (a field cut from a form) do too, but are no taller
        # than the digit found.
        and not (frame[i] and max(bw[i], bh[i]) > FRAME_TALL * ref)
    ]
    grew = True
    while grew and pool:
        grew = False
        for i in list(pool):
            for j in chosen:
                gap = max(x[i] - (x[j] + bw[j]), x[j] - (x[i] + bw[i]))
                overlap = min(y[i] + bh[i], y[j] + bh[j]) - max(y[i], y[j])
                if gap <= ROW_GAP * max(bh[i], bh[j]) and overlap >= 0.3 * min(bh[i], bh[j]):
                    chosen.add(i)
                    pool.remove(i)
                    grew = True
                    break
    return np.array(sorted(_with_pieces(stats, chosen, shape, ref)))


def _with_pieces(stats: np.ndarray, chosen: set[int], shape: tuple[int, int], ref: int) -> set[int]:
    """A row of digits plus the pieces of its digits too short to be row mates:
    a 7's bar or a 5's cap the pen lifted from, the loop of a 9 drawn apart.
    Like `_choose_components` around the main blob: sizeable blobs (at least
    0.06 of the area of the digit they touch) within 0.35 of its size."""
    x, y, bw, bh, area = (stats[:, i].astype(np.float64) for i in range(5))
    h, w = shape
    frame = _frame_like(x, y, bw, bh, shape) & (np.maximum(bw, bh) > FRAME_TALL * ref)
    members = sorted(chosen)
    pool = [int(i) for i in np.flatnonzero(~frame) if int(i) not in chosen]
    out = set(chosen)
    for i in pool:
        for j in members:
            reach = 0.35 * max(bw[j], bh[j])
            near = (x[i] < x[j] + bw[j] + reach and x[i] + bw[i] > x[j] - reach
                    and y[i] < y[j] + bh[j] + reach and y[i] + bh[i] > y[j] - reach)
            if near and area[i] >= 0.06 * area[j]:
                out.add(i)
                break
    return out


def bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of the non-zero pixels of a uint8 mask."""
    x, y, w, h = cv2.boundingRect(mask)
    return x, y, x + w, y + h


def _stroke_width(mask: np.ndarray) -> float:
    """Mean stroke width of a mask: for long strokes, 2 x area / perimeter."""
    contours, _ = cv2.findContours(mask, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    perimeter = sum(cv2.arcLength(c, True) for c in contours)
    return 2.0 * float(mask.sum()) / max(perimeter, 1.0)


# ---------------------------------------------------------------- MNIST normalization


def mnist_box(ink: np.ndarray) -> np.ndarray:
    """Crop to the ink, scale the longer side to 20 px (anti-aliased), centre by mass in 28x28."""
    x0, y0, x1, y1 = bbox((ink > 0).view(np.uint8))
    crop = ink[y0:y1, x0:x1]
    h, w = crop.shape
    scale = BOX / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    small = cv2.resize(crop, size, interpolation=interp)
    m = cv2.moments(small)
    total = m["m00"]
    cy = m["m01"] / total if total > 0 else (small.shape[0] - 1) / 2
    cx = m["m10"] / total if total > 0 else (small.shape[1] - 1) / 2
    shift = np.float32([[1, 0, COM_CENTRE - cx], [0, 1, COM_CENTRE - cy]])
    out = cv2.warpAffine(
        small, shift, (SIDE, SIDE), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT
    )
    # MNIST's strokes peak at full intensity; averaging down to 20 px dims ours.
    peak = float(out.max())
    return np.clip(out / peak if peak > 0 else out, 0.0, 1.0).astype(np.float32)


@dataclass(frozen=True)
class Work:
    """The region holding the ink, resampled so a digit is about WORK_SIDE tall
    and cleaned: what `finish` (one digit) and segmentation (a number) cut from."""

    ink: np.ndarray  # float32 ink map of the crop: 0 paper, 1 black
    smooth: np.ndarray  # the same, smoothed
    mask: np.ndarray  # uint8: the ink to read (specks and ruled lines removed)
    # The mask's connected components (segmentation reuses them): labels of
    # every component found, cv2 stats per label, and the labels in `mask`.
    labels: np.ndarray | None = None
    stats: np.ndarray | None = None
    chosen: np.ndarray | None = None
    # Digit-sized blobs on the page left out of the row read (see unread):
    # a second line of digits, a neighbouring field.
    unread: int = 0


# The paper-envelope retry (work_region) keeps only ink at least this dark (median, 0-1).
ENVELOPE_INK = 0.5


def work_region(gray: np.ndarray) -> Work:
    """A page (gray, uint8 or float in [0, 1], paper light or dark) -> the cleaned ink region."""
    try:
        return _work_region(gray, envelope=False)
    except NoInkError as first:
        # Bold strokes (a marker number cropped with a thin margin) fill whole
        # blocks of the paper fit, which then bends into the ink until the ink
        # is the paper. Looked at again with the paper as the blocks' bright
        # envelope, the ink stands out; only as a retry, and only for bold ink
        # (ENVELOPE_INK), because the envelope's upward bias reads noise as
        # faint ink (figures: docs/design/reading.md).
        try:
            work = _work_region(gray, envelope=True)
        except NoInkError:
            raise first from None
        if float(np.median(work.ink[work.mask > 0])) < ENVELOPE_INK:
            raise first
        return work


def _work_region(gray: np.ndarray, *, envelope: bool) -> Work:
    gray = np.asarray(gray)
    if gray.dtype != np.uint8:
        gray = gray.astype(np.float32, copy=False)
    h, w = gray.shape
    if max(h, w) < SMALL_PAGE:
        # A tiny page (a 16x16 postal scan, a form's cell cut tight) is read
        # enlarged: at its own size the smoothing that finds the ink blurs a
        # digit filling a third of it into a spread read as noise ("no ink
        # found" for two 16x16 crops of MNIST digits in three).
        f = SMALL_PAGE / max(h, w)
        gray = cv2.resize(gray, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_LINEAR)
        h, w = gray.shape
    # Pass 1 finds the digit on a copy of the page at most COARSE_SIDE large,
    # reading polarity and paper off it too, so the full page is never converted
    # or inverted. A small faint digit on a large page can fade into the noise at
    # that size: then the next finer level is searched.
    levels = pyramid(gray, COARSE_SIDE, COARSE_RETRIES + 1)
    k = 1
    for i, (level, step) in enumerate(levels):
        k = step  # the level the digit was found on sets the scale below
        coarse = _unit(level)
        light_ink = ink_is_light(coarse)
        if light_ink:
            coarse = 1.0 - coarse
        paper = estimate_paper(coarse, envelope=envelope)
        try:
            _, mask, labels, stats, chosen = _segment(
                ink_map(coarse, paper.over(coarse.shape, (0, 0, 1, 1))), lines=PAGE_LINES
            )
            left_out = unread(stats, chosen, mask.shape)
            break
        except NoInkError:
            if i == len(levels) - 1:
                raise
    # Coarse pixel i covers page pixels around i*k; the margin below absorbs the rest.
    x0, y0, x1, y1 = (v * k for v in bbox(mask))

    # Pass 2: a crop with a wide margin, resampled so the digit is WORK_SIDE
    # tall. A row of digits is scaled by its height, not its length.
    side = max(x1 - x0, y1 - y0) if x1 - x0 <= WIDE * (y1 - y0) else y1 - y0
    margin = 0.45 * side + 2 * k
    cx0, cy0 = max(0, int(x0 - margin)), max(0, int(y0 - margin))
    cx1, cy1 = min(w, int(np.ceil(x1 + margin))), min(h, int(np.ceil(y1 + margin)))
    scale = WORK_SIDE / side
    scale = min(scale, (MAX_WORK_PIXELS / max(1, (cx1 - cx0) * (cy1 - cy0))) ** 0.5)
    size = (max(8, round((cx1 - cx0) * scale)), max(8, round((cy1 - cy0) * scale)))
    crop = _unit(_resample(gray[cy0:cy1, cx0:cx1], size, scale))
    if light_ink:
        crop = 1.0 - crop
    box = (cx0 / w, cy0 / h, cx1 / w, cy1 / h)
    ink = ink_map(crop, paper.over(crop.shape, box))
    smooth, mask, labels, stats, chosen = _segment(ink, lines=CROP_LINES)
    return Work(ink=ink, smooth=smooth, mask=mask, labels=labels, stats=stats, chosen=chosen,
                unread=max(left_out, unread(stats, chosen, mask.shape)))


# A blob left out of the row read is digit-sized when at least UNREAD_TALL of
# the row's tallest blob high and UNREAD_AREA of its median blob's ink, and
# no wider than UNREAD_WIDE of that height (a rule, a frame is not).
UNREAD_TALL = 0.6
UNREAD_AREA = 0.15
UNREAD_WIDE = 3.0


def unread(stats: np.ndarray, chosen: np.ndarray, shape: tuple[int, int]) -> int:
    """How many digit-sized blobs (stats rows by label, row 0 the background)
    lie clear of the page's edges and outside the chosen row: a second line
    of digits or a neighbouring field, which the row's reading leaves out.
    Blobs cut by the page's edge are pieces of what lies beyond it (a
    neighbour's stroke in a tight crop), not something left unread."""
    if not len(chosen):
        return 0
    x, y, bw, bh, area = (stats[:, i] for i in range(5))
    ref = float(bh[chosen].max())
    inside = (x > 0) & (y > 0) & (x + bw < shape[1]) & (y + bh < shape[0])
    sized = (bh >= UNREAD_TALL * ref) & (bw < UNREAD_WIDE * ref)
    sized &= area >= UNREAD_AREA * float(np.median(area[chosen]))
    left = inside & sized
    left[0] = False
    left[chosen] = False
    return int(left.sum())


def finish(
    ink: np.ndarray, smooth: np.ndarray, mask: np.ndarray, exclude: np.ndarray | None = None
) -> np.ndarray:
    """One digit's pixels (`mask`, within a Work's arrays) -> MNIST's 28x28.

    `exclude` marks ink that belongs to other digits: the anti-aliased edge
    kept around the strokes must not reach into a neighbour."""
    x0, y0, x1, y1 = bbox(mask)
    return mnist_box(_clean(ink, smooth, mask, exclude, BOX / max(x1 - x0, y1 - y0, 1)))


def finish_pair(
    ink: np.ndarray, smooth: np.ndarray, mask: np.ndarray, exclude: np.ndarray | None = None
) -> np.ndarray:
    """Two digits that touch or overlap (`mask`) -> the pair model's 28x56
    picture: cleaned as one digit is, scaled by its height (see pair_box)."""
    x0, y0, x1, y1 = bbox(mask)
    return pair_box(_clean(ink, smooth, mask, exclude, _pair_scale(x1 - x0, y1 - y0)))


def _clean(
    ink: np.ndarray, smooth: np.ndarray, mask: np.ndarray, exclude: np.ndarray | None, to_box: float
) -> np.ndarray:
    """The ink of `mask` with its anti-aliased edge, paper floor removed, full
    strength, strokes brought toward MNIST's width at the final scale `to_box`."""
    # Keep the anti-aliased edge of the strokes, nothing else on the page.
    near = cv2.dilate(mask, np.ones((5, 5), np.uint8)).astype(bool)
    if exclude is not None:
        near &= ~exclude.astype(bool)
    inside = mask.astype(bool)
    digit = np.where(near, ink, 0.0).astype(np.float32)
    floor = 0.5 * _quantile(smooth[inside], 0.10)
    digit = np.clip((digit - floor) / max(1e-3, 1 - floor), 0, 1)
    strength = _quantile(digit[inside], 0.90)
    digit = np.clip(digit / max(strength, 1e-3), 0.0, 1.0)
    digit = _normalize_stroke(digit, mask, to_box)
    if not digit.any():
        raise NoInkError("no ink found after cleaning")
    return digit


def _pair_scale(width: int, height: int) -> float:
    """A pair's height becomes BOX pixels, unless it is too wide for the picture."""
    return min(BOX / max(height, 1), (PAIR_WIDTH - 8) / max(width, 1))


def pair_box(ink: np.ndarray) -> np.ndarray:
    """Crop to the ink, scale by pair_scale (anti-aliased), centre the box in 28x56."""
    x0, y0, x1, y1 = bbox((ink > 0).view(np.uint8))
    crop = ink[y0:y1, x0:x1]
    h, w = crop.shape
    scale = _pair_scale(w, h)
    size = (max(1, min(PAIR_WIDTH, round(w * scale))), max(1, min(SIDE, round(h * scale))))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    small = cv2.resize(crop, size, interpolation=interp)
    out = np.zeros((SIDE, PAIR_WIDTH), np.float32)
    top, left = (SIDE - size[1]) // 2, (PAIR_WIDTH - size[0]) // 2
    out[top : top + size[1], left : left + size[0]] = small
    peak = float(out.max())
    return np.clip(out / peak if peak > 0 else out, 0.0, 1.0).astype(np.float32)


def normalize(gray: np.ndarray) -> np.ndarray:
    """A page (gray, uint8 or float in [0, 1], paper light or dark) -> the 28x28 digit."""
    work = work_region(gray)
    return finish(work.ink, work.smooth, work.mask)


def _resample(region: np.ndarray, size: tuple[int, int], scale: float) -> np.ndarray:
    """Resize to `size`: anti-aliased when shrinking, cubic when enlarging. A large
    shrink first averages whole k x k blocks (INTER_AREA's fast path); only the
    last step uses an arbitrary ratio, which costs per source pixel."""
    if scale >= 1:
        return cv2.resize(region, size, interpolation=cv2.INTER_CUBIC)
    k = int(1 / scale)
    h, w = region.shape
    if k >= 2 and h >= 8 * k and w >= 8 * k:
        region = cv2.resize(region[: h // k * k, : w // k * k], (w // k, h // k), interpolation=cv2.INTER_AREA)
    return cv2.resize(region, size, interpolation=cv2.INTER_AREA)


def _normalize_stroke(digit: np.ndarray, mask: np.ndarray, to_box: float) -> np.ndarray:
    """Bring hairline or marker strokes toward MNIST's width at the final scale
    (`to_box`: final pixels per pixel here)."""
    width = _stroke_width(mask) * to_box  # as it would be after scaling to 20 px
    if width < 0.65 * MNIST_STROKE:
        grow = (MNIST_STROKE - width) / to_box
        k = max(3, int(round(grow)) | 1)
        return cv2.dilate(digit, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
    if width > 1.8 * MNIST_STROKE:
        shrink = (width - 1.4 * MNIST_STROKE) / to_box
        k = max(3, int(round(shrink)) | 1)
        return cv2.erode(digit, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
    return digit


def load_digit(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Digit:
    """PNG bytes -> Digit. Raises an ImageError subclass with a one-line message."""
    gray = decode_gray(data, max_pixels=max_pixels)
    return Digit(pixels=normalize(gray), width=gray.shape[1], height=gray.shape[0])
