"""The model's contract, stated once: what goes in and what comes out.

In: one digit is a 28x28 float32 image in [0, 1], ink high (1.0 = full ink,
0.0 = paper), MNIST-normalized (longer side 20 px, centred by centre of mass).
A batch is (N, 28, 28, 1). MNIST's own uint8 images (0-255, ink high) are
scaled into it by `to_model_input`; the scan pipeline (`imaging.finish`)
produces it directly.

Out: one row per digit. Classes 0-9 are the digits, in order; a model may
have one more class, index 10, meaning "not a digit". Nothing else is a
valid model.

A pair model reads two digits that touch or overlap as one picture:
(N, 28, 56, 1), the same ink scale, the pair's height scaled to 20 px
(`imaging.finish_pair`); out: PAIR_CLASSES rows, class 10*a + b for the digits
"ab", and class PAIR_REJECT for "not two digits".
"""

from __future__ import annotations

import numpy as np

SIDE = 28  # pixels per side of one model input
DIGITS = 10  # classes 0-9, first in every model's output
REJECT = DIGITS  # the class index of "not a digit" in a model that has one
CLASS_COUNTS = (DIGITS, DIGITS + 1)  # the output widths a model may have
PAIR_WIDTH = 2 * SIDE  # a pair model's input is SIDE x PAIR_WIDTH
PAIR_REJECT = DIGITS * DIGITS  # the pair model's class for "not two digits"
PAIR_CLASSES = PAIR_REJECT + 1
INPUT_DESCRIPTION = f"float32 (N, {SIDE}, {SIDE}, 1) in [0, 1], ink high, MNIST-normalized"


def to_model_input(digits: np.ndarray) -> np.ndarray:
    """One digit or a batch -> contiguous float32 (N, 28, 28, 1), ink high.

    uint8 images (MNIST's 0-255) are scaled to [0, 1]; float images are taken
    as already in [0, 1]. Anything whose trailing shape is not 28x28 (or
    28x28x1) is refused rather than silently reshaped.
    """
    x = np.asarray(digits)
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / 255.0
    if x.size == 0:
        return np.zeros((0, SIDE, SIDE, 1), np.float32)
    shape = x.shape[:-1] if x.ndim >= 3 and x.shape[-1] == 1 else x.shape
    if len(shape) < 2 or shape[-2:] != (SIDE, SIDE):
        raise ValueError(f"a model input is {SIDE}x{SIDE} (or a batch of them), not {x.shape}")
    return np.ascontiguousarray(x, dtype=np.float32).reshape(-1, SIDE, SIDE, 1)


def to_pair_input(pairs: np.ndarray) -> np.ndarray:
    """A batch of pair pictures -> contiguous float32 (N, 28, 56, 1); other shapes are refused."""
    x = np.asarray(pairs, dtype=np.float32)
    if x.size == 0:
        return np.zeros((0, SIDE, PAIR_WIDTH, 1), np.float32)
    shape = x.shape[:-1] if x.ndim == 4 and x.shape[-1] == 1 else x.shape
    if len(shape) != 3 or shape[1:] != (SIDE, PAIR_WIDTH):
        raise ValueError(f"a pair model input is {SIDE}x{PAIR_WIDTH} (a batch of them), not {x.shape}")
    return np.ascontiguousarray(x).reshape(-1, SIDE, PAIR_WIDTH, 1)
