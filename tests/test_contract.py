"""The model's input contract: one function makes every model input, and the
class layout is defined once."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from digitwatch.reader import contract
from digitwatch.reader.contract import (
    CLASS_COUNTS,
    DIGITS,
    PAIR_CLASSES,
    PAIR_REJECT,
    PAIR_WIDTH,
    REJECT,
    SIDE,
    to_model_input,
    to_pair_input,
)

PACKAGE = Path(contract.__file__).parent


class TestToModelInput:
    """uint8 MNIST and float [0, 1] digits become one (N, 28, 28, 1) float32 batch."""

    def test_uint8_is_scaled_to_unit_range_ink_high(self):
        images = np.array([[[0] * SIDE] * SIDE, [[255] * SIDE] * SIDE], np.uint8)
        x = to_model_input(images)
        assert x.shape == (2, SIDE, SIDE, 1) and x.dtype == np.float32
        assert x[0].max() == 0.0 and x[1].min() == 1.0

    def test_float_digits_pass_through_unchanged(self):
        rng = np.random.default_rng(0)
        digits = rng.random((3, SIDE, SIDE)).astype(np.float64)
        x = to_model_input(digits)
        assert x.flags.c_contiguous and x.dtype == np.float32
        np.testing.assert_array_equal(x[..., 0], digits.astype(np.float32))

    @pytest.mark.parametrize("shape", [(SIDE, SIDE), (1, SIDE, SIDE), (4, SIDE, SIDE, 1), (SIDE, SIDE, 1)])
    def test_one_digit_or_a_batch(self, shape):
        assert to_model_input(np.zeros(shape, np.float32)).shape[1:] == (SIDE, SIDE, 1)

    def test_empty_batch(self):
        assert to_model_input(np.zeros((0, SIDE, SIDE), np.float32)).shape == (0, SIDE, SIDE, 1)

    @pytest.mark.parametrize("shape", [(2, SIDE * SIDE), (2, 27, 27), (SIDE, SIDE, 3), (SIDE,)])
    def test_other_shapes_are_refused_not_reshaped(self, shape):
        with pytest.raises(ValueError, match="28x28"):
            to_model_input(np.zeros(shape, np.float32))


class TestOneDefinition:
    """No other module of the package defines the side or the class layout again."""

    def test_class_layout(self):
        assert DIGITS == 10 and REJECT == DIGITS and CLASS_COUNTS == (10, 11)

    def test_no_module_redefines_the_contract(self):
        names = {"SIDE", "DIGITS", "REJECT", "NUM_CLASSES", "DIGIT_CLASSES", "CLASSES", "SUPPORTED_CLASSES"}
        offenders = []
        for path in sorted(PACKAGE.glob("*.py")):
            if path.name == "contract.py":
                continue
            for node in ast.parse(path.read_text()).body:
                if isinstance(node, ast.Assign):
                    offenders += [f"{path.name}:{t.id}" for t in node.targets
                                  if isinstance(t, ast.Name) and t.id in names]
        assert offenders == []


class TestToPairInput:
    def test_a_batch_of_pair_pictures(self):
        x = np.random.default_rng(0).random((3, SIDE, PAIR_WIDTH)).astype(np.float32)
        out = to_pair_input(x)
        assert out.shape == (3, SIDE, PAIR_WIDTH, 1) and out.dtype == np.float32
        np.testing.assert_array_equal(out[..., 0], x)
        assert to_pair_input(np.zeros((0, SIDE, PAIR_WIDTH))).shape == (0, SIDE, PAIR_WIDTH, 1)

    @pytest.mark.parametrize("shape", [(2, SIDE, SIDE), (SIDE, PAIR_WIDTH), (2, PAIR_WIDTH, SIDE),
                                       (2, SIDE, PAIR_WIDTH, 3)])
    def test_other_shapes_are_refused(self, shape):
        with pytest.raises(ValueError, match="pair model input"):
            to_pair_input(np.zeros(shape, np.float32))

    def test_pair_classes(self):
        assert PAIR_CLASSES == 101 and PAIR_REJECT == 100 and PAIR_WIDTH == 2 * SIDE
