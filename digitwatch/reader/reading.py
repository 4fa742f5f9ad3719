"""Reading a scan as a string of digits: cut the cleaned ink into candidate
digits, let the classifier score every candidate at once, pick the best cut.

The page is cleaned exactly as for a single digit (imaging.work_region:
polarity, paper, ruled lines, specks). Its ink is then split into *atoms*,
left to right: connected pieces, with pieces stacked above one another (a
broken 8, a 5 whose bar floats free) joined first, and pieces too wide for one
digit (touching digits) sliced at the columns where the ink is thinnest.

A candidate digit is a run of consecutive atoms at most MAX_WIDTH heights wide
(or one whole piece, however wide); each is normalized to 28x28 exactly like
a single digit. One classifier call scores
them all, and a dynamic programme over atom boundaries picks the reading
whose digits are most probable (shape priors penalize candidates too wide or
too short to be a digit; a model with a reject class penalizes fragments and
non-digits by itself). How much better that reading is than every other way
of cutting the same ink is the *segmentation certainty*; the answer's
confidence is the product of its digits' probabilities times that certainty.

A scan whose ink is one blob of digit-like proportions is the fast path:
one candidate, normalized exactly as before numbers were read.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np

from digitwatch.errors import NoInkError
from digitwatch.reader import imaging
from digitwatch.reader.confidence import MAX_FITTED_LENGTH, AnswerCalibration, Evidence, Thresholds
from digitwatch.reader.contract import DIGITS, PAIR_REJECT, REJECT
from digitwatch.results import STATUS_LOW, STATUS_OK

# Reasons a reading is not ok (the `reason` field).
REASON_LOW = "low confidence"
REASON_NOT_DIGIT = "not a digit"
REASON_UNREAD = "more writing on the page than was read"

MAX_WIDTH = 1.6  # no candidate joining atoms is wider than this many digit heights
WIDTH_COST = 6.0  # log-odds per digit height against a digit wider than WIDE_DIGIT heights
WIDE_DIGIT = 0.9
SHORT_COST = 20.0  # log-odds per digit height against a digit shorter than SHORT_DIGIT (a bar, a dash)
SHORT_DIGIT = 0.55  # of the digit height: shorter than this is more likely a bar or a dash
SINGLE_ASPECT = 0.85  # one blob at most this wide per height is read as one digit, uncut
PINCH_ASPECT = 0.5  # ... unless it is at least this wide and pinched:
PINCH = 0.3  # somewhere inside, its columns hold at most this share of the usual ink
CUT_ASPECT = 0.85  # blobs wider than this per digit height are offered cuts
# Log-odds against ending a digit at a cut rather than at a gap in the ink
# (paid once per cut, so cuts are used only where the classifier much prefers
# the pieces); the same with and without the reject class.
CUT_COST = 1.0
MIN_PART = 0.15  # a cut leaves at least this many digit heights on each side
CUT_SPACING = 0.2  # candidate cuts at least this many digit heights apart
# A scan whose ink is one blob is most often one digit (however wide): cutting
# it costs this many cut costs, as much as cuts cost before they drifted.
LONE_CUT = 3.0
CUTS_PER = 0.5  # a blob is offered at most one cut per this many digit heights of its width
CUT_ROWS = (0.5,)  # cut paths are sought through these rows (share of the blob's height)
LONE_CUTS_PER = 0.5  # ... and a lone blob one per this many
DRIFT_ASPECT = 1.1  # only blobs wider than this per digit height (surely two digits) get drifting cuts
CUT_STEP = 0.5  # a cut path pays this much ink (pixels) per column it drifts sideways
BOX_INSIDE = 0.25  # ink of a box's own blob inside its outline this tall (of the box) is a digit touching it
ENCLOSED = 0.3  # a hollow outline with ink this tall (of its height) inside is a ring drawn round it
BOX_STRAIGHT = 0.06  # a box's outline strays at most this share of its size from 4 straight sides
MAX_DIGITS = 64  # the longest reading considered when no length is given
# Pair candidates (read by the pair model as two digits at once): ink within
# one connected piece, this many digit heights wide. Reading a span as a pair
# costs PAIR_COST log-odds (LONE_PAIR on a page whose ink is one blob: most
# often one digit, or a letter), so a pair wins only where the digit model
# cannot read the same ink as well cut apart (tuning: docs/design/reading.md).
PAIR_WIDTHS = (0.9, 1.8)
PAIR_COST = 1.5
LONE_PAIR = 3.5
# A stretch of connected ink (a page's one blob, or a piece of a longer
# reading) cut into two digits, while the pair model, shown it whole, says
# it is not two digits this surely: a letter whose strokes cut like digits
# (V as "11", n as "17", % as "96"), not a number (_cut_not_a_pair). Two
# touching digits the pair model reads as such. A lone blob is
# shown to the pair model whole from LONE_PAIR_WIDTH heights wide (a V is
# 0.86-0.90, under PAIR_WIDTHS: it was read "11" and ok, unasked), also one
# narrow enough for the single-digit fast path: two digits overlapping
# heavily make a blob no wider than one digit.
LONE_NOT_PAIR = 0.99
LONE_PAIR_WIDTH = 0.6
# Where the pair model saw the same ink as a single-digit candidate, that
# candidate also pays log P(not two digits) x PAIR_VETO: the digit model reads
# a 1 overlapping an 8 as a sure "8", and only the pair model knows better.
PAIR_VETO = 1.0
# A stroke read as a 1 in a longer answer, standing SLASH_TALL times taller
# than the answer's other digits and leaning (top to the right) SLASH_LEAN
# more than they do (shear: the x-y moment over the y-y moment), is a slash,
# not a 1: dates read "12105126" and ok before (docs/design/reading.md).
SLASH_TALL = 1.1
SLASH_LEAN = 0.2
# Ink this many pixels from its edge, in the 28x28 input (20 px box), is a
# filled mark, not a digit's stroke: a filled disc measures 9.5, the boldest
# of MNIST's 10,000 test digits 6.0, marker-pen scans 4.2. The digit model
# read a blacked-in form bubble as a sure "0" (ok at 0.96).
FILLED = 8.0

# Pieces of ink before they are read (shares of the digit height unless said).
TAIL_THIN = 0.08  # a column with ink at most this share of a piece's height is a ruled line's tail
TAIL_KEEP = 0.3  # ... trimmed only if at least this much of the piece is left
BOX_MIN_WIDE = 0.6  # a box is at least this wide per its height
BOX_MIN_TALL = 0.3  # ... and at least this tall per its width
BOX_CORNERS = 0.04  # outline simplified to within this share of its length before counting 4 corners
HOLLOW_FILL = 0.5  # an outline whose ink fills at most this share of what it encloses is hollow
BOX_SPAN = 0.8  # ink inside a box spanning this share of it both ways is the rest of its outline
TALL_PIECE = 0.5  # pieces at least this share of the tallest one set the digit height
UNDERLINE_FLAT = 0.25  # a piece flatter than this ...
UNDERLINE_LONG = 1.5  # ... and longer than this is an underline, never a digit
EDGE_KEEP = 0.5  # a piece touching the region's edge is kept only from this size
BIG_PIECE = 0.35  # pieces from this size are digits or parts of them
NEAR_PIECE = 0.2  # a smaller piece is kept only within this distance of a big one
STACK_OVERLAP = 0.6  # pieces sharing this share of the narrower one's columns are one digit
STACK_GAP = 0.15  # ... as are pieces one above the other less than this far apart sideways
CUT_SMOOTH = 0.06  # the ink profile a cut looks for thin columns in is smoothed over this width
CUT_THIN = 0.75  # a column with at most this share of the median ink is thin enough to cut through


@dataclass(frozen=True)
class Constraints:
    """How many digits the answer may have (from --expect / --length)."""

    min_len: int = 1
    max_len: int = MAX_DIGITS

    def describe(self) -> str:
        if self.min_len == self.max_len:
            return f"{self.min_len} digit" + ("s" if self.min_len != 1 else "")
        return f"{self.min_len}-{self.max_len} digits"


def constraints_for(expect: str | None = None, length: str | None = None) -> Constraints:
    """`expect` is "digit" (exactly one) or "number"/None (any); `length` is
    "5" or "4-6". Raises ValueError with a one-line message on anything else."""
    lo, hi = 1, MAX_DIGITS
    if length not in (None, ""):
        text = str(length).strip()
        parts = text.split("-")
        try:
            if len(parts) == 1:
                lo = hi = int(parts[0])
            elif len(parts) == 2:
                lo, hi = int(parts[0]), int(parts[1])
            else:
                raise ValueError
        except ValueError:
            raise ValueError(f"length must be N or MIN-MAX (digits), not {text!r}") from None
        if not 1 <= lo <= hi <= MAX_DIGITS:
            raise ValueError(f"length must be between 1 and {MAX_DIGITS} with MIN <= MAX, not {text!r}")
    if expect not in (None, "", "number", "digit"):
        raise ValueError(f"expect must be 'digit' or 'number', not {expect!r}")
    if expect == "digit":
        if (lo, hi) != (1, MAX_DIGITS) and not lo <= 1 <= hi:
            raise ValueError("--expect digit contradicts the length given")
        lo = hi = 1
    return Constraints(lo, hi)


@dataclass(frozen=True)
class Candidates:
    """A scan cut into atoms, and every candidate digit made of them."""

    crops: np.ndarray  # (K, SIDE, SIDE) float32, MNIST-normalized, one per candidate (contract.SIDE)
    spans: tuple[tuple[int, int], ...]  # atoms [i, j) of each candidate
    prior: np.ndarray  # (K,) log shape prior of each candidate (0: digit-like)
    atoms: int  # how many atoms the ink was cut into
    # (K,) how many cut costs the candidate pays for ending at a cut (0: at a gap)
    cut: np.ndarray | None = None
    shape: np.ndarray | None = None  # (K, 2) width and height of each candidate, in digit heights
    # Pair candidates: spans of touching or overlapping ink the pair model reads
    # as two digits at once (contract.py), each (SIDE, PAIR_WIDTH); their log
    # shape priors and what ending at their last atom costs (like `cut`).
    pairs: np.ndarray | None = None
    pair_spans: tuple[tuple[int, int], ...] = ()
    pair_prior: np.ndarray | None = None
    lone: bool = False  # the ink is one connected piece
    unread: int = 0  # digit-sized blobs elsewhere on the page, not read (imaging.unread)


@dataclass(frozen=True)
class Reading:
    """What a scan says: the digits, how sure, and whether that is good enough."""

    text: str
    digits: tuple[tuple[int, float], ...]  # (digit, probability) left to right
    confidence: float  # probability the whole text is right
    status: str
    reason: str  # why the status is not ok ("" when ok)
    # What the confidence was computed from (fitting the calibration uses it).
    evidence: Evidence | None = field(default=None, compare=False, repr=False)

    @property
    def digit(self) -> int | None:
        """The digit when exactly one was read."""
        return self.digits[0][0] if len(self.digits) == 1 else None


# ---------------------------------------------------------------- cutting


@dataclass
class _Piece:
    x0: int
    y0: int
    x1: int
    y1: int
    labels: list[int]

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def height(self) -> int:
        return self.y1 - self.y0


def read_scan(gray: np.ndarray, *, pairs: bool = True) -> Candidates:
    """A page (gray, uint8 or float in [0, 1]) -> the candidate digits on it.
    `pairs`: also cut the pair model's pictures (False when the model has no
    pair model: nothing would read them). Raises NoInkError when there is
    nothing to read."""
    work = imaging.work_region(gray)
    cands = _cut(work, pairs=pairs)
    return dataclasses.replace(cands, unread=work.unread) if work.unread else cands


def _cut(work: imaging.Work, *, pairs: bool) -> Candidates:
    labels, stats = work.labels, work.stats
    assert labels is not None and stats is not None and work.chosen is not None
    pieces = [
        _Piece(int(s[0]), int(s[1]), int(s[0] + s[2]), int(s[1] + s[3]), [int(i)])
        for i, s in zip(work.chosen, stats[work.chosen], strict=True)
    ]
    if not pieces:
        raise NoInkError("no ink found: the image is blank or only noise")
    if _trim_tails(labels, pieces, work.mask.shape):
        work = imaging.Work(work.ink, work.smooth, (labels > 0).view(np.uint8) & work.mask, labels, stats,
                            work.chosen)
    boxes = [p for p in pieces if _is_box(labels, p)]
    rings = [p for p in pieces if p not in boxes and _encloses(labels, p, pieces)]
    if boxes or rings:
        # A form's box (or a ring drawn round an answer) is not ink to read;
        # the digits inside it are (inside a box, touching it or not).
        inside = [q for b in boxes for q in _inside_box(labels, b)]
        pieces = [p for p in pieces if p not in boxes and p not in rings] + inside
        if not pieces:
            raise NoInkError("no ink found: only an empty box")
        mask = np.isin(labels, [p.labels[0] for p in pieces]).astype(np.uint8)
        work = imaging.Work(work.ink, work.smooth, mask, labels, stats, work.chosen)
    height = _digit_height(pieces)
    pieces = _stack(_drop_strays(pieces, height, work.mask.shape), height)
    height = max(height, _digit_height(pieces))  # a broken digit is as tall as its pieces stacked
    if len(pieces) == 1 and pieces[0].width <= SINGLE_ASPECT * pieces[0].height and not _pinched(work.mask, pieces[0]):
        # The fast path: one digit-like blob, read exactly as a single digit
        # (and, from LONE_PAIR_WIDTH wide, shown whole to the pair model).
        return _one_blob(work, pieces[0], pairs=pairs)
    atoms, cut_after, whole = _atoms(pieces, labels, work.mask, height)
    return _candidates(work, atoms, cut_after, whole, height, pairs=pairs)


def _one_blob(work: imaging.Work, piece: _Piece, *, pairs: bool) -> Candidates:
    """The candidates of a page whose ink is one digit-like blob: the blob as
    one digit, and as one pair picture when it is wide enough for two digits
    overlapping heavily (see LONE_PAIR_WIDTH, PAIR_VETO)."""
    crop = imaging.finish(work.ink, work.smooth, work.mask)[None]
    zero = np.zeros(1, np.float32)
    if pairs and piece.width >= LONE_PAIR_WIDTH * piece.height:
        try:
            pair = imaging.finish_pair(work.ink, work.smooth, work.mask)[None]
        except NoInkError:
            pair = None
        if pair is not None:
            shape = np.array([[piece.width / piece.height, 1.0]], np.float32)
            return Candidates(crop, ((0, 1),), zero, 1, cut=zero, shape=shape, pairs=pair, pair_spans=((0, 1),),
                              pair_prior=zero, lone=True)
    return Candidates(crop, ((0, 1),), zero, 1)


def _trim_tails(labels: np.ndarray, pieces: list[_Piece], shape: tuple[int, int]) -> bool:
    """Cut off hair-thin tails that run from a piece to the region's left or
    right edge: the rest of a ruled line the line remover did not take, still
    attached to the digit it crossed. Returns whether anything was cut."""
    w = shape[1]
    cut = False
    for p in pieces:
        if p.x0 > 0 and p.x1 < w or p.width <= p.height:
            continue
        own = labels[p.y0 : p.y1, p.x0 : p.x1] == p.labels[0]
        thin = own.sum(0) <= max(2, int(TAIL_THIN * p.height))
        a, b = 0, p.width
        if p.x0 == 0:
            while a < b and thin[a]:
                a += 1
        if p.x1 == w:
            while b > a and thin[b - 1]:
                b -= 1
        if (a, b) == (0, p.width) or b - a < TAIL_KEEP * p.height:
            continue
        labels[p.y0 : p.y1, p.x0 : p.x0 + a][own[:, :a]] = 0
        labels[p.y0 : p.y1, p.x0 + b : p.x1][own[:, b:]] = 0
        p.x0, p.x1 = p.x0 + a, p.x0 + b
        rows = np.flatnonzero(own[:, a:b].any(1))
        p.y0, p.y1 = p.y0 + int(rows[0]), p.y0 + int(rows[-1]) + 1
        cut = True
    return cut


def _is_box(labels: np.ndarray, p: _Piece) -> bool:
    """A drawn rectangle (a form's box): a hollow outline whose outer edge is
    a convex quadrilateral, straight to within BOX_STRAIGHT of its size. A 0
    is hollow too, but its outline bulges far from any four straight sides."""
    if p.width < BOX_MIN_WIDE * p.height or p.height < BOX_MIN_TALL * p.width:
        return False
    outline = _hollow_outline(labels, p)
    if outline is None:
        return False
    poly = cv2.approxPolyDP(outline, BOX_CORNERS * cv2.arcLength(outline, True), True)
    if len(poly) != 4 or not cv2.isContourConvex(poly):
        return False
    size = math.sqrt(max(cv2.contourArea(poly), 1.0))
    worst = max(abs(cv2.pointPolygonTest(poly, (float(x), float(y)), True)) for x, y in outline[::3, 0])
    return worst <= BOX_STRAIGHT * size


def _hollow_outline(labels: np.ndarray, p: _Piece) -> np.ndarray | None:
    """The outer outline of a piece (in its box's coordinates) when its ink
    fills at most half of what the outline encloses; None when it is solid."""
    own = (labels[p.y0 : p.y1, p.x0 : p.x1] == p.labels[0]).astype(np.uint8)
    contours, _ = cv2.findContours(own, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    outline = max(contours, key=cv2.contourArea)
    return None if own.sum() > HOLLOW_FILL * cv2.contourArea(outline) else outline


def _inside_box(labels: np.ndarray, box: _Piece) -> list[_Piece]:
    """The ink of a box's own blob inside its outline: digits written touching
    the box (one blob with it). The outline goes (its thickness, the median
    run of ink in from each side, and a little more for the anti-aliased
    edge); what is left, BOX_INSIDE of the box's height or more, gets labels
    of its own in `labels`. Dropped whole with the box, such digits were
    "only an empty box"; kept whole, the box read "0"."""
    region = labels[box.y0 : box.y1, box.x0 : box.x1]
    own = region == box.labels[0]
    h, w = own.shape
    # Each row's and column's run of ink in from either end (argmin of the
    # line with a paper pixel appended: where the first paper pixel is).
    def run_in(lines: np.ndarray) -> np.ndarray:  # per row
        return np.argmin(np.pad(lines, ((0, 0), (0, 1))), 1)

    runs = np.concatenate([run_in(own), run_in(own[:, ::-1]), run_in(own.T), run_in(own.T[:, ::-1])])
    band = int(np.median(runs)) + 2
    if 2 * band >= min(h, w):
        return []
    inner = np.zeros(own.shape, np.uint8)
    inner[band:-band, band:-band] = own[band:-band, band:-band]
    count, parts, stats, _ = cv2.connectedComponentsWithStats(inner, connectivity=8)
    out = []
    next_label = int(labels.max()) + 1
    near = 2 * band + 1
    for k in range(1, count):
        x, y, pw, ph, area = (int(v) for v in stats[k, :5])
        if ph < BOX_INSIDE * h or next_label >= np.iinfo(labels.dtype).max:
            continue
        # Straight, solid ink along a side is the box's own (a hand-drawn
        # side bowing inward) or, from one side to the other, a wall between
        # two boxes of a grid (imaging drops walls when it finds the grid's
        # lines): not a 1.
        straight = bool(imaging.straight(pw, ph, area))
        along = x <= near or x + pw >= w - near if ph >= pw else y <= near or y + ph >= h - near
        across = y <= near and y + ph >= h - near if ph >= pw else x <= near and x + pw >= w - near
        if straight and (along or across) or (pw >= BOX_SPAN * w and ph >= BOX_SPAN * h):
            continue  # ... and what spans the box both ways is the rest of its outline
        region[parts == k] = next_label
        out.append(_Piece(box.x0 + x, box.y0 + y, box.x0 + x + pw, box.y0 + y + ph, [next_label]))
        next_label += 1
    return out


def _encloses(labels: np.ndarray, p: _Piece, pieces: list[_Piece]) -> bool:
    """A hollow outline of any shape (a ring drawn round an answer, a rounded
    box) with a piece of ink inside its hole at least ENCLOSED of its height.
    Kept, the ring read as "0" with the digit inside merged into it (a
    circled 1 read "0", ok). A digit's own loop holds no such piece."""
    inside = [q for q in pieces if q is not p and q.x0 > p.x0 and q.x1 < p.x1 and q.y0 > p.y0 and q.y1 < p.y1
              and q.height >= ENCLOSED * p.height]
    outline = _hollow_outline(labels, p) if inside else None
    if outline is None:
        return False
    # Inside the outline, not merely inside its box (a 7's crook, a 4's arm).
    return any(cv2.pointPolygonTest(outline, ((q.x0 + q.x1) / 2 - p.x0, (q.y0 + q.y1) / 2 - p.y0), False) > 0
               for q in inside)


def _pinched(mask: np.ndarray, p: _Piece) -> bool:
    """Whether a digit-wide blob narrows to a thread somewhere inside (two
    digits touching, a 1 leaning on its neighbour): then it is cut like a
    wide one, though it could be one digit."""
    if p.width < PINCH_ASPECT * p.height:
        return False
    profile = mask[p.y0 : p.y1, p.x0 : p.x1].sum(0).astype(np.float32)
    inner = profile[int(MIN_PART * p.height) : p.width - int(MIN_PART * p.height)]
    return inner.size > 0 and float(inner.min()) <= PINCH * _median(profile[profile > 0])


def _median(values: np.ndarray) -> float:
    """Median by partial sort (np.median costs several times more on small arrays)."""
    i = values.size // 2
    return float(np.partition(values, i)[i])


def _digit_height(pieces: list[_Piece]) -> float:
    """A digit's height: the median height of the tall pieces (each digit of a
    drifting line is still about as tall as the others)."""
    heights = sorted(p.height for p in pieces)
    tall = [h for h in heights if h >= TALL_PIECE * heights[-1]]
    return float(tall[len(tall) // 2])


def _drop_strays(pieces: list[_Piece], height: float, shape: tuple[int, int]) -> list[_Piece]:
    """Drop what cannot be (part of) a digit: flat strokes longer than any digit
    (an underline the line remover missed), small pieces cut by the edge of the
    region (the page's edge, a neighbouring field) and small specks far from the rest."""
    h, w = shape
    kept = [
        p for p in pieces
        if not (p.height < UNDERLINE_FLAT * height and p.width > UNDERLINE_LONG * height)
        and not (min(p.x0, p.y0) == 0 or p.x1 == w or p.y1 == h) or max(p.width, p.height) >= EDGE_KEEP * height
    ]
    big = [p for p in kept if max(p.width, p.height) >= BIG_PIECE * height]
    out = []
    for p in kept:
        if p in big:
            out.append(p)
            continue
        near = any(
            max(q.x0 - p.x1, p.x0 - q.x1) < NEAR_PIECE * height and max(q.y0 - p.y1, p.y0 - q.y1) < NEAR_PIECE * height
            for q in big
        )
        if near:
            out.append(p)
    return out or pieces


def _stack(pieces: list[_Piece], height: float) -> list[_Piece]:
    """Join pieces that share most of their columns, or lie one above the other:
    in one row of digits they are one digit (or touching digits, cut again
    later), never two."""
    pieces = sorted(pieces, key=lambda p: p.x0)
    merged = True
    while merged:
        merged = False
        for a in range(len(pieces)):
            for b in range(a + 1, len(pieces)):
                p, q = pieces[a], pieces[b]
                overlap = min(p.x1, q.x1) - max(p.x0, q.x0)
                above = min(p.y1, q.y1) <= max(p.y0, q.y0)  # no row in common
                if overlap >= STACK_OVERLAP * min(p.width, q.width) or (above and overlap > -STACK_GAP * height):
                    pieces[a] = _Piece(min(p.x0, q.x0), min(p.y0, q.y0), max(p.x1, q.x1),
                                       max(p.y1, q.y1), p.labels + q.labels)
                    del pieces[b]
                    merged = True
                    break
            if merged:
                break
    return sorted(pieces, key=lambda p: (p.x0 + p.x1) / 2)


def _atoms(
    pieces: list[_Piece], labels: np.ndarray, mask: np.ndarray, height: float
) -> tuple[list[np.ndarray], list[float], list[tuple[int, int]]]:
    """Each piece's pixel mask, wide pieces sliced along candidate cut paths;
    for each atom how many cut costs ending a digit there pays (0: a gap); and the
    atoms [i, j) of each whole piece."""
    atoms: list[np.ndarray] = []
    cut_after: list[float] = []
    whole: list[tuple[int, int]] = []
    for p in pieces:
        first = len(atoms)
        window = labels[p.y0 : p.y1, p.x0 : p.x1]
        own = np.isin(window, p.labels).astype(np.uint8)
        wide = p.width > CUT_ASPECT * height or (p.width >= PINCH_ASPECT * p.height and _pinched(mask, p))
        # A lone blob (one digit, a tick, a cross) is cut only straight down, as
        # before paths could drift: drifting cuts part a tick into two 1s. So
        # is a blob that may be one wide digit (a 0, a 2): straight cuts cost
        # less, and drifting ones find little more there.
        drift = len(pieces) > 1 and p.width > DRIFT_ASPECT * height
        paths = _cuts(own, height, drift=drift) if wide else []
        cols = np.arange(p.width)[None, :]
        left = np.zeros((p.height, 1), np.int64)
        for k in range(len(paths) + 1):
            right = paths[k][:, None] if k < len(paths) else np.full((p.height, 1), p.width)
            right = np.maximum(right, left)  # paths never cross
            part = own & ((cols >= left) & (cols < right))
            if part.any():
                full = np.zeros_like(mask)
                full[p.y0 : p.y1, p.x0 : p.x1] = part
                atoms.append(full)
                cut_after.append(0.0 if k == len(paths) else LONE_CUT if len(pieces) == 1 else 1.0)
            left = right
        if len(atoms) > first:
            cut_after[-1] = 0.0
        whole.append((first, len(atoms)))
    return atoms, cut_after, whole


def _cuts(own: np.ndarray, height: float, *, drift: bool = True) -> list[np.ndarray]:
    """Paths from top to bottom where touching digits may meet, as the column
    each row is cut at. A path may drift sideways one column per row (paying
    CUT_STEP per step), so it can pass between digits that lean into or
    overlap each other where no straight column is clear. Chosen at minima of
    the cheapest path's ink through each column of a few rows (digits touch
    high, low or in the middle), at least MIN_PART heights from either end
    and CUT_SPACING apart, crossing less ink than most columns hold: not the
    middle of a 0."""
    h, width = own.shape
    lo, hi = int(MIN_PART * height), width - int(MIN_PART * height)
    if hi <= lo:
        return []
    ink = own.astype(np.float32)
    step = CUT_STEP if drift else np.inf
    down = _path_costs(ink, step)
    up = _path_costs(np.ascontiguousarray(ink[::-1]), step)
    k = max(3, int(height * CUT_SMOOTH) | 1)
    profile = own.sum(0).astype(np.float32)
    thin = CUT_THIN * _median(profile[profile > 0])
    found = []  # (ink crossed, row, column)
    for row in CUT_ROWS:
        r = min(h - 1, int(row * h))
        through = down[r] + up[h - 1 - r] - ink[r]  # the cheapest path through (r, x)
        smooth = np.convolve(through, np.ones(k, np.float32) / k, mode="same")
        inner = smooth[lo:hi]
        left = np.concatenate([[np.inf], inner[:-1]])
        right = np.concatenate([inner[1:], [np.inf]])
        minima = np.flatnonzero((inner <= left) & (inner <= right))
        # Not the ends of the range: there the cost is still falling toward the blob's edge.
        minima = minima[(minima > 0) & (minima < len(inner) - 1)] + lo
        found += [(float(smooth[x]), r, int(x)) for x in minima if smooth[x] <= thin]
    found.sort()
    most = max(1, round(width / ((CUTS_PER if drift else LONE_CUTS_PER) * height)) - 1)
    paths: list[np.ndarray] = []
    for _, r, x in found:
        top = _trace(down[: r + 1], x, step)[::-1]  # rows 0 .. r
        bottom = _trace(up[: h - r], x, step)  # rows r .. h-1
        path = np.concatenate([top, bottom[1:]])
        if all(abs(float(path.mean()) - float(q.mean())) >= max(2.0, CUT_SPACING * height) for q in paths):
            paths.append(path)
        if len(paths) >= most:
            break
    return sorted(paths, key=lambda q: float(q.mean()))


def _path_costs(ink: np.ndarray, step: float = CUT_STEP) -> np.ndarray:
    """Cheapest path ink from row 0 down to each pixel, moving at most one
    column per row and paying `step` per sideways step (inf: straight down)."""
    if not np.isfinite(step):
        return np.cumsum(ink, axis=0)
    cost = np.empty_like(ink)
    cost[0] = ink[0]
    side = np.ones((1, 3), np.uint8)
    for y in range(1, len(ink)):
        prev = cost[y - 1 : y]
        # min(prev[x], prev[x-1] + step, prev[x+1] + step): the 3-wide minimum
        # plus a step is only ever chosen where it is a real sideways step.
        np.minimum(prev, cv2.erode(prev, side) + step, out=cost[y : y + 1])
        cost[y] += ink[y]
    return cost


def _trace(cost: np.ndarray, x: int, step: float) -> np.ndarray:
    """The columns of the cheapest path ending at (last row, x), from the
    last row back to row 0 (straight on ties)."""
    h, w = cost.shape
    xs = np.empty(h, np.int64)
    xs[0] = x
    for n, y in enumerate(range(h - 2, -1, -1), start=1):
        row = cost[y]
        best, to = row[x], x
        if x > 0 and row[x - 1] + step < best:
            best, to = row[x - 1] + step, x - 1
        if x < w - 1 and row[x + 1] + step < best:
            to = x + 1
        x = to
        xs[n] = x
    return xs


def _candidates(
    work: imaging.Work, atoms: list[np.ndarray], cut_after: list[float],
    whole: list[tuple[int, int]], height: float, *, pairs: bool = True,
) -> Candidates:
    """Every run of atoms at most MAX_WIDTH wide, and every whole piece,
    normalized to 28x28."""
    boxes = [imaging.bbox(a) for a in atoms]
    crops, spans, shape, cut = [], [], [], []
    for i in range(len(atoms)):
        for j in range(i + 1, len(atoms) + 1):
            x0, y0, x1, y1 = _span_box(boxes, i, j)
            width, tall = (x1 - x0) / height, (y1 - y0) / height
            if j > i + 1 and width > MAX_WIDTH and (i, j) not in whole:
                if x1 - x0 > 3 * MAX_WIDTH * height:
                    break
                continue
            crop = _crop(work, atoms, i, j, (x0, y0, x1, y1))
            if crop is None:
                continue
            crops.append(crop)
            spans.append((i, j))
            shape.append((width, tall))
            cut.append(cut_after[j - 1])
    if not crops:
        raise NoInkError("no ink found after cleaning")
    sizes = np.array(shape, np.float32)
    pair_crops, pair_spans, pair_prior = (
        _pair_candidates(work, atoms, boxes, cut_after, whole, height) if pairs else (None, (), None))
    return Candidates(np.stack(crops), tuple(spans), shape_prior(sizes), len(atoms), np.array(cut, np.float32), sizes,
                      pair_crops, pair_spans, pair_prior, lone=len(whole) == 1)


def _pair_candidates(
    work: imaging.Work, atoms: list[np.ndarray], boxes: list[tuple[int, int, int, int]], cut_after: list[float],
    whole: list[tuple[int, int]], height: float,
) -> tuple[np.ndarray | None, tuple[tuple[int, int], ...], np.ndarray | None]:
    """Runs of atoms within one connected piece, PAIR_WIDTHS wide, as the pair
    model's pictures; with their log priors (the cut cost of ending at a cut,
    too short; decide adds the pair cost). Two digits apart are read one by one."""
    crops, spans, prior = [], [], []
    for a, b in whole:
        for i in range(a, b):
            for j in range(i + 1, b + 1):
                x0, y0, x1, y1 = _span_box(boxes, i, j)
                width, tall = (x1 - x0) / height, (y1 - y0) / height
                if width > PAIR_WIDTHS[1]:
                    break  # longer runs only grow wider: a long touching line stays linear
                if width < (LONE_PAIR_WIDTH if len(whole) == 1 and (i, j) == (a, b) else PAIR_WIDTHS[0]):
                    continue
                crop = _crop(work, atoms, i, j, (x0, y0, x1, y1), pair=True)
                if crop is None:
                    continue
                crops.append(crop)
                spans.append((i, j))
                prior.append(-CUT_COST * cut_after[j - 1] - SHORT_COST * max(0.0, SHORT_DIGIT - tall))
    if not crops:
        return None, (), None
    return np.stack(crops), tuple(spans), np.array(prior, np.float32)


def shape_prior(sizes: np.ndarray) -> np.ndarray:
    """Log shape prior of candidates (width, height in digit heights): digits
    are at most about as wide as tall, and about as tall as their neighbours."""
    width, tall = sizes[:, 0], sizes[:, 1]
    return (-WIDTH_COST * np.maximum(0.0, width - WIDE_DIGIT)
            - SHORT_COST * np.maximum(0.0, SHORT_DIGIT - tall)).astype(np.float32)


def _span_box(boxes: list[tuple[int, int, int, int]], i: int, j: int) -> tuple[int, int, int, int]:
    """The box around atoms [i, j)."""
    span = boxes[i:j]
    return min(b[0] for b in span), min(b[1] for b in span), max(b[2] for b in span), max(b[3] for b in span)


def _crop(
    work: imaging.Work, atoms: list[np.ndarray], i: int, j: int, box: tuple[int, int, int, int],
    *, pair: bool = False,
) -> np.ndarray | None:
    """The candidate made of atoms [i, j), cleaned and normalized like one digit
    (or, `pair`, as the pair model's picture)."""
    h, w = work.mask.shape
    x0, y0 = max(0, box[0] - 4), max(0, box[1] - 4)
    x1, y1 = min(w, box[2] + 4), min(h, box[3] + 4)
    window = (slice(y0, y1), slice(x0, x1))
    own = np.zeros((y1 - y0, x1 - x0), np.uint8)
    for a in atoms[i:j]:
        own |= a[window]
    exclude = work.mask[window] & ~own
    try:
        finish = imaging.finish_pair if pair else imaging.finish
        return finish(work.ink[window], work.smooth[window], own, exclude)
    except NoInkError:
        return None


# ---------------------------------------------------------------- choosing


@dataclass(frozen=True)
class _Option:
    """One way to read atoms [i, j): one candidate digit, or a pair candidate's
    two digits; `rows` index the rows of probabilities its digits read from."""

    i: int
    j: int
    score: float
    rows: tuple[int, ...]


def _options(
    cands: Candidates, probs: np.ndarray, pair_probs: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, list[_Option]]:
    """(rows, each row's shape prior, options). The rows are `probs`, then two
    per pair the pair model read as digits: the first digit's probabilities
    (summed over the second) and the second's given the first, each with the
    pair's "not two digits" in the reject column when the model has one."""
    best = probs[:, :DIGITS].max(axis=1)
    cut_cost = CUT_COST
    cut = cands.cut if cands.cut is not None else np.zeros(len(best), np.float32)
    score = np.log(np.maximum(best, 1e-12)) + cands.prior - cut_cost * cut
    options = [_Option(i, j, float(score[k]), (k,)) for k, (i, j) in enumerate(cands.spans)]
    prior = np.asarray(cands.prior, np.float64)
    if pair_probs is None or not cands.pair_spans or cands.pair_prior is None:
        return probs, prior, options
    pp = np.asarray(pair_probs, np.float64)
    pair_cost = LONE_PAIR if cands.lone else PAIR_COST
    extra: list = []
    extra_prior: list = []
    single_at = {span: k for k, span in enumerate(cands.spans)}
    for k, (i, j) in enumerate(cands.pair_spans):
        if (i, j) in single_at and PAIR_VETO:
            o = single_at[(i, j)]
            options[o] = _Option(i, j, options[o].score + PAIR_VETO * math.log(max(float(pp[k, PAIR_REJECT]), 1e-6)),
                                 options[o].rows)
        if int(np.argmax(pp[k])) == PAIR_REJECT:
            continue  # not two digits: the other readings of this ink stand
        joint = pp[k, :PAIR_REJECT].reshape(DIGITS, DIGITS)
        r = float(pp[k, PAIR_REJECT])
        first = joint.sum(axis=1)
        a = int(np.argmax(first))
        second = joint[a] / max(float(first[a]), 1e-12) * (1.0 - r)
        if probs.shape[1] > REJECT:
            pair_rows = [np.append(first, r), np.append(second, r)]
        else:
            pair_rows = [first / max(1.0 - r, 1e-12), second / max(1.0 - r, 1e-12)]
        at = len(probs) + len(extra)
        extra += pair_rows
        prior_k = float(cands.pair_prior[k]) - pair_cost
        extra_prior += [0.5 * prior_k] * 2
        b = int(np.argmax(joint[a]))
        pair_score = math.log(max(float(joint[a, b]), 1e-12)) + prior_k
        options.append(_Option(i, j, pair_score, (at, at + 1)))
    if not extra:
        return probs, prior, options
    return np.vstack([probs, np.array(extra)]), np.concatenate([prior, extra_prior]), options


def decide(
    cands: Candidates, probs: np.ndarray, *, pair_probs: np.ndarray | None = None,
    constraints: Constraints = Constraints(), threshold: float | Thresholds = 0.5,
    calibration: AnswerCalibration | None = None,
) -> Reading:
    """The best reading of a scan given the classifier's probabilities for its
    candidates (rows of `probs`, 10 or 11 classes) and the pair model's for its
    pair candidates (`pair_probs`, contract.PAIR_CLASSES; None: no pairs read).
    With a `calibration` (the model card's), the confidence is its probability
    that the whole answer is right; without, the raw product (see _confidence).
    `threshold`: one for every answer, or Thresholds by the answer's length.
    A page with digit-sized writing left out of the row read is never ok
    (REASON_UNREAD): the answer may be a second line, or half a form."""
    r = _decide(cands, probs, pair_probs=pair_probs, constraints=constraints, threshold=threshold,
                calibration=calibration)
    if cands.unread and r.status == STATUS_OK:
        return dataclasses.replace(r, status=STATUS_LOW, reason=REASON_UNREAD)
    return r


def _decide(
    cands: Candidates, probs: np.ndarray, *, pair_probs: np.ndarray | None, constraints: Constraints,
    threshold: float | Thresholds, calibration: AnswerCalibration | None,
) -> Reading:
    thresholds = Thresholds.of(threshold)
    probs = np.asarray(probs, np.float64)
    if cands.atoms == 1 and len(cands.spans) == 1 and constraints.min_len <= 1 and (
        pair_probs is None or not cands.pair_spans
    ):
        return _single(probs[0], thresholds.single, calibration, filled=_filled(cands.crops[0]))
    rows, row_prior, options = _options(cands, probs, pair_probs)
    digit_probs = rows[:, :DIGITS]
    best = np.argmax(digit_probs, axis=1)
    rejected = (np.argmax(rows, axis=1) == REJECT) if rows.shape[1] > REJECT else np.zeros(len(best), bool)

    n = cands.atoms
    most = 2 * n  # a pair reads two digits off one atom
    # top[j, m]: the best score covering atoms [0, j) with m digits (back: its
    # last option); total[j, m] sums (log-sum-exp) over every such path, for
    # the segmentation certainty. Options end in increasing j, so ordering
    # them by their end makes one pass enough.
    neg = -np.inf
    top = np.full((n + 1, most + 1), neg)
    total = np.full((n + 1, most + 1), neg)
    back = np.full((n + 1, most + 1), -1, np.int64)
    top[0, 0] = total[0, 0] = 0.0
    for o in sorted(range(len(options)), key=lambda o: options[o].j):
        opt = options[o]
        d = len(opt.rows)
        cand = top[opt.i, : most + 1 - d] + opt.score
        better = cand > top[opt.j, d:]
        top[opt.j, d:] = np.where(better, cand, top[opt.j, d:])
        back[opt.j, d:] = np.where(better, o, back[opt.j, d:])
        total[opt.j, d:] = np.logaddexp(total[opt.j, d:], total[opt.i, : most + 1 - d] + opt.score)
    if not np.isfinite(top[n]).any():
        # No candidate run covers the ink (every crop of some atom was empty).
        return _reading([], best, digit_probs, 0.0, None, STATUS_LOW, REASON_NOT_DIGIT)
    z = np.logaddexp.reduce(total[n])
    free = int(np.argmax(top[n]))  # the length of the best reading of any length
    lengths = [m for m in range(constraints.min_len, min(most, constraints.max_len) + 1) if top[n, m] > neg]
    m = max(lengths, key=lambda length: top[n, length]) if lengths else free
    if m != free and top[n, free] > top[n, m] + math.log(2.0) or not lengths:
        # What is written does not fit the constraints: report what is written.
        path = _path(options, back, n, free)
        confidence, evidence = _confidence(row_prior, path, rows, best, top[n, free] - z, calibration)
        return _reading(path, best, digit_probs, confidence, evidence, STATUS_LOW,
                        _length_reason(constraints, path))
    path = _path(options, back, n, m)
    confidence, evidence = _confidence(row_prior, path, rows, best, top[n, m] - z, calibration)
    if (any(rejected[k] for k in path) or any(row_prior[k] < -WIDTH_COST * (MAX_WIDTH - WIDE_DIGIT) for k in path)
            or _cut_not_a_pair(cands, path, pair_probs)
            or any(_filled(cands.crops[k]) for k in path if k < len(cands.crops))
            or _slash(cands, path, best)):
        return _reading(path, best, digit_probs, confidence, evidence, STATUS_LOW, REASON_NOT_DIGIT)
    if confidence < thresholds.for_length(len(path)):
        return _reading(path, best, digit_probs, confidence, evidence, STATUS_LOW, REASON_LOW)
    return _reading(path, best, digit_probs, confidence, evidence, STATUS_OK, "")


def _filled(crop: np.ndarray) -> bool:
    """A candidate's 28x28 input holds ink FILLED pixels from its edge: a
    filled mark (a blacked-in form bubble, a dot), not a stroke."""
    solid = np.pad((crop > 0.5).astype(np.uint8), 1)
    return float(cv2.distanceTransform(solid, cv2.DIST_L2, 3).max()) >= FILLED


def _cut_not_a_pair(cands: Candidates, path: list[int], pair_probs: np.ndarray | None) -> bool:
    """Two digits of the answer cut from one stretch of ink that the pair model,
    shown that stretch whole, says is not two digits this surely
    (LONE_NOT_PAIR): a letter whose strokes cut like two digits on a page of
    its own (V as "11"), a % after a number ("83%" read "8396" and ok). A
    reading of such a stretch by the pair model itself cannot be the cause:
    it is offered only where "not two digits" is not the model's answer."""
    if pair_probs is None or not cands.pair_spans:
        return False
    n = len(cands.spans)
    cut_at = {(cands.spans[a][0], cands.spans[b][1]) for a, b in zip(path, path[1:], strict=False)
              if a < n and b < n and cands.spans[a][1] == cands.spans[b][0]}
    return any(span in cut_at and float(pair_probs[k, PAIR_REJECT]) >= LONE_NOT_PAIR
               for k, span in enumerate(cands.pair_spans))


def _lean(crop: np.ndarray) -> float:
    """How far the ink leans, top to the right: -mu11 / mu02 (0 upright)."""
    m = cv2.moments(crop.astype(np.float32))
    return -m["mu11"] / max(m["mu02"], 1e-6)


def _slash(cands: Candidates, path: list[int], best: np.ndarray) -> bool:
    """A 1 in a longer answer that stands taller than its neighbours and leans:
    a slash (or a bracket) among the digits, see SLASH_TALL."""
    if len(path) < 2 or cands.shape is None:
        return False
    singles = [k for k in path if k < len(cands.crops)]
    if not any(best[k] == 1 for k in singles):
        return False  # the moments below are only needed where a 1 was read
    lean = {k: _lean(cands.crops[k]) for k in singles}
    for k in singles:
        others = [j for j in singles if j != k]
        if (best[k] == 1 and others
                and float(cands.shape[k][1]) > SLASH_TALL * float(np.median([cands.shape[j][1] for j in others]))
                and lean[k] - float(np.median([lean[j] for j in others])) > SLASH_LEAN):
            return True
    return False


def _confidence(
    row_prior: np.ndarray, path: list[int], probs: np.ndarray, best: np.ndarray, log_certainty: float,
    calibration: AnswerCalibration | None,
) -> tuple[float, Evidence]:
    """(confidence, its evidence). Calibrated: the card's map of the evidence.
    Raw: the product of the digits' probabilities times the segmentation
    certainty (this cut's share of the weight of every way of cutting the ink)."""
    evidence = Evidence.of(probs, path, log_certainty=log_certainty, prior=float(sum(row_prior[k] for k in path)))
    raw = float(np.prod([probs[k, best[k]] for k in path])) * math.exp(min(0.0, log_certainty))
    if calibration is None:
        return raw, evidence
    fitted = calibration.probability(evidence)
    return (fitted if len(path) <= MAX_FITTED_LENGTH else min(fitted, raw)), evidence


def _single(p: np.ndarray, threshold: float, calibration: AnswerCalibration | None = None, *,
            filled: bool = False) -> Reading:
    """The fast path's reading: one candidate, no other way to cut the ink
    (`filled`: its ink is a filled mark, see FILLED)."""
    digit = int(np.argmax(p[:DIGITS]))
    evidence = Evidence.of(p[None], [0])
    confidence = float(p[digit]) if calibration is None else calibration.probability(evidence)
    if filled or (p.shape[0] > REJECT and int(np.argmax(p)) == REJECT):
        status, reason = STATUS_LOW, REASON_NOT_DIGIT
    elif confidence < threshold:
        status, reason = STATUS_LOW, REASON_LOW
    else:
        status, reason = STATUS_OK, ""
    return Reading(text=str(digit), digits=((digit, float(p[digit])),), confidence=confidence,
                   status=status, reason=reason, evidence=evidence)


def _length_reason(constraints: Constraints, path: list[int]) -> str:
    return f"expected {constraints.describe()}, read {len(path)}"


def _path(options: list[_Option], back: np.ndarray, n: int, m: int) -> list[int]:
    """The rows read by the best path covering all n atoms with m digits, left to right."""
    rows: list[int] = []
    j = n
    while j > 0:
        opt = options[int(back[j, m])]
        rows[:0] = opt.rows
        j, m = opt.i, m - len(opt.rows)
    return rows


def _reading(
    path: list[int], best: np.ndarray, probs: np.ndarray, confidence: float, evidence: Evidence | None, status: str,
    reason: str,
) -> Reading:
    digits = tuple((int(best[k]), float(probs[k, best[k]])) for k in path)
    return Reading(
        text="".join(str(d) for d, _ in digits), digits=digits, confidence=float(confidence),
        status=status, reason=reason, evidence=evidence,
    )


def read_number(
    data: bytes, classifier, *, expect: str | None = None, length: str | None = None,
    threshold: float | Thresholds = 0.5, max_pixels: int = imaging.DEFAULT_MAX_PIXELS,
) -> Reading:
    """PNG bytes -> Reading, with one classifier call. Raises an ImageError
    subclass (NoInkError for a blank page) with a one-line message."""
    cands = read_scan(imaging.decode_gray(data, max_pixels=max_pixels))
    [(probs, pair_probs)] = score(classifier, [cands])
    return decide(cands, probs, pair_probs=pair_probs, constraints=constraints_for(expect, length),
                  threshold=threshold, calibration=classifier.spec.answers)


def score(classifier, scans: Sequence[Candidates]) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """Each scan's (probabilities of its candidates, of its pair candidates or
    None): one digit-model call for every candidate of every scan, one
    pair-model call for every pair candidate (when the classifier has one)."""
    if not scans:
        return []
    bounds = np.cumsum([0, *(len(c.crops) for c in scans)])
    probs = classifier.predict(np.concatenate([c.crops for c in scans]))
    out: list[tuple[np.ndarray, np.ndarray | None]] = [
        (probs[bounds[k] : bounds[k + 1]], None) for k in range(len(scans))
    ]
    pairs = getattr(classifier, "pairs", None)
    with_pairs = [k for k, c in enumerate(scans) if c.pairs is not None]
    if pairs is not None and with_pairs:
        edges = np.cumsum([0, *(len(scans[k].pairs) for k in with_pairs)])  # type: ignore[arg-type]
        pair_probs = pairs.predict(np.concatenate([scans[k].pairs for k in with_pairs]))
        for n, k in enumerate(with_pairs):
            out[k] = (out[k][0], pair_probs[edges[n] : edges[n + 1]])
    return out
