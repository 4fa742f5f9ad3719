"""Calibration math on cases whose answers are known by hand."""

from __future__ import annotations

import numpy as np
import pytest

from digitwatch.training import calibration


class TestECE:
    """Expected calibration error: |accuracy - confidence| weighted by bin share."""

    def test_perfectly_calibrated_bin_is_zero(self):
        conf = np.full(10, 0.9)
        right = np.array([True] * 9 + [False])
        assert calibration.expected_calibration_error(conf, right) == pytest.approx(0.0)

    def test_overconfident_bin(self):
        conf = np.full(10, 0.9)
        right = np.array([True] * 5 + [False] * 5)
        assert calibration.expected_calibration_error(conf, right) == pytest.approx(0.4)

    def test_two_bins_weighted_by_share(self):
        # 4 answers at 0.3 all wrong (gap 0.3), 6 at 1.0 all right (gap 0): 0.4 x 0.3.
        conf = np.array([0.3] * 4 + [1.0] * 6)
        right = np.array([False] * 4 + [True] * 6)
        rel = calibration.reliability(conf, right, bins=10)
        assert rel.ece == pytest.approx(0.12)
        assert sum(rel.count) == 10 and rel.count[-1] == 6  # 1.0 falls in the last bin


class TestTemperature:
    """The fitted temperature recovers the one the labels were drawn with."""

    def test_recovers_known_temperature(self):
        rng = np.random.default_rng(0)
        z = rng.normal(0, 4, (20000, 11))
        p = calibration.softmax(z, 2.5)
        labels = (p.cumsum(1) > rng.random((len(p), 1))).argmax(1)
        assert calibration.fit_temperature(z, labels) == pytest.approx(2.5, rel=0.05)

    def test_fitting_lowers_ece_of_overconfident_logits(self):
        rng = np.random.default_rng(1)
        z = rng.normal(0, 3, (5000, 10))
        labels = (calibration.softmax(z, 3.0).cumsum(1) > rng.random((5000, 1))).argmax(1)
        before = calibration.softmax(z)
        t = calibration.fit_temperature(z, labels)
        after = calibration.softmax(z, t)
        ece = lambda p: calibration.expected_calibration_error(p.max(1), p.argmax(1) == labels)  # noqa: E731
        assert ece(after) < 0.02 < ece(before)
        assert (after.argmax(1) == before.argmax(1)).all()  # temperature never changes the answer


class TestThreshold:
    """The lowest threshold whose ok answers are right often enough."""

    def test_picks_the_largest_precise_set(self):
        conf = np.array([0.99, 0.98, 0.97, 0.96, 0.5, 0.4])
        right = np.array([True, True, True, True, False, True])
        assert calibration.threshold_for_precision(conf, right, 1.0) == pytest.approx(0.96)
        assert calibration.threshold_for_precision(conf, right, 0.8) == pytest.approx(0.4)

    def test_ties_are_kept_or_dropped_together(self):
        conf = np.array([0.9, 0.9, 0.8])
        right = np.array([True, False, True])
        assert calibration.threshold_for_precision(conf, right, 0.6) == pytest.approx(0.8)
        assert calibration.threshold_for_precision(conf, right, 0.7) > 1.0
