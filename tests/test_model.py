"""Loading models: 10 or 11 classes, and the calibration the model card asks for."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from digitwatch.errors import ModelError
from digitwatch.model import (
    SUPPORTED_CLASSES,
    LiteRTClassifier,
    OutputSpec,
    load_classifier,
    to_probabilities,
)
from tests.conftest import MODELS


@pytest.fixture
def copied_model(tmp_path):
    """The shipped .tflite in a folder of its own, without its card."""
    path = tmp_path / "m.tflite"
    shutil.copy(MODELS / "digits.tflite", path)
    return path


class TestShippedModel:
    """The model in models/ loads with its card and returns probabilities."""

    def test_classes_and_probabilities(self, classifier, mnist):
        from digitwatch.data import to_input

        card = json.loads((MODELS / "digits.json").read_text())
        assert classifier.classes == card.get("classes", 10) and classifier.classes in SUPPORTED_CLASSES
        p = classifier.predict(to_input(mnist.x_test[:64]))
        assert p.shape == (64, classifier.classes)
        # int8 softmax outputs (the 10-class model) sum to 1 only to about 1/256 per class.
        assert np.allclose(p.sum(1), 1.0, atol=0.02) and p.min() >= 0


class TestCard:
    """What the card beside a model says is applied; a bad card is refused."""

    def test_no_card_means_raw_probabilities(self, copied_model, mnist):
        from digitwatch.data import to_input

        x = to_input(mnist.x_test[:32])
        raw = LiteRTClassifier(copied_model, spec=OutputSpec()).predict(x)
        assert np.array_equal(LiteRTClassifier(copied_model).predict(x), raw)

    def test_temperature_from_the_card_is_applied(self, copied_model, mnist):
        from digitwatch.data import to_input

        x = to_input(mnist.x_test[:32])
        spec = OutputSpec.for_model(MODELS / "digits.tflite")
        raw = LiteRTClassifier(copied_model, spec=OutputSpec(logits=spec.logits)).predict(x)
        copied_model.with_suffix(".json").write_text(
            json.dumps({"outputs": "logits" if spec.logits else "probabilities", "temperature": 2.0})
        )
        loaded = load_classifier(copied_model)
        assert loaded.spec.low_confidence is None
        softened = loaded.predict(x)
        expected = to_probabilities(np.log(np.clip(raw, 1e-7, 1)), logits=True, temperature=2.0)
        assert np.allclose(softened, expected, atol=1e-5)
        assert (softened.argmax(1) == raw.argmax(1)).all()
        assert softened.max(1).mean() < raw.max(1).mean()  # T > 1 softens

    @pytest.mark.parametrize("card, message", [
        ("{not json", "unreadable model card"),
        ('{"outputs": "scores"}', "outputs must be"),
        ('{"temperature": 0}', "temperature 0.0 outside"),
        ('{"temperature": "warm"}', "unreadable model card"),
        ('{"recommended_low_confidence": 2}', "outside 0-1"),
    ])
    def test_bad_card_refused(self, copied_model, card, message):
        copied_model.with_suffix(".json").write_text(card)
        with pytest.raises(ModelError, match=message):
            load_classifier(copied_model)


class TestProbabilities:
    """softmax(logits / T) and its probability-input twin."""

    def test_logits_and_probabilities_agree(self):
        z = np.array([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
        p = to_probabilities(z, logits=True)
        assert np.allclose(p[1], 1 / 3) and np.allclose(p.sum(1), 1)
        sharp = to_probabilities(z, logits=True, temperature=0.5)
        assert np.allclose(to_probabilities(p, logits=False, temperature=0.5), sharp, atol=1e-6)
