"""Synthetic training and evaluation data: what the classifier must refuse, and
digits in other hands. Pure numpy and OpenCV (no TensorFlow).

Everything here is drawn as float ink (high = ink) at roughly the scale the
scan pipeline works at, then passed through the same crop normalization that
serving applies to a digit it found on a page (`to_mnist`: stroke width
brought toward MNIST's, then `imaging.mnist_box`), so training and serving see
the same kind of 28x28 input.

Sources: OpenCV's Hershey stroke fonts, geometric shapes and pen marks, and
compositions of MNIST *training* digits (partial digits, touching pairs, a
digit with a piece of its neighbour). The MNIST test split is used only by
`number_strings`/evaluation, never by the training sets built here.

Glyphs left out of the "not a digit" class because, written by hand or once
normalized to a 20 px box, they are digits or look like one (a model taught to
refuse them would also refuse real digits):
  O o Q D U  (0)    I l i j J | ! / \\ ( ) [ ] { }  (1)    Z z ?  (2)
  S s  (5)    G b  (6)    B  (8)    g q  (9)    T  (7)    y  (4)
  ' ` " ,  (a lone short stroke normalized to 20 px is a 1)
"""

from __future__ import annotations

import string
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

from digitwatch.errors import NoInkError
from digitwatch.reader.contract import DIGITS, PAIR_REJECT, PAIR_WIDTH, SIDE
from digitwatch.reader.imaging import finish, finish_pair, mnist_box, pair_box

FACES = [
    cv2.FONT_HERSHEY_SIMPLEX,
    cv2.FONT_HERSHEY_PLAIN,
    cv2.FONT_HERSHEY_DUPLEX,
    cv2.FONT_HERSHEY_COMPLEX,
    cv2.FONT_HERSHEY_TRIPLEX,
    cv2.FONT_HERSHEY_COMPLEX_SMALL,
    cv2.FONT_HERSHEY_SCRIPT_SIMPLEX,
    cv2.FONT_HERSHEY_SCRIPT_COMPLEX,
]
# Evaluation's letters come from a face training never drew letters in, so the
# reported refusal rate measures generalization, not memory of glyph shapes.
HELD_OUT_FACE = cv2.FONT_HERSHEY_SCRIPT_COMPLEX
TRAIN_FACES = [f for f in FACES if f != HELD_OUT_FACE]

# Glyphs a digit may honestly be read as (an O is a 0, a | or a / a 1): never
# taught as "not a digit". Brackets, ! and ? were once here too, and read as a
# sure 1 (or 7) on their own: 40 of 40 "(" and 39 of 40 "[" ok as "1".
LOOKALIKES = set("OoQDUIlijJ|/\\Zz'`SsGbBgqTy\",")
SYMBOLS = "#$%&*+-<=>@^~:;\"'`_,.()[]{}!?"
LETTERS = "".join(c for c in string.ascii_letters if c not in LOOKALIKES)
GLYPHS = LETTERS + "".join(c for c in SYMBOLS if c not in LOOKALIKES)

WORK = 80  # drawing scale: a glyph about this many pixels tall


# ---------------------------------------------------------------- shared steps


def to_mnist(ink: np.ndarray) -> np.ndarray:
    """Float ink (high = ink) -> the (28, 28) float32 input serving would make of it."""
    ink = np.clip(ink.astype(np.float32, copy=False), 0.0, 1.0)
    ink = np.where(ink > 0.04, ink, 0.0).astype(np.float32)  # anti-aliasing dust is not ink
    mask = (ink > 0.35).astype(np.uint8)
    if mask.any():
        try:
            return finish(ink, ink, mask)  # what serving does with one digit's ink
        except NoInkError:
            pass
    return mnist_box(ink)  # faint drawings (no ink above the mask level) still become an input


def _trim(ink: np.ndarray, pad: int = 4) -> np.ndarray:
    ys, xs = np.nonzero(ink > 0.04)
    if len(ys) == 0:
        return ink
    ink = ink[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    return cv2.copyMakeBorder(ink, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=0)


def slant(ink: np.ndarray, rng: np.random.Generator, *, angle: float = 12, shear: float = 0.3) -> np.ndarray:
    """Rotate and shear a little, as hands do."""
    ink = _trim(ink, pad=max(ink.shape) // 2)
    c = (ink.shape[1] / 2, ink.shape[0] / 2)
    m = cv2.getRotationMatrix2D(c, rng.uniform(-angle, angle), 1.0)
    s = rng.uniform(-shear, shear)
    m[0, 1] += s
    m[0, 2] -= s * c[1]
    ink = cv2.warpAffine(ink, m, (ink.shape[1], ink.shape[0]), flags=cv2.INTER_LINEAR)
    return _trim(ink)


def glyph_ink(text: str, face: int, rng: np.random.Generator, *, italic: bool | None = None) -> np.ndarray:
    """`text` in a Hershey face, random pen width, slanted and jittered."""
    if italic is None:
        italic = bool(rng.random() < 0.3)
    font = face | (cv2.FONT_ITALIC if italic else 0)
    scale = 3.0
    (tw, th), base = cv2.getTextSize(text, font, scale, 1)
    # Pen width relative to glyph height: from fine pen to marker.
    thickness = max(1, int(round((th + base) * rng.uniform(0.06, 0.2))))
    canvas = np.zeros((th + base + 4 * thickness + 20, tw + 4 * thickness + 20), np.uint8)
    cv2.putText(canvas, text, (10 + 2 * thickness, th + 10 + 2 * thickness), font, scale, 255,
                thickness, cv2.LINE_AA)
    return slant(canvas.astype(np.float32) / 255.0, rng)


def _chaikin(pts: np.ndarray, rounds: int = 3) -> np.ndarray:
    """Corner-cutting: polylines become pen-like curves."""
    for _ in range(rounds):
        if len(pts) > 2:
            q = 0.75 * pts[:-1] + 0.25 * pts[1:]
            r = 0.25 * pts[:-1] + 0.75 * pts[1:]
            pts = np.vstack([pts[:1], np.column_stack([q, r]).reshape(-1, 2), pts[-1:]])
    return pts


def _draw(strokes: list[np.ndarray], rng: np.random.Generator, *, smooth: bool = True,
          width: float | None = None) -> np.ndarray:
    """Polylines in unit coordinates (about 0-1) drawn at WORK scale."""
    canvas = np.zeros((2 * WORK, 2 * WORK), np.uint8)
    t = int(round(WORK * (width if width is not None else rng.uniform(0.05, 0.14))))
    for pts in strokes:
        pts = _chaikin(pts) if smooth else pts
        xy = np.round((WORK / 2 + pts * WORK) * 4).astype(np.int32)
        cv2.polylines(canvas, [xy], False, 255, max(1, t), cv2.LINE_AA, shift=2)
    return canvas.astype(np.float32) / 255.0


# ---------------------------------------------------------------- things that are not digits


def letter(rng: np.random.Generator, faces: list[int] = TRAIN_FACES) -> np.ndarray:
    return glyph_ink(GLYPHS[rng.integers(len(GLYPHS))], faces[rng.integers(len(faces))], rng)


def warp(ink: np.ndarray, rng: np.random.Generator, *, amount: float = 0.06, smooth: float = 0.12) -> np.ndarray:
    """A smooth random displacement (elastic distortion): a font's even strokes
    bent the way a hand bends them. Displacements are up to about `amount` of
    the drawing's size, varying over `smooth` of it."""
    h, w = ink.shape
    size = max(h, w)
    sigma = smooth * size
    field = [cv2.GaussianBlur(rng.uniform(-1, 1, (h, w)).astype(np.float32), (0, 0), sigma) for _ in range(2)]
    scale = amount * size / max(float(np.abs(field[0]).max()), float(np.abs(field[1]).max()), 1e-6)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    out = cv2.remap(ink, xs + scale * field[0], ys + scale * field[1], cv2.INTER_LINEAR, borderValue=0)
    return _trim(out)


def handwritten_letter(rng: np.random.Generator, faces: list[int] = TRAIN_FACES) -> np.ndarray:
    """A letter or symbol in a training face, bent as if written by hand."""
    return warp(letter(rng, faces), rng, amount=rng.uniform(0.04, 0.12))


def letter_pair(rng: np.random.Generator, faces: list[int] = TRAIN_FACES) -> np.ndarray:
    """Two letters or a letter and a symbol: what a word or an abbreviation crops to."""
    text = "".join(LETTERS[i] for i in rng.integers(len(LETTERS), size=2))
    ink = glyph_ink(text, faces[rng.integers(len(faces))], rng)
    return warp(ink, rng, amount=rng.uniform(0.03, 0.08)) if rng.random() < 0.5 else ink


def tick(rng: np.random.Generator) -> np.ndarray:
    a = rng.uniform(0.15, 0.35)
    pts = np.array([[0, 0.55], [a, 0.9], [1.0, rng.uniform(-0.1, 0.2)]]) + rng.normal(0, 0.03, (3, 2))
    return slant(_draw([pts], rng, smooth=rng.random() < 0.5), rng)


def cross(rng: np.random.Generator) -> np.ndarray:
    """An x, a +, or an x with a bar: marks, not a 4 or a 7 (arms kept balanced)."""
    j = lambda: rng.normal(0, 0.04, 2)  # noqa: E731
    if rng.random() < 0.6:
        s = [np.array([[0, 0] + j(), [1, 1] + j()]), np.array([[1, 0] + j(), [0, 1] + j()])]
    else:
        s = [np.array([[0.5, 0] + j(), [0.5, 1] + j()]), np.array([[0, 0.5] + j(), [1, 0.5] + j()])]
    return slant(_draw(s, rng, smooth=False), rng)


def scribble(rng: np.random.Generator) -> np.ndarray:
    """A random-walk squiggle: crossed-out writing, a signature stroke."""
    n = int(rng.integers(9, 20))
    pts = np.cumsum(rng.normal(0, 0.35, (n, 2)), axis=0)
    pts[:, 0] += np.linspace(0, rng.uniform(1.5, 4.0), n)  # wider than tall: fewer look like digits
    pts = (pts - pts.min(0)) / max(float(np.ptp(pts, 0).max()), 1e-6)
    ink = slant(_draw([pts], rng, width=rng.uniform(0.03, 0.09)), rng)
    return ink if ink.shape[1] > 1.3 * ink.shape[0] else None


def shape(rng: np.random.Generator) -> np.ndarray:
    """Boxes (a blank form box), wide ellipses, circled or crossed marks, lines, waves."""
    kind = rng.integers(6)
    canvas = np.zeros((2 * WORK, 3 * WORK), np.uint8)
    t = int(rng.integers(2, 12))
    c = (int(1.5 * WORK), WORK)
    if kind == 0:  # a rectangle, any proportion
        w, h = rng.uniform(0.5, 1.4) * WORK, rng.uniform(0.3, 0.9) * WORK
        cv2.rectangle(canvas, (int(c[0] - w), int(c[1] - h / 2)), (int(c[0] + w), int(c[1] + h / 2)), 255, t)
    elif kind == 1:  # an ellipse clearly wider than tall (a round one is a 0)
        h = rng.uniform(0.2, 0.5) * WORK
        cv2.ellipse(canvas, c, (int(h * rng.uniform(1.8, 3.0)), int(h)), 0, 0, 360, 255, t, cv2.LINE_AA)
    elif kind == 2:  # a circle with a mark inside
        r = int(rng.uniform(0.4, 0.8) * WORK)
        cv2.circle(canvas, c, r, 255, t, cv2.LINE_AA)
        if rng.random() < 0.5:
            cv2.circle(canvas, c, max(2, r // 5), 255, -1, cv2.LINE_AA)
        else:
            d = int(r * 0.7)
            cv2.line(canvas, (c[0] - d, c[1] - d), (c[0] + d, c[1] + d), 255, t, cv2.LINE_AA)
            cv2.line(canvas, (c[0] - d, c[1] + d), (c[0] + d, c[1] - d), 255, t, cv2.LINE_AA)
    elif kind == 3:  # a line within 30 degrees of horizontal (a steep one is a 1)
        a = np.deg2rad(rng.uniform(-30, 30))
        d = rng.uniform(0.6, 1.4) * WORK
        p = (int(c[0] - d * np.cos(a)), int(c[1] - d * np.sin(a)))
        q = (int(c[0] + d * np.cos(a)), int(c[1] + d * np.sin(a)))
        cv2.line(canvas, p, q, 255, t, cv2.LINE_AA)
    elif kind == 4:  # a wave or zig-zag
        x = np.linspace(-1.3, 1.3, int(rng.integers(4, 9)))
        y = 0.25 * np.where(np.arange(len(x)) % 2, 1, -1) * rng.uniform(0.3, 1.0)
        return slant(_draw([np.column_stack([x, y + 0.5])], rng, smooth=rng.random() < 0.5), rng)
    else:  # a triangle or a star-like polygon
        k = int(rng.choice([3, 5, 6]))
        ang = np.linspace(0, 2 * np.pi, k + 1) + rng.uniform(0, np.pi)
        r = rng.uniform(0.4, 0.8) * WORK
        step = 2 if k == 5 else 1
        idx = (np.arange(k + 1) * step) % k
        pts = np.column_stack([c[0] + r * np.cos(ang[idx]), c[1] + r * np.sin(ang[idx])])
        cv2.polylines(canvas, [pts.astype(np.int32)], True, 255, t, cv2.LINE_AA)
    return slant(canvas.astype(np.float32) / 255.0, rng, angle=8, shear=0.15)


def smudge(rng: np.random.Generator) -> np.ndarray:
    """A blot, a thumb print, a filled irregular blob."""
    canvas = np.zeros((2 * WORK, 2 * WORK), np.float32)
    for _ in range(int(rng.integers(1, 4))):
        k = int(rng.integers(5, 10))
        ang = np.sort(rng.uniform(0, 2 * np.pi, k))
        r = WORK * rng.uniform(0.2, 0.6) * rng.uniform(0.6, 1.0, k)
        cx, cy = WORK + rng.normal(0, WORK / 5, 2)
        pts = np.column_stack([cx + r * np.cos(ang), cy + r * np.sin(ang)]).astype(np.int32)
        cv2.fillPoly(canvas, [pts], float(rng.uniform(0.6, 1.0)), cv2.LINE_AA)
    canvas = cv2.GaussianBlur(canvas, (0, 0), rng.uniform(1, 8))
    return np.clip(canvas / max(float(canvas.max()), 1e-6), 0, 1)


def specks(rng: np.random.Generator) -> np.ndarray:
    """Scattered dots and dust: what an empty box with a dirty scanner gives."""
    canvas = np.zeros((2 * WORK, 2 * WORK), np.uint8)
    for _ in range(int(rng.integers(3, 25))):
        r = int(rng.integers(1, 6))
        cv2.circle(canvas, tuple(int(v) for v in rng.integers(0, 2 * WORK, 2)), r, 255, -1, cv2.LINE_AA)
    return canvas.astype(np.float32) / 255.0


def _mnist_ink(image: np.ndarray) -> np.ndarray:
    """An MNIST digit at WORK scale as float ink."""
    big = cv2.resize(image.astype(np.float32) / 255.0, (4 * SIDE, 4 * SIDE), interpolation=cv2.INTER_CUBIC)
    return np.clip(big, 0, 1)


def _columns(ink: np.ndarray) -> tuple[int, int]:
    xs = np.flatnonzero(ink.max(0) > 0.1)
    return int(xs[0]), int(xs[-1]) + 1


def partial_digit(rng: np.random.Generator, images: np.ndarray, labels: np.ndarray) -> np.ndarray | None:
    """The left or right 40-55% of a digit: what a cut through the middle of one gives.
    Ones and sevens are skipped; so are pieces that are one
    upright stroke (they would be a 1)."""
    i = int(rng.integers(len(images)))
    if labels[i] in (1, 7):  # any part of a 1, and the right part of a 7, are digits
        return None
    ink = _mnist_ink(images[i])
    x0, x1 = _columns(ink)
    cut = x0 + int((x1 - x0) * rng.uniform(0.4, 0.55))
    piece = ink.copy()
    if rng.random() < 0.5:
        piece[:, cut:] = 0
    else:
        piece[:, :cut] = 0
    piece = _trim(piece)
    if not piece.any() or piece.shape[0] > 2.5 * piece.shape[1]:
        return None
    return piece


def _side_by_side(left: np.ndarray, right: np.ndarray, rng: np.random.Generator, gap: float) -> np.ndarray:
    """Place `right` after `left` with `gap` (fraction of left's ink width; negative overlaps)."""
    lx0, lx1 = _columns(left)
    rx0, rx1 = _columns(right)
    left, right = left[:, lx0:lx1], right[:, rx0:rx1]
    dy = int(rng.normal(0, 0.06) * left.shape[0])
    offset = max(0, left.shape[1] + int(gap * left.shape[1]))
    h = max(left.shape[0], right.shape[0]) + abs(dy) + 2
    out = np.zeros((h, max(left.shape[1], offset + right.shape[1]) + 2), np.float32)
    out[: left.shape[0], : left.shape[1]] = left
    y = max(0, dy)
    region = out[y : y + right.shape[0], offset : offset + right.shape[1]]
    np.maximum(region, right[: region.shape[0], : region.shape[1]], out=region)
    return _trim(out)


def touching_pair(rng: np.random.Generator, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Two digits touching, overlapping a little or nearly touching, as one crop."""
    i, j = rng.integers(len(images), size=2)
    return _side_by_side(_mnist_ink(images[i]), _mnist_ink(images[j]), rng, rng.uniform(-0.3, 0.1))


def digit_with_fragment(rng: np.random.Generator, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """A digit plus 35-60% of its neighbour: a cut made in the wrong place."""
    i, j = rng.integers(len(images), size=2)
    whole, other = _mnist_ink(images[i]), _mnist_ink(images[j])
    x0, x1 = _columns(other)
    part = other.copy()
    keep = int((x1 - x0) * rng.uniform(0.35, 0.6))
    if rng.random() < 0.5:  # the left part of the next digit, after this one
        part[:, x0 + keep :] = 0
        return _side_by_side(whole, part, rng, rng.uniform(-0.15, 0.1))
    part[:, : x1 - keep] = 0  # the right part of the previous digit, before this one
    return _side_by_side(part, whole, rng, rng.uniform(-0.15, 0.1))


@dataclass(frozen=True)
class RejectKind:
    name: str
    weight: float
    make: Callable[..., np.ndarray | None]
    needs_digits: bool = False


REJECT_KINDS = [
    RejectKind("letter", 0.30, letter),
    RejectKind("handwritten_letter", 0.15, handwritten_letter),
    RejectKind("letter_pair", 0.06, letter_pair),
    RejectKind("tick", 0.05, tick),
    RejectKind("cross", 0.05, cross),
    RejectKind("scribble", 0.10, scribble),
    RejectKind("shape", 0.10, shape),
    RejectKind("smudge", 0.04, smudge),
    RejectKind("specks", 0.03, specks),
    RejectKind("partial_digit", 0.06, partial_digit, needs_digits=True),
    RejectKind("touching_pair", 0.12, touching_pair, needs_digits=True),
    RejectKind("digit_with_fragment", 0.09, digit_with_fragment, needs_digits=True),
]


def reject_ink(kind: RejectKind, rng: np.random.Generator, images: np.ndarray | None = None,
               labels: np.ndarray | None = None) -> np.ndarray:
    """One drawing of `kind`, retried until it has ink (some draws are refused as digit-like)."""
    for _ in range(20):
        ink = kind.make(rng, images, labels) if kind.needs_digits else kind.make(rng)
        if ink is not None and float(ink.max()) > 0.3:
            return ink
    raise RuntimeError(f"could not draw a {kind.name}")  # pragma: no cover - 20 refusals in a row


def rejects(count: int, rng: np.random.Generator, images: np.ndarray, labels: np.ndarray,
            kinds: list[RejectKind] = REJECT_KINDS) -> tuple[np.ndarray, list[str]]:
    """`count` normalized non-digits (N, 28, 28) and the kind of each. `images`
    and `labels` are the MNIST digits compositions are made of (training split
    for training)."""
    weights = np.array([k.weight for k in kinds])
    picks = rng.choice(len(kinds), size=count, p=weights / weights.sum())
    out = np.empty((count, SIDE, SIDE), np.float32)
    for n, k in enumerate(picks):
        out[n] = to_mnist(reject_ink(kinds[k], rng, images, labels))
    return out, [kinds[k].name for k in picks]


def font_digits(count: int, rng: np.random.Generator, faces: list[int] = FACES) -> tuple[np.ndarray, np.ndarray]:
    """Hershey-font digits, slanted and in any pen width: labelled 0-9, 'other hands'."""
    labels = rng.integers(DIGITS, size=count).astype(np.uint8)
    out = np.empty((count, SIDE, SIDE), np.float32)
    for n, d in enumerate(labels):
        out[n] = to_mnist(glyph_ink(str(int(d)), faces[rng.integers(len(faces))], rng))
    return out, labels


def renormalized(images: np.ndarray) -> np.ndarray:
    """MNIST digits passed through the same crop normalization as everything
    drawn here. Without these, every drawn non-digit carries the pipeline's
    look and MNIST's own digits do not, and a model can learn "pipeline look
    = not a digit": real scans (which all have that look) then get refused."""
    return np.stack([to_mnist(_mnist_ink(img)) for img in images]).astype(np.float32)


# Grids a low-resolution digit is sampled on, in pixels along its longer side:
# fax and form scans at 100 dpi, thumbnails, 8x8 sensor grids. Below 6 the
# digits themselves stop being readable.
LOW_RES_SIDES = (6, 16)


def low_res_ink(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An MNIST digit as a low-resolution source would deliver it, back at WORK
    scale: sampled on a coarse grid (area average: each cell is the share of
    ink in it), sometimes bilevel first (a fax thresholds before it samples),
    sometimes quantized to few grey levels, then enlarged the way a viewer or
    scanner driver does (cubic, linear or blocky nearest)."""
    ink = _trim(image.astype(np.float32) / 255.0, pad=0)
    if rng.random() < 0.35:  # bilevel before sampling: cells become ink counts
        ink = (ink > rng.uniform(0.3, 0.6)).astype(np.float32)
    for _ in range(8):  # a faint digit on a coarse grid can round away to nothing: sample again
        big = _low_res_once(ink, rng)
        if (big > 0.35).any():
            return big
    return _mnist_ink(image)


def _low_res_once(ink: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    side = int(rng.integers(LOW_RES_SIDES[0], LOW_RES_SIDES[1] + 1))
    h, w = ink.shape
    scale = side / max(h, w)
    small = cv2.resize(ink, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    small = np.clip(small * rng.uniform(1.0, 1.8), 0, 1)  # thin strokes fill only part of a cell
    levels = int(rng.choice([2, 5, 17, 256]))
    small = np.round(small * (levels - 1)) / (levels - 1)
    small = cv2.copyMakeBorder(small, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    interpolation = [cv2.INTER_CUBIC, cv2.INTER_LINEAR, cv2.INTER_NEAREST][int(rng.choice(3, p=[0.5, 0.3, 0.2]))]
    big = cv2.resize(small, None, fx=WORK / side, fy=WORK / side, interpolation=interpolation)
    return np.clip(big, 0, 1)


def low_res(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """MNIST digits as low-resolution scans, each the (28, 28) input serving makes of it."""
    return np.stack([to_mnist(low_res_ink(img, rng)) for img in images]).astype(np.float32)


# ---------------------------------------------------------------- numbers (evaluation)


def number_strings(count: int, rng: np.random.Generator, lengths: tuple[int, int] = (1, 12)) -> list[str]:
    """Digit strings with lengths spread evenly over [lo, hi]."""
    lo, hi = lengths
    out = []
    for n in range(count):
        length = lo + n % (hi - lo + 1)
        out.append("".join(str(int(d)) for d in rng.integers(DIGITS, size=length)))
    return out


def number_ink(text: str, images: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A handwritten number made of MNIST digits (pass the TEST split for evaluation):
    uneven spacing (some pairs touching), a drifting baseline, a little size jitter."""
    by_digit = [np.flatnonzero(labels == d) for d in range(DIGITS)]
    pieces = []
    for ch in text:
        pool = by_digit[int(ch)]
        ink = _mnist_ink(images[pool[rng.integers(len(pool))]])
        s = rng.uniform(0.9, 1.1)
        ink = cv2.resize(ink, None, fx=s, fy=s, interpolation=cv2.INTER_LINEAR)
        x0, x1 = _columns(ink)
        pieces.append(ink[:, x0:x1])
    height = max(p.shape[0] for p in pieces)
    drift = rng.normal(0, 0.04) * height  # per digit
    xs, x = [], 0
    for p in pieces:
        xs.append(x)
        x += p.shape[1] + int(height * rng.choice([rng.uniform(-0.05, 0.0), rng.uniform(0.02, 0.3)], p=[0.15, 0.85]))
    width = max(x0 + p.shape[1] for x0, p in zip(xs, pieces, strict=True)) + 4
    lift = [int(abs(drift) * len(pieces)) + int(round(drift * k)) for k in range(len(pieces))]
    canvas = np.zeros((height + 2 * int(abs(drift) * len(pieces)) + 8, width), np.float32)
    for x0, y0, p in zip(xs, lift, pieces, strict=True):
        region = canvas[y0 + 4 : y0 + 4 + p.shape[0], x0 : x0 + p.shape[1]]
        np.maximum(region, p[: region.shape[0], : region.shape[1]], out=region)
    return _trim(canvas, pad=8)


# ---------------------------------------------------------------- pairs (the pair model)


def to_pair(ink: np.ndarray) -> np.ndarray:
    """Float ink (high = ink) -> the (28, 56) float32 picture serving makes of a pair."""
    ink = np.clip(ink.astype(np.float32, copy=False), 0.0, 1.0)
    ink = np.where(ink > 0.04, ink, 0.0).astype(np.float32)
    mask = (ink > 0.35).astype(np.uint8)
    if mask.any():
        try:
            return finish_pair(ink, ink, mask)
        except NoInkError:
            pass
    return pair_box(ink)


def _one_digit(rng: np.random.Generator, images: np.ndarray, index: int) -> np.ndarray:
    """An MNIST digit at WORK scale, its size and pen width jittered as another hand would."""
    ink = _mnist_ink(images[index])
    s = rng.uniform(0.85, 1.15)
    ink = cv2.resize(ink, None, fx=s * rng.uniform(0.85, 1.15), fy=s, interpolation=cv2.INTER_LINEAR)
    if rng.random() < 0.3:
        k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))
        ink = cv2.dilate(ink, k) if rng.random() < 0.6 else cv2.erode(ink, k)
    return _trim(ink)


def digit_pair(rng: np.random.Generator, images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Two digits touching or overlapping (up to 40% of the first's width), or
    just apart, as one drawing; label 10*a + b. One in four is drawn in a
    Hershey training face instead of MNIST's hand, half of those bent as a
    hand bends them (other hands: fonts, markers, pens)."""
    gap = rng.uniform(-0.4, 0.12)
    if rng.random() < 1 / 4:
        a, b = (int(v) for v in rng.integers(DIGITS, size=2))
        face = TRAIN_FACES[int(rng.integers(len(TRAIN_FACES)))]
        ink = _side_by_side(glyph_ink(str(a), face, rng), glyph_ink(str(b), face, rng), rng, gap)
        if rng.random() < 0.5:
            ink = warp(ink, rng, amount=rng.uniform(0.03, 0.08))
        return ink, a * DIGITS + b
    i, j = rng.integers(len(images), size=2)
    ink = _side_by_side(_one_digit(rng, images, i), _one_digit(rng, images, j), rng, gap)
    if rng.random() < 0.5:
        ink = slant(ink, rng, angle=6, shear=0.15)
    return ink, int(labels[i]) * DIGITS + int(labels[j])


def _single_digit(rng: np.random.Generator, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """One digit as it is written, or in a Hershey face: a single digit is not a pair."""
    if rng.random() < 0.2:
        return glyph_ink(str(int(rng.integers(DIGITS))), TRAIN_FACES[int(rng.integers(len(TRAIN_FACES)))], rng)
    return _one_digit(rng, images, int(rng.integers(len(images))))


def _wide_digit(rng: np.random.Generator, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """One digit drawn wide: a 0 or a 2 can be as wide as two digits."""
    ink = _mnist_ink(images[int(rng.integers(len(images)))])
    return _trim(cv2.resize(ink, None, fx=rng.uniform(1.0, 2.2), fy=1.0, interpolation=cv2.INTER_LINEAR))


def _three_digits(rng: np.random.Generator, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Three digits in one blob: a pair is two, not three."""
    i, j, k = rng.integers(len(images), size=3)
    two = _side_by_side(_one_digit(rng, images, i), _one_digit(rng, images, j), rng, rng.uniform(-0.3, 0.0))
    return _side_by_side(two, _one_digit(rng, images, k), rng, rng.uniform(-0.15, 0.0))


def _pieces_pair(rng: np.random.Generator, images: np.ndarray, labels: np.ndarray) -> np.ndarray | None:
    """Half a digit beside half of another: a span between two wrong cuts."""
    halves = []
    for _ in range(40):  # partial_digit refuses ones, sevens and upright strokes
        half = partial_digit(rng, images, labels)
        if half is not None:
            halves.append(half)
            if len(halves) == 2:
                return _side_by_side(halves[0], halves[1], rng, rng.uniform(-0.2, 0.05))
    return None


# What a pair candidate may hold that is not two digits.
PAIR_REJECT_KINDS = [
    RejectKind("single_digit", 0.30, _single_digit, needs_digits=True),
    RejectKind("wide_digit", 0.15, _wide_digit, needs_digits=True),
    RejectKind("digit_with_fragment", 0.20, digit_with_fragment, needs_digits=True),
    RejectKind("three_digits", 0.12, _three_digits, needs_digits=True),
    RejectKind("pieces", 0.08, _pieces_pair, needs_digits=True),
    RejectKind("letter_pair", 0.15, letter_pair),
    RejectKind("letter", 0.08, letter),
    RejectKind("handwritten_letter", 0.10, handwritten_letter),
    RejectKind("scribble", 0.07, scribble),
    RejectKind("shape", 0.04, shape),
    RejectKind("cross", 0.04, cross),
]


def _threads(ink: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """What a ruled line leaves once the line remover took its straight run:
    thin horizontal threads through and beside the digits, some running past
    the drawing's sides. Drawn on pairs and non-pairs alike, so a thread is
    no evidence either way."""
    h, w = ink.shape
    out = cv2.copyMakeBorder(ink, 0, 0, int(0.3 * h), int(0.3 * h), cv2.BORDER_CONSTANT, value=0)
    for _ in range(int(rng.integers(1, 3))):
        y = int(rng.uniform(0.2, 0.85) * h)
        x0 = int(rng.uniform(0.0, 0.5) * out.shape[1])
        x1 = min(out.shape[1], x0 + int(rng.uniform(0.3, 1.0) * out.shape[1]))
        t = int(rng.integers(2, 6))
        out[y : y + t, x0:x1] = np.maximum(out[y : y + t, x0:x1], rng.uniform(0.5, 1.0))
    return _trim(out)


def pair_samples(count: int, rng: np.random.Generator, images: np.ndarray, labels: np.ndarray,
                 reject_share: float = 0.4) -> tuple[np.ndarray, np.ndarray]:
    """`count` pair pictures (N, 28, 56) float32 and their classes (10*a + b, or
    contract.PAIR_REJECT). `images`/`labels`: the MNIST digits they are made of."""
    weights = np.array([k.weight for k in PAIR_REJECT_KINDS])
    out = np.empty((count, SIDE, PAIR_WIDTH), np.float32)
    classes = np.empty(count, np.int64)
    for n in range(count):
        if rng.random() < reject_share:
            kind = PAIR_REJECT_KINDS[int(rng.choice(len(weights), p=weights / weights.sum()))]
            ink, cls = reject_ink(kind, rng, images, labels), PAIR_REJECT
        else:
            ink, cls = digit_pair(rng, images, labels)
        if rng.random() < 0.25:
            ink = _threads(ink, rng)
        out[n], classes[n] = to_pair(ink), cls
    return out, classes
