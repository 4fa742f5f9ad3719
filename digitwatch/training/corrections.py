"""What people settled in the review station, as training data: each decision
kept the 28x28 inputs the model saw (one per candidate digit) with the
person's answer. A decision whose answer has as many digits as there were
candidates gives one labelled input per digit; the others (cut wrong, or
unreadable) are counted, not used. A fixed share of decisions, chosen by
their file's sha256, is held out for `digitwatch evaluate --corrections`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from digitwatch.errors import DataError
from digitwatch.reader.contract import SIDE

HELD_OUT_SHARE = 0.2  # of decisions, by sha256: never trained on, reported by evaluate
MAX_CARD_BYTES = 64 * 1024


@dataclass(frozen=True)
class Corrections:
    """Labelled inputs from the corrections folder, split into train and held-out."""

    x_train: np.ndarray  # (N, 28, 28) float32, ink high
    y_train: np.ndarray  # (N,) digits
    x_held: np.ndarray
    y_held: np.ndarray
    decisions: int
    unusable: int  # unreadable, or candidates that do not match the answer's digits


def _held_out(sha: str) -> bool:
    return int(sha[:8], 16) / 0xFFFFFFFF < HELD_OUT_SHARE


def load(folder: Path) -> Corrections:
    """Every card in `folder` (and its inputs beside it); DataError if there is none."""
    xs: dict[bool, list[np.ndarray]] = {False: [], True: []}
    ys: dict[bool, list[int]] = {False: [], True: []}
    decisions = unusable = 0
    cards = sorted(Path(folder).glob("*.json"))
    for card_path in cards:
        try:
            if card_path.is_symlink() or card_path.stat().st_size > MAX_CARD_BYTES:
                raise ValueError("not a plain card")
            card = json.loads(card_path.read_text())
            sha, label = str(card["sha256"]), card.get("label")
            inputs = card_path.with_name(Path(str(card["inputs"])).name)
            crops = np.load(inputs, allow_pickle=False)
        except (OSError, ValueError, KeyError, TypeError):
            unusable += 1
            continue
        decisions += 1
        if (not isinstance(label, str) or not label.isdigit() or crops.ndim != 3
                or crops.shape[1:] != (SIDE, SIDE) or len(crops) != len(label)):
            unusable += 1
            continue
        held = _held_out(sha)
        xs[held] += list(np.clip(crops.astype(np.float32), 0.0, 1.0))
        ys[held] += [int(c) for c in label]
    if not decisions:
        raise DataError(f"{folder}: no corrections (the review station writes <sha256>.json and .npy)")

    def arrays(held: bool) -> tuple[np.ndarray, np.ndarray]:
        x = np.stack(xs[held]) if xs[held] else np.zeros((0, SIDE, SIDE), np.float32)
        return x, np.array(ys[held], np.uint8)

    (x_train, y_train), (x_held, y_held) = arrays(False), arrays(True)
    return Corrections(x_train, y_train, x_held, y_held, decisions, unusable)
