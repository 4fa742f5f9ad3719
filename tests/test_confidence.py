"""The whole-answer calibration: evidence, the fitted map, the card entry, and
what the shipped default does with them."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from digitwatch.errors import ModelError
from digitwatch.reader import confidence
from digitwatch.reader.confidence import FEATURES, AnswerCalibration, Evidence, Thresholds
from digitwatch.reader.model import DEFAULT_MODEL, OutputSpec, load_classifier
from digitwatch.reader.prepare import DEFAULT_LOW_CONFIDENCE, threshold_for
from digitwatch.training import calibration
from tests.conftest import MODELS


def test_evidence_of_a_ten_class_answer():
    probs = np.array([[0.9, 0.1] + [0.0] * 8, [0.0, 0.0, 0.6, 0.4] + [0.0] * 6])
    e = dict(zip(FEATURES, Evidence.of(probs, [0, 1], log_certainty=math.log(0.5), prior=-1.0).values,
                 strict=True))
    assert e["sum_log_digit"] == pytest.approx(math.log(0.9) + math.log(0.6))
    assert e["min_digit_logit"] == pytest.approx(math.log(0.6 / 0.4))
    assert e["max_reject_logit"] == confidence.REJECT_FLOOR  # no such class: as sure as the floor allows
    assert e["certainty_logit"] == pytest.approx(0.0)  # a share of 0.5
    assert e["shape_prior"] == -1.0 and e["log_length"] == pytest.approx(math.log(2))


def test_evidence_reads_the_reject_class_and_digits_given_a_digit():
    # An 11-class row: p(digit | a digit) does not depend on how much weight "not a digit" took.
    row = np.array([[0.45, 0.05] + [0.0] * 8 + [0.5]])
    e = dict(zip(FEATURES, Evidence.of(row, [0]).values, strict=True))
    assert e["sum_log_digit"] == pytest.approx(math.log(0.9))
    assert e["max_reject_logit"] == pytest.approx(0.0)
    sure = dict(zip(FEATURES, Evidence.of(np.eye(11)[[3]], [0]).values, strict=True))
    assert sure["min_digit_logit"] == confidence.LOGIT_CAP and sure["max_reject_logit"] == confidence.REJECT_FLOOR


def test_fit_recovers_a_known_map_and_is_calibrated():
    rng = np.random.default_rng(3)
    true = AnswerCalibration((0.0, 0.8, -0.6, 0.3, 0.0, 0.0), -1.0)
    x = rng.normal(0, 2, (6000, len(FEATURES)))
    evidence = [Evidence(tuple(v)) for v in x]
    p = np.array([true.probability(e) for e in evidence])
    right = rng.random(len(p)) < p
    fitted = confidence.fit(evidence, right)
    assert np.allclose(fitted.weights, true.weights, atol=0.12) and abs(fitted.bias - true.bias) < 0.12
    q = np.array([fitted.probability(e) for e in evidence])
    assert calibration.expected_calibration_error(q, right) < 0.02
    # The raw scores (not probabilities at all) are far off: the map is what calibrates.
    raw = 1 / (1 + np.exp(-x[:, 1]))
    assert calibration.expected_calibration_error(raw, right) > 0.05


def test_fit_keeps_each_weight_on_the_side_of_its_sense():
    """Data where the best unconstrained map puts a negative weight on the
    digits' log-probability (collinear features do this): the fitted map holds
    it at 0 and stays monotone, and without constraints the fit finds it."""
    rng = np.random.default_rng(4)
    true = AnswerCalibration((-0.7, 1.2, -0.5, 0.0, 0.0, 0.3), 0.5)
    x = rng.normal(0, 1.5, (6000, len(FEATURES)))
    evidence = [Evidence(tuple(v)) for v in x]
    right = rng.random(len(x)) < np.array([true.probability(e) for e in evidence])
    free = confidence.fit(evidence, right, signs=(0,) * len(FEATURES))
    assert free.weights[0] == pytest.approx(-0.7, abs=0.12)
    held = confidence.fit(evidence, right)
    assert held.weights[0] == 0.0
    assert all(s * w >= 0 for s, w in zip(confidence.SIGNS, held.weights, strict=True))
    assert held.weights[1] > 0.5 and held.weights[2] < -0.2
    # Monotone: a surer digit never lowers the answer's probability.
    base = np.zeros(len(FEATURES))
    for step in np.linspace(-10, 0, 11):
        lower, higher = base.copy(), base.copy()
        lower[0], higher[0] = step - 1, step
        assert held.probability(Evidence(tuple(higher))) >= held.probability(Evidence(tuple(lower)))


def test_card_round_trip_and_refusals():
    cal = AnswerCalibration(tuple(float(i) for i in range(len(FEATURES))), 0.5)
    assert AnswerCalibration.from_card(json.loads(json.dumps(cal.to_card()))) == cal
    for bad in (
        [1, 2],
        {"features": ["x"], "weights": [1.0], "bias": 0.0},
        {**cal.to_card(), "weights": [1.0]},
        {**cal.to_card(), "bias": "1"},
        {**cal.to_card(), "bias": float("nan")},
        {**cal.to_card(), "weights": [True] * len(FEATURES)},
        # Finite but absurd: 1e308 * 2 - 1e308 * 2 is inf - inf = nan.
        {**cal.to_card(), "weights": [1e308, -1e308] + [0.0] * (len(FEATURES) - 2)},
        {**cal.to_card(), "bias": -1e7},
    ):
        with pytest.raises(ValueError):
            AnswerCalibration.from_card(bad)


def test_a_broken_card_entry_is_a_model_error(tmp_path):
    card = json.loads((MODELS / "digits-reject.json").read_text())
    card["answer_calibration"]["weights"] = [1.0]
    (tmp_path / "pair.json").write_text(json.dumps(card))
    with pytest.raises(ModelError, match="unreadable model card"):
        OutputSpec.for_model(tmp_path / "pair.json")


def test_the_default_is_the_calibrated_pair_and_its_threshold():
    assert DEFAULT_MODEL.name == "digits-reject.json"
    clf = load_classifier()
    assert clf.classes == 11 and clf.spec.answers is not None
    card = json.loads(DEFAULT_MODEL.read_text())
    chosen = threshold_for(clf, None)
    assert chosen.number == card["recommended_low_confidence"] != DEFAULT_LOW_CONFIDENCE
    assert chosen.single == card["recommended_low_confidence_single"] < chosen.number
    # A threshold given (review_threshold, --low-confidence) is every answer's.
    assert threshold_for(clf, 0.3) == Thresholds(0.3, 0.3)


class TestThresholds:
    def test_a_number_is_every_answers_threshold(self):
        t = Thresholds.of(0.9)
        assert t == Thresholds(0.9, 0.9) and Thresholds.of(t) is t
        assert t.for_length(1) == t.for_length(7) == 0.9 and str(t) == "0.900"

    def test_one_digit_answers_have_their_own(self):
        t = Thresholds(0.95, 0.97)
        assert t.for_length(0) == t.for_length(1) == 0.95 and t.for_length(2) == t.for_length(12) == 0.97
        assert str(t) == "0.950 (one digit) / 0.970 (longer)"

    def test_decide_holds_each_answer_to_its_own(self):
        """The same raw confidence (0.9) is ok for a one-digit answer and not
        for a two-digit one, at single 0.85 / longer 0.95."""
        from digitwatch.reader import reading

        t = Thresholds(0.85, 0.95)
        one = reading.Candidates(np.zeros((1, 28, 28), np.float32), ((0, 1),), np.zeros(1, np.float32), 1)
        p = np.full((1, 10), 0.1 / 9)
        p[0, 4] = 0.9
        r = reading.decide(one, p, threshold=t)
        assert (r.text, r.status) == ("4", "ok")
        assert reading.decide(one, p, threshold=0.95).status == "low_confidence"
        two = reading.Candidates(np.zeros((3, 28, 28), np.float32), ((0, 1), (1, 2), (0, 2)),
                                 np.array([0.0, 0.0, -30.0], np.float32), 2, np.array([0.0, 0.0, 0.0], np.float32))
        q = np.full((3, 10), 0.01)
        q[0, 4], q[1, 2], q[2, 7] = 0.91, 0.91, 0.91
        c = reading.decide(two, q).confidence
        assert reading.decide(two, q).text == "42"
        # A two-digit answer is held to the longer answers' threshold only.
        assert reading.decide(two, q, threshold=Thresholds(c - 0.01, c + 0.01)).status == "low_confidence"
        assert reading.decide(two, q, threshold=Thresholds(1.0, c - 0.01)).status == "ok"


def test_the_shipped_calibration_fits_its_features(classifier):
    """The card's map was fitted on the evidence this code computes: the fixture
    scans (every variation and PNG flavour, digits the model reads right) come
    out ok, and every ok one is right. A map left over from other features
    (or other models) marks many of them low."""
    from digitwatch.reader.prepare import classify_batch, prepare_bytes
    from tests.conftest import label_of

    paths = sorted((MODELS.parent / "tests" / "fixtures" / "scans").glob("*.png"))
    items = [prepare_bytes(p.name, p.read_bytes(), 0.0, max_pixels=40_000_000) for p in paths]
    results = classify_batch(classifier, items, low_confidence=None)
    ok = [(r, p) for r, p in zip(results, paths, strict=True) if r.status == "ok"]
    assert len(ok) >= 0.9 * len(paths), [(p.name, round(r.confidence, 3)) for r, p in zip(results, paths, strict=True)]
    assert all(r.digit == label_of(p) for r, p in ok)


def test_a_map_that_overflows_never_reports_nan():
    """Built directly (from_card refuses such weights): the worst finite map
    still gives a probability in [0, 1], never NaN or inf."""
    for weights, bias in (((1e308, -1e308) + (0.0,) * (len(FEATURES) - 2), 0.0),
                          ((1e308,) * len(FEATURES), 1e308), ((-1e308,) * len(FEATURES), -1e308)):
        p = AnswerCalibration(weights, bias).probability(Evidence((2.0,) * len(FEATURES)))
        assert 0.0 <= p <= 1.0 and math.isfinite(p)


def test_an_answer_longer_than_the_fitted_range_is_not_trusted_on_extrapolation(classifier):
    """The worst valid input for a fitted map: a page of 50 clean printed
    digits. The map was fitted on answers of at most MAX_FITTED_LENGTH digits;
    extrapolated, it said 0.9985 and ok. Beyond that length the confidence is
    at most the raw product of the digits' probabilities, which falls with length."""
    import cv2

    from digitwatch.reader.reading import read_number
    from digitwatch.training import pngwrite

    def page(n: int) -> bytes:
        img = np.full((120, 40 * n + 40), 255, np.uint8)
        for i in range(n):
            cv2.putText(img, str(i % 10), (20 + 40 * i, 90), cv2.FONT_HERSHEY_SIMPLEX, 2.0, 0, 4)
        return pngwrite.encode(img, pngwrite.GRAY)

    threshold = threshold_for(classifier, None)
    long = read_number(page(50), classifier, threshold=threshold)
    assert len(long.text) == 50 and len(long.text) > confidence.MAX_FITTED_LENGTH
    raw = math.prod(p for _, p in long.digits)
    assert long.confidence <= raw + 1e-9 and long.status != "ok", (long.confidence, raw)
    # Within the fitted range the map alone speaks: a clean 6-digit page is ok.
    short = read_number(page(6), classifier, threshold=threshold)
    assert short.text == "012345" and short.status == "ok" and short.confidence > raw


def test_writing_a_card_is_all_or_nothing(tmp_path, monkeypatch):
    """fit_answers --write: a write cut short (the disk fills half way, as a
    power loss would) leaves the old card whole, and no temporary file."""
    from digitwatch.training.answers import write_card
    from tests.conftest import disk_fills_half_way

    card = tmp_path / "m.json"
    card.write_text('{"temperature": 1.0}\n')
    with disk_fills_half_way(monkeypatch), pytest.raises(OSError):
        write_card(card, {"temperature": 2.0, "answer_calibration": {"weights": [1.0] * 6}})
    assert json.loads(card.read_text()) == {"temperature": 1.0}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]
    write_card(card, {"temperature": 2.0})
    assert json.loads(card.read_text()) == {"temperature": 2.0}


class TestChooseThresholds:
    """fit_answers: one-digit answers get the lowest threshold at which every
    bar still holds, counting both thresholds; longer answers keep the one
    threshold all answers had."""

    def _scans(self, seed: int = 0, digit_like_marks: int = 0):
        rng = np.random.default_rng(seed)
        conf, right, group, length = [], [], [], []
        for _ in range(400):  # single digits: sure and right, a few unsure and wrong
            wrong = rng.random() < 0.02
            conf.append(rng.uniform(0.5, 0.9) if wrong else rng.uniform(0.8, 1.0))
            right.append(not wrong), group.append("single"), length.append(1)
        for _ in range(200):  # numbers: wrong ones reach high confidence
            wrong = rng.random() < 0.1
            conf.append(rng.uniform(0.9, 0.99) if wrong else rng.uniform(0.85, 1.0))
            right.append(not wrong), group.append("number"), length.append(int(rng.integers(2, 7)))
        for k in range(200):  # non-digits: mostly unsure; some read as a sure single digit
            conf.append(rng.uniform(0.93, 0.99) if k < digit_like_marks else rng.uniform(0.0, 0.6))
            right.append(False), group.append("non_digit"), length.append(1)
        conf, right = np.array(conf), np.array(right)
        return conf, right, np.ones(len(conf), bool), np.array(group), np.array(length)

    def _holds(self, t, conf, right, eligible, groups, lengths):
        ok = eligible & (conf >= np.where(lengths <= 1, t.single, t.number))
        singles = ok & (groups == "single")
        return (right[singles].mean() >= 0.995 and (ok & (groups == "number") & ~right).sum() <= 2
                and (ok & (groups == "non_digit")).sum() <= 4)

    def test_single_digits_get_a_lower_threshold_that_keeps_every_bar(self):
        from digitwatch.training.answers import choose_threshold, choose_thresholds

        conf, right, eligible, groups, lengths = self._scans()
        totals = {"single": 400, "low_res": 0, "font": 0, "number": 200, "non_digit": 200}
        args = (totals, 0.995, 0.01, 0.02)
        t = choose_thresholds(conf, right, eligible, groups, lengths, *args)
        assert t.number == choose_threshold(conf, right, eligible, groups, *args)
        assert t.single < t.number and self._holds(t, conf, right, eligible, groups, lengths)
        # The lowest such: one step lower (the next one-digit answer) breaks a bar.
        lower = conf[(lengths <= 1) & (conf < t.single)].max()
        assert not self._holds(Thresholds(lower, t.number), conf, right, eligible, groups, lengths)

    def test_non_digits_read_as_sure_digits_hold_the_single_threshold_up(self):
        from digitwatch.training.answers import choose_thresholds

        totals = {"single": 400, "low_res": 0, "font": 0, "number": 200, "non_digit": 200}
        free = choose_thresholds(*self._scans(), totals, 0.995, 0.01, 0.02)
        conf, right, eligible, groups, lengths = self._scans(digit_like_marks=12)
        held = choose_thresholds(conf, right, eligible, groups, lengths, totals, 0.995, 0.01, 0.02)
        assert held.single > free.single and (held.single == held.number or (
            (eligible & (groups == "non_digit") & (conf >= held.single)).sum() <= 4))


def test_fit_answers_never_unpickles_a_cache_others_could_have_planted(tmp_path):
    """--cache names a pickle (often in /tmp): one that another user could have
    written, or a link, is refused before it is read (unpickling runs code);
    the user's own plain file is used."""
    import os
    import pickle

    from digitwatch.training.answers import _own_cache

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (marker.write_text, ("pwned",))

    planted = tmp_path / "x.pkl"
    planted.write_bytes(pickle.dumps(Payload()))
    os.chmod(planted, 0o666)
    with pytest.raises(SystemExit, match="not a plain file"):
        _own_cache(planted)
    link = tmp_path / "link.pkl"
    link.symlink_to(planted)
    with pytest.raises(SystemExit):
        _own_cache(link)
    assert not marker.exists()
    own = tmp_path / "own.pkl"
    own.write_bytes(pickle.dumps({"key": 1}))
    os.chmod(own, 0o600)
    assert _own_cache(own) == {"key": 1} and _own_cache(tmp_path / "absent.pkl") is None
