"""A realistic-scan generator: turns a digit's ink (MNIST test digits, font
digits, drawn strokes) into the pages scanners, phones and drawing apps
produce, in every PNG flavour. Used by the tests (small, seeded sets) and the
accuracy benchmark (large sets).

Each variation names one thing real scans do; "realistic" combines several at
random, which is closest to what arrives in an inbox.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import cv2
import numpy as np

from digitwatch.training import pngwrite

VARIATIONS = [
    "clean",
    "paper_tone",
    "uneven_light",
    "noise",
    "blur",
    "specks",
    "ruled_line",
    "light_on_dark",
    "small_on_large",
    "large",
    "thin_pen",
    "marker",
    "transparent",
    "realistic",
]


@dataclass(frozen=True)
class Scan:
    png: bytes
    label: int
    variation: str
    flavour: str
    source: str


def ink_from_mnist(digit: np.ndarray, height: int) -> np.ndarray:
    """MNIST's 28x28 field scaled so its 20 px box becomes `height` px; float ink in [0, 1]."""
    side = max(8, round(height * 28 / 20))
    ink = cv2.resize(digit.astype(np.float32) / 255.0, (side, side), interpolation=cv2.INTER_CUBIC)
    return np.clip(ink, 0, 1)


HERSHEY = [
    cv2.FONT_HERSHEY_SIMPLEX,
    cv2.FONT_HERSHEY_DUPLEX,
    cv2.FONT_HERSHEY_COMPLEX,
    cv2.FONT_HERSHEY_TRIPLEX,
    cv2.FONT_HERSHEY_SCRIPT_SIMPLEX,
    cv2.FONT_HERSHEY_PLAIN,
]


def ink_from_font(label: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """A digit in one of OpenCV's stroke fonts, slanted and jittered like handwriting."""
    font = HERSHEY[rng.integers(len(HERSHEY))] | (cv2.FONT_ITALIC if rng.random() < 0.3 else 0)
    scale = 4.0
    thickness = int(rng.integers(3, 9))
    (tw, th), base = cv2.getTextSize(str(label), font, scale, thickness)
    canvas = np.zeros((th + base + 40, tw + 40), np.uint8)
    cv2.putText(canvas, str(label), (20, th + 20), font, scale, 255, thickness, cv2.LINE_AA)
    return _jitter(canvas.astype(np.float32) / 255.0, height, rng)


# Hand-drawn stroke models: each digit a few polylines in a unit box, two styles
# apiece, jittered per sample so no two are alike.
STROKES: dict[int, list[list[list[tuple[float, float]]]]] = {
    0: [[[(0.5, 0), (0.15, 0.2), (0.1, 0.6), (0.35, 1), (0.7, 0.95), (0.9, 0.5), (0.8, 0.1), (0.5, 0)]],
        [[(0.55, 0.02), (0.25, 0.1), (0.12, 0.5), (0.3, 0.95), (0.65, 0.98), (0.88, 0.6), (0.75, 0.12), (0.5, 0.04)]]],
    1: [[[(0.55, 0), (0.5, 1)]], [[(0.3, 0.2), (0.6, 0), (0.55, 1)]]],
    2: [[[(0.15, 0.25), (0.4, 0), (0.75, 0.05), (0.8, 0.35), (0.5, 0.65), (0.1, 1), (0.9, 0.98)]],
        [[(0.2, 0.2), (0.5, 0.02), (0.8, 0.2), (0.7, 0.5), (0.15, 0.95), (0.5, 0.9), (0.9, 0.95)]]],
    3: [[[(0.15, 0.1), (0.5, 0), (0.8, 0.15), (0.7, 0.4), (0.4, 0.5), (0.75, 0.6), (0.85, 0.85), (0.5, 1), (0.1, 0.9)]],
        [[(0.2, 0.05), (0.8, 0.05), (0.45, 0.45), (0.8, 0.6), (0.8, 0.9), (0.45, 1), (0.15, 0.88)]]],
    4: [[[(0.6, 1), (0.62, 0)], [(0.62, 0), (0.1, 0.65), (0.9, 0.65)]],
        [[(0.2, 0), (0.15, 0.55), (0.85, 0.55)], [(0.75, 0.05), (0.7, 1)]]],
    5: [[[(0.85, 0), (0.25, 0), (0.2, 0.45), (0.6, 0.4), (0.85, 0.65), (0.7, 0.95), (0.15, 0.95)]],
        [[(0.25, 0.02), (0.2, 0.45), (0.55, 0.38), (0.85, 0.6), (0.75, 0.92), (0.4, 1), (0.1, 0.85)], [(0.25, 0.02), (0.85, 0.02)]]],
    6: [[[(0.75, 0), (0.35, 0.3), (0.15, 0.7), (0.4, 1), (0.8, 0.85), (0.75, 0.55), (0.4, 0.5), (0.2, 0.7)]],
        [[(0.7, 0.02), (0.3, 0.35), (0.2, 0.8), (0.5, 1), (0.8, 0.75), (0.55, 0.5), (0.22, 0.65)]]],
    7: [[[(0.1, 0.02), (0.9, 0), (0.4, 1)]], [[(0.1, 0.05), (0.9, 0.02), (0.55, 0.5), (0.45, 1)], [(0.35, 0.5), (0.8, 0.5)]]],
    8: [[[(0.75, 0.15), (0.5, 0), (0.2, 0.15), (0.3, 0.4), (0.75, 0.6), (0.8, 0.9), (0.5, 1), (0.2, 0.9), (0.25, 0.6), (0.7, 0.4), (0.8, 0.15)]],
        [[(0.5, 0.5), (0.2, 0.3), (0.5, 0), (0.8, 0.25), (0.5, 0.5), (0.15, 0.75), (0.5, 1), (0.85, 0.75), (0.5, 0.5)]]],
    9: [[[(0.8, 0.3), (0.5, 0.5), (0.2, 0.35), (0.35, 0.02), (0.75, 0.05), (0.8, 0.3), (0.7, 1)]],
        [[(0.82, 0.2), (0.5, 0), (0.2, 0.2), (0.35, 0.45), (0.8, 0.3), (0.8, 0.1), (0.75, 0.6), (0.6, 1)]]],
}


def ink_from_strokes(label: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """A digit drawn as pen strokes from jittered control points (another 'writer')."""
    style = STROKES[label][rng.integers(len(STROKES[label]))]
    box = 200
    width_frac = rng.uniform(0.55, 0.75) if label != 1 else rng.uniform(0.25, 0.4)
    canvas = np.zeros((box + 60, box + 60), np.uint8)
    thickness = int(rng.integers(10, 22))
    for stroke in style:
        pts = np.array(stroke, np.float64)
        pts += rng.normal(0, 0.03, pts.shape)
        # Smooth the polyline with a Chaikin pass so curves look written, not plotted.
        for _ in range(3):
            if len(pts) > 2:
                q = 0.75 * pts[:-1] + 0.25 * pts[1:]
                r = 0.25 * pts[:-1] + 0.75 * pts[1:]
                pts = np.vstack([pts[:1], np.column_stack([q, r]).reshape(-1, 2), pts[-1:]])
        xy = np.column_stack([30 + (pts[:, 0] - 0.5) * box * width_frac + box / 2, 30 + pts[:, 1] * box])
        cv2.polylines(canvas, [np.round(xy * 4).astype(np.int32)], False, 255, thickness, cv2.LINE_AA, shift=2)
    return _jitter(canvas.astype(np.float32) / 255.0, height, rng)


def ink_from_8x8(image8: np.ndarray, height: int) -> np.ndarray:
    """An 8x8 bitmap (0-16), upscaled smoothly as a fax-like low-resolution source."""
    ink = np.clip(image8.astype(np.float32) / 16.0, 0, 1)
    big = cv2.resize(ink, (height, height), interpolation=cv2.INTER_CUBIC)
    return np.clip(cv2.copyMakeBorder(big, height // 4, height // 4, height // 4, height // 4,
                                      cv2.BORDER_CONSTANT, value=0), 0, 1)


def _jitter(ink: np.ndarray, height: int, rng: np.random.Generator) -> np.ndarray:
    """Crop to the ink, slant and rotate a little, scale the ink to `height` px tall."""
    ys, xs = np.nonzero(ink > 0.05)
    ink = ink[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    h, w = ink.shape
    pad = max(h, w)
    ink = cv2.copyMakeBorder(ink, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=0)
    angle = rng.uniform(-10, 10)
    shear = rng.uniform(-0.2, 0.2)
    c = (ink.shape[1] / 2, ink.shape[0] / 2)
    m = cv2.getRotationMatrix2D(c, angle, 1.0)
    m[0, 1] += shear
    m[0, 2] -= shear * c[1]
    ink = cv2.warpAffine(ink, m, (ink.shape[1], ink.shape[0]), flags=cv2.INTER_LINEAR)
    ys, xs = np.nonzero(ink > 0.05)
    ink = ink[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    s = height / ink.shape[0]
    out = cv2.resize(ink, (max(1, round(ink.shape[1] * s)), height), interpolation=cv2.INTER_AREA)
    m = max(2, height // 6)
    return cv2.copyMakeBorder(out, m, m, m, m, cv2.BORDER_CONSTANT, value=0)


# ---------------------------------------------------------------- the page


def _recolour_stroke(ink: np.ndarray, rng: np.random.Generator, variation: str) -> np.ndarray:
    h = ink.shape[0]
    if variation == "thin_pen":
        k = max(1, round(h / 40))
        return cv2.erode(ink, np.ones((k, k), np.uint8)) if h > 60 else ink * 0.9
    if variation == "marker":
        k = max(3, round(h / 14)) | 1
        return cv2.dilate(ink, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
    return ink


def render_page(
    ink: np.ndarray, variation: str, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray | None]:
    """Place ink on a page made to look like `variation`; returns RGB float and alpha."""
    if variation == "realistic":
        picks = rng.choice(
            ["paper_tone", "uneven_light", "noise", "blur", "specks", "ruled_line"],
            size=int(rng.integers(2, 5)), replace=False,
        )
        parts = set(picks.tolist())
    else:
        parts = {variation}
    ink = _recolour_stroke(ink, rng, variation)
    ih, iw = ink.shape
    if "small_on_large" in parts:
        page_h = int(rng.integers(1200, 2000))
    elif "large" in parts:
        page_h = int(ih * rng.uniform(1.0, 1.15))
    else:
        page_h = int(ih * rng.uniform(1.6, 4.0))
    page_w = max(iw + 2, int(page_h * rng.uniform(0.7, 1.4)))
    page_h = max(page_h, ih + 2)
    y = int(rng.integers(0, page_h - ih + 1))
    x = int(rng.integers(0, page_w - iw + 1))
    alpha = np.zeros((page_h, page_w), np.float32)
    alpha[y : y + ih, x : x + iw] = ink

    ink_rgb = np.array([0.1, 0.1, 0.12]) if rng.random() < 0.5 else np.array([0.1, 0.15, 0.45])
    strength = rng.uniform(0.75, 1.0)
    if "thin_pen" in parts:
        strength = rng.uniform(0.55, 0.9)  # pencil and fine pens are lighter
    paper = np.array([1.0, 1.0, 1.0])
    if "paper_tone" in parts:
        paper = np.array([rng.uniform(0.85, 0.97), rng.uniform(0.8, 0.95), rng.uniform(0.65, 0.9)])
    if "transparent" in parts:
        rgb = np.broadcast_to(ink_rgb, (page_h, page_w, 3)).astype(np.float32).copy()
        return rgb, np.clip(alpha * strength, 0, 1)

    a = (alpha * strength)[..., None]
    rgb = paper * (1 - a) + ink_rgb * a
    if "ruled_line" in parts:
        line_rgb = np.array([0.55, 0.65, 0.85]) if rng.random() < 0.6 else np.array([0.5, 0.5, 0.5])
        t = max(1, round(page_h / 300 * rng.uniform(0.8, 2.0)))
        for ly in {y + int(ih * rng.uniform(0.55, 0.95)), y + int(ih * rng.uniform(0.1, 0.4))}:
            rgb[max(0, ly - t // 2) : ly + (t + 1) // 2] *= line_rgb
    if "specks" in parts:
        for _ in range(int(rng.integers(3, 15))):
            r = max(1, round(ih * rng.uniform(0.01, 0.035)))
            cx, cy = int(rng.integers(0, page_w)), int(rng.integers(0, page_h))
            cv2.circle(rgb, (cx, cy), r, tuple(float(v) for v in ink_rgb * 1.2), -1, cv2.LINE_AA)
    if "uneven_light" in parts:
        gy, gx = np.mgrid[0:page_h, 0:page_w].astype(np.float32)
        gx, gy = gx / page_w, gy / page_h
        theta = rng.uniform(0, 2 * np.pi)
        ramp = np.cos(theta) * (gx - 0.5) + np.sin(theta) * (gy - 0.5)
        vignette = (gx - 0.5) ** 2 + (gy - 0.5) ** 2
        light = 1.0 - rng.uniform(0.25, 0.5) * (ramp + 0.5) - rng.uniform(0, 0.4) * vignette
        rgb = rgb * np.clip(light, 0.3, 1)[..., None]
    if "blur" in parts:
        rgb = cv2.GaussianBlur(rgb, (0, 0), max(0.8, ih / 60 * rng.uniform(1.0, 2.5)))
    if "noise" in parts:
        rgb = rgb + rng.normal(0, rng.uniform(0.03, 0.08), rgb.shape)
    rgb = np.clip(rgb, 0, 1).astype(np.float32)
    if "light_on_dark" in parts:
        rgb = 1.0 - rgb
    return rgb, None


def digit_height(variation: str, rng: np.random.Generator) -> int:
    if variation == "small_on_large":
        return int(rng.integers(28, 60))
    return int(rng.integers(24, 240))


def make_scan(
    ink_for: Callable[[int], np.ndarray],
    label: int,
    variation: str,
    flavour: str,
    rng: np.random.Generator,
    source: str,
) -> Scan:
    """One page for one digit; `ink_for(height)` gives its ink at that height."""
    ink = ink_for(digit_height(variation, rng))
    rgb, alpha = render_page(ink, variation, rng)
    if alpha is not None and not flavour.startswith(("gray_alpha", "rgba", "palette_alpha")):
        flavour = ["gray_alpha8", "gray_alpha16", "rgba8", "rgba16", "palette_alpha"][
            int(rng.integers(5))
        ]
    return Scan(pngwrite.encode_flavour(rgb, alpha, flavour), label, variation, flavour, source)


def mnist_scans(
    images: np.ndarray, labels: np.ndarray, variation: str, rng: np.random.Generator
) -> Iterator[Scan]:
    """Scans of MNIST digits, cycling through the PNG flavours."""
    flavours = pngwrite.FLAVOURS
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        yield make_scan(
            lambda h, im=image: ink_from_mnist(im, h), int(label), variation,
            flavours[i % len(flavours)], rng, "mnist",
        )


def other_scans(count: int, source: str, rng: np.random.Generator) -> Iterator[Scan]:
    """Scans of digits from other writers: 'strokes' (drawn) or 'font' (Hershey)."""
    flavours = pngwrite.FLAVOURS
    for i in range(count):
        variation = VARIATIONS[i % len(VARIATIONS)]
        flavour = flavours[(i * 5) % len(flavours)]
        label = i % 10
        maker = ink_from_strokes if source == "strokes" else ink_from_font
        yield make_scan(lambda h, lb=label, mk=maker: mk(lb, h, rng), label, variation, flavour, rng, source)


def to_8x8(image28: np.ndarray) -> np.ndarray:
    """An MNIST digit as an 8x8 bitmap of 0-16 (area-averaged, as low-resolution scanners bin)."""
    return cv2.resize(image28.astype(np.float32), (8, 8), interpolation=cv2.INTER_AREA) * (16.0 / 255.0)


def low_res_scans(images: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> Iterator[Scan]:
    """Scans of digits binned to 8x8 and upscaled (a fax-like source), cycling variations and flavours."""
    flavours = pngwrite.FLAVOURS
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        small = to_8x8(image)
        yield make_scan(lambda h, im=small: ink_from_8x8(im, h), int(label), VARIATIONS[i % len(VARIATIONS)],
                        flavours[(i * 5) % len(flavours)], rng, "low_res")


# ---------------------------------------------------------------- numbers and non-digits
#
# Numbers are composed from MNIST *test* digits only (tests and evaluation;
# never training data). Layout knobs name what real forms do.


@dataclass(frozen=True)
class NumberScan:
    png: bytes
    text: str  # the digits on the page, "" for a non-digit
    variation: str
    flavour: str
    layout: str


def _ink_box(ink: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(ink > 0.05)
    return ink[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]


def break_digit(ink: np.ndarray, at: float = 0.3, gap: float = 0.07) -> np.ndarray:
    """Erase a horizontal band `gap` of the height at `at` of the height: the
    pen lifted, as when a 5's bar floats free of its body."""
    ink = _ink_box(ink).copy()
    h = ink.shape[0]
    y0 = int(h * at)
    ink[y0 : y0 + max(2, int(round(h * gap)))] = 0
    return ink


def ink_from_number(
    digits: list[np.ndarray], height: int, rng: np.random.Generator, *,
    spacing: tuple[float, float] = (0.15, 0.4), drift: float = 0.0, broken: int | None = None,
) -> np.ndarray:
    """MNIST digits side by side, `height` px tall each. `spacing` is the gap
    between neighbours in digit heights (negative: they touch or overlap);
    `drift` moves each next digit down by that many heights (a baseline that
    wanders); `broken` breaks that digit in two (see break_digit)."""
    parts = [_ink_box(ink_from_mnist(d, height)) for d in digits]
    return ink_from_parts(parts, height, rng, spacing=spacing, drift=drift, broken=broken)


def ink_from_parts(
    parts: list[np.ndarray], height: int, rng: np.random.Generator, *,
    spacing: tuple[float, float] = (0.15, 0.4), drift: float = 0.0, broken: int | None = None,
) -> np.ndarray:
    """Digits' ink (any source, about `height` px tall) side by side, laid out
    as ink_from_number describes."""
    parts = [break_digit(p) if k == broken else _ink_box(p) for k, p in enumerate(parts)]
    gaps = [rng.uniform(*spacing) * height for _ in parts[1:]]
    offsets = [int(round(abs(drift) * height * k)) for k in range(len(parts))]
    if drift < 0:
        offsets = offsets[::-1]
    width = int(sum(p.shape[1] for p in parts) + sum(gaps)) + 2 * height
    tall = max(p.shape[0] + o for p, o in zip(parts, offsets, strict=True))
    canvas = np.zeros((tall + height, max(width, height)), np.float32)
    x = height // 2
    for k, (p, o) in enumerate(zip(parts, offsets, strict=True)):
        y = height // 2 + o + (height - p.shape[0]) // 2
        region = canvas[y : y + p.shape[0], x : x + p.shape[1]]
        np.maximum(region, p, out=region)
        x += p.shape[1] + (int(round(gaps[k])) if k < len(gaps) else 0)
    return _ink_box(canvas).copy() if canvas.any() else canvas


def ruled_page(ink: np.ndarray, below: int) -> bytes:
    """Dark ink on white paper with a form's gray line across the whole page
    `below` px under the ink's lowest row (0: grazing it)."""
    page = np.ones((ink.shape[0] + 80, ink.shape[1] + 120), np.float32)
    page[30 : 30 + ink.shape[0], 60 : 60 + ink.shape[1]] -= ink
    y = 30 + ink.shape[0] + below
    page[y : y + 3, :] = np.minimum(page[y : y + 3, :], 0.35)
    return gray_png(page)


def gray_png(page: np.ndarray) -> bytes:
    """A gray page (float, 1 = paper) as an 8-bit RGB PNG."""
    return pngwrite.encode_flavour(np.repeat(np.clip(page, 0, 1)[..., None], 3, 2), None, "rgb8")


def ink_from_text(text: str, height: int, rng: np.random.Generator) -> np.ndarray:
    """Any characters (letters, symbols) in one of OpenCV's Hershey stroke
    fonts, jittered like ink_from_font: the non-digits a form also holds."""
    font = HERSHEY[rng.integers(len(HERSHEY))]
    scale, thickness = 4.0, int(rng.integers(4, 9))
    (tw, th), base = cv2.getTextSize(text, font, scale, thickness)
    canvas = np.zeros((th + base + 40, tw + 40), np.uint8)
    cv2.putText(canvas, text, (20, th + 20), font, scale, 255, thickness, cv2.LINE_AA)
    return _jitter(canvas.astype(np.float32) / 255.0, height, rng)


MARKS = ["tick", "cross", "scribble", "box"]


def ink_from_mark(kind: str, height: int, rng: np.random.Generator) -> np.ndarray:
    """Pen marks that are not digits: a tick, a cross, a scribble, an empty box."""
    s = 200
    canvas = np.zeros((s + 60, int(s * 1.6) + 60), np.uint8)
    t = int(rng.integers(10, 20))
    j = lambda v: int(v + rng.normal(0, 6))  # noqa: E731
    if kind == "tick":
        pts = [(j(30), j(130)), (j(90), j(220)), (j(230), j(30))]
        cv2.polylines(canvas, [np.array(pts, np.int32)], False, 255, t, cv2.LINE_AA)
    elif kind == "cross":
        cv2.line(canvas, (j(40), j(40)), (j(220), j(220)), 255, t, cv2.LINE_AA)
        cv2.line(canvas, (j(220), j(40)), (j(40), j(220)), 255, t, cv2.LINE_AA)
    elif kind == "scribble":
        xs = np.linspace(30, s * 1.6 + 20, 14)
        ys = 30 + rng.uniform(0, s, 14)
        cv2.polylines(canvas, [np.column_stack([xs, ys]).astype(np.int32)], False, 255, t, cv2.LINE_AA)
    else:  # an empty form box
        cv2.rectangle(canvas, (j(30), j(30)), (j(int(s * 1.4)), j(s + 20)), 255, t // 2 + 2, cv2.LINE_AA)
    return _jitter(canvas.astype(np.float32) / 255.0, height, rng)


def number_scan(
    ink: np.ndarray, text: str, variation: str, flavour: str, rng: np.random.Generator, layout: str
) -> NumberScan:
    """Any ink (a number, a letter, a mark) on a page made to look like `variation`."""
    rgb, alpha = render_page(ink, variation, rng)
    if alpha is not None and not flavour.startswith(("gray_alpha", "rgba", "palette_alpha")):
        flavour = "rgba8"
    return NumberScan(pngwrite.encode_flavour(rgb, alpha, flavour), text, variation, flavour, layout)


LAYOUTS = {
    "spaced": {"spacing": (0.15, 0.45)},
    "uneven": {"spacing": (0.05, 1.0)},
    "touching": {"spacing": (-0.06, 0.0)},
    "drift": {"spacing": (0.1, 0.3), "drift": 0.12},
    "overlap": {"spacing": (-0.15, -0.05)},
}


def mnist_number_scans(
    images: np.ndarray, labels: np.ndarray, count: int, length: int | tuple[int, int],
    rng: np.random.Generator, *, layout: str = "spaced", variation: str = "clean",
    broken: bool = False,
) -> Iterator[NumberScan]:
    """`count` scans of numbers made of MNIST (test) digits, `length` digits each
    (or a random length in [lo, hi])."""
    lo, hi = (length, length) if isinstance(length, int) else length
    for i in range(count):
        n = int(rng.integers(lo, hi + 1))
        idx = rng.choice(len(images), n, replace=False)
        height = int(rng.integers(28, 90))
        ink = ink_from_number(
            [images[k] for k in idx], height, rng, **LAYOUTS[layout],
            broken=int(rng.integers(n)) if broken else None,
        )
        text = "".join(str(int(labels[k])) for k in idx)
        flavour = pngwrite.FLAVOURS[i % len(pngwrite.FLAVOURS)]
        yield number_scan(ink, text, variation, flavour, rng, layout + ("+broken" if broken else ""))
