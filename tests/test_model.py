"""Loading models: 10 or 11 classes, and the calibration the model card asks for."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from digitwatch.errors import ModelError
from digitwatch.reader.contract import CLASS_COUNTS, PAIR_CLASSES, REJECT
from digitwatch.reader.model import (
    LiteRTClassifier,
    OutputSpec,
    RejectHeadClassifier,
    combine,
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
        from digitwatch.reader.contract import to_model_input

        # The default is the pair card: the 10-class digits with the "not a digit" head.
        card = json.loads((MODELS / "digits-reject.json").read_text())
        assert classifier.classes == card["classes"] == 11 and classifier.classes in CLASS_COUNTS
        p = classifier.predict(to_model_input(mnist.x_test[:64]))
        assert p.shape == (64, classifier.classes)
        # int8 softmax outputs (the 10-class model) sum to 1 only to about 1/256 per class,
        # 10/256 at worst (measured on 2,000 MNIST test digits: at most 0.027 off).
        assert np.allclose(p.sum(1), 1.0, atol=0.04) and p.min() >= 0


class TestCard:
    """What the card beside a model says is applied; a bad card is refused."""

    def test_no_card_means_raw_probabilities(self, copied_model, mnist):
        from digitwatch.reader.contract import to_model_input

        x = to_model_input(mnist.x_test[:32])
        raw = LiteRTClassifier(copied_model, spec=OutputSpec()).predict(x)
        assert np.array_equal(LiteRTClassifier(copied_model).predict(x), raw)

    def test_temperature_from_the_card_is_applied(self, copied_model, mnist):
        from digitwatch.reader.contract import to_model_input

        x = to_model_input(mnist.x_test[:32])
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
        ('{"recommended_low_confidence": 0.9, "recommended_low_confidence_single": NaN}', "single nan outside 0-1"),
        ('{"recommended_low_confidence": 0.9, "recommended_low_confidence_single": -1}', "outside 0-1"),
        ('{"recommended_low_confidence": 0.9, "recommended_low_confidence_single": "low"}', "unreadable model card"),
        ('{"recommended_low_confidence_single": 0.9}', "single without recommended_low_confidence"),
        ('{"recommended_low_confidence": true}', "must be a number, not True"),
        ('{"recommended_low_confidence": 0.9, "recommended_low_confidence_single": [0.5]}', "must be a number"),
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


class _Fixed:
    """A stand-in classifier returning fixed probabilities (for the combination math only)."""

    def __init__(self, probs, model_id="fixed@0"):
        self.probs = np.asarray(probs, np.float32)
        self.classes = self.probs.shape[1]
        self.spec = OutputSpec(low_confidence=0.7)
        self.model_id = model_id
        self.calls = 0

    def predict(self, digits):
        self.calls += 1
        assert len(digits) == len(self.probs)
        return self.probs


class TestRejectHead:
    """A 10-class digit model plus an 11-class companion's "not a digit" head."""

    def test_combination_math(self):
        digits = _Fixed([[0.0, 0.9, 0.1] + [0.0] * 7, [0.5, 0.0, 0.0, 0.0, 0.5] + [0.0] * 5], "d@1")
        # The companion's own digit guesses (it says 7 for the first) must not leak in.
        reject = _Fixed([[0.0] * 7 + [0.8, 0, 0, 0.2], [0.0] * 10 + [0.75]], "r@2")
        pair = RejectHeadClassifier(digits, reject)
        p = pair.predict(np.zeros((2, 28, 28), np.float32))
        assert pair.classes == 11 and p.shape == (2, 11)
        assert np.allclose(p[0], [0.0, 0.72, 0.08] + [0.0] * 7 + [0.2])
        assert np.allclose(p[1], [0.125, 0, 0, 0, 0.125] + [0.0] * 5 + [0.75])
        assert np.allclose(p.sum(1), 1.0)
        assert digits.calls == 1 and reject.calls == 1  # one batch call each
        assert pair.model_id == "d@1+r@2" and pair.spec.low_confidence == 0.7
        assert np.allclose(combine(digits.probs, reject.probs), p)

    def test_pair_must_be_10_and_11_classes(self):
        ten, eleven = _Fixed(np.eye(10)[:1]), _Fixed(np.eye(11)[:1])
        with pytest.raises(ModelError, match="10-class digit model with an 11-class"):
            RejectHeadClassifier(eleven, eleven)
        with pytest.raises(ModelError, match="10-class digit model with an 11-class"):
            RejectHeadClassifier(ten, ten)

    def test_shipped_pair_keeps_the_digit_decisions(self, mnist):
        """The real shipped files: the card names the companion, the digit
        argmax is the shipped digit model's, and r is the companion's class 10."""
        from digitwatch.reader.contract import to_model_input

        card = json.loads((MODELS / "digits-reject.json").read_text())
        assert (card["digit_model"], card["reject_model"]) == ("digits.tflite", "reject.tflite")
        pair = load_classifier(MODELS / "digits-reject.json")
        assert isinstance(pair, RejectHeadClassifier) and pair.classes == 11
        assert pair.spec.low_confidence == card["recommended_low_confidence"]
        assert pair.spec.low_confidence_single == card["recommended_low_confidence_single"]
        assert pair.model_id.startswith("digits.tflite@") and "+reject.tflite@" in pair.model_id
        x = to_model_input(mnist.x_test[:200])
        alone = LiteRTClassifier(MODELS / "digits.tflite").predict(x)
        companion = LiteRTClassifier(MODELS / "reject.tflite").predict(x)
        assert companion.shape == (200, 11)
        p = pair.predict(x)
        assert (p[:, :10].argmax(1) == alone.argmax(1)).all()
        assert np.allclose(p[:, REJECT], companion[:, REJECT], atol=1e-6)
        assert (p[:, :10].argmax(1) == mnist.y_test[:200]).mean() >= 0.99
        assert np.median(p[:, REJECT]) < 0.01  # real digits are not refused

    @pytest.mark.parametrize("entry, message", [
        ('"../reject.tflite"', "file name beside the card"),
        ('"missing.tflite"', "is not a .tflite file beside the card"),
        ("3", "file name beside the card"),
    ])
    def test_bad_companion_refused(self, copied_model, entry, message):
        copied_model.with_suffix(".json").write_text(f'{{"reject_model": {entry}}}')
        with pytest.raises(ModelError, match=message):
            load_classifier(copied_model)

    def test_card_beside_the_digit_model_names_the_companion(self, copied_model, mnist):
        from digitwatch.reader.contract import to_model_input

        shutil.copy(MODELS / "reject.tflite", copied_model.parent / "r.tflite")
        shutil.copy(MODELS / "reject.json", copied_model.parent / "r.json")  # its logits and temperature
        copied_model.with_suffix(".json").write_text('{"reject_model": "r.tflite", "recommended_low_confidence": 0.6}')
        pair = load_classifier(copied_model)
        assert isinstance(pair, RejectHeadClassifier) and pair.spec.low_confidence == 0.6
        x = to_model_input(mnist.x_test[:16])
        assert np.allclose(pair.predict(x), load_classifier(MODELS / "digits-reject.json").predict(x), atol=1e-6)

    def test_pair_card_must_name_both(self, tmp_path):
        card = tmp_path / "pair.json"
        card.write_text('{"reject_model": "reject.tflite"}')
        shutil.copy(MODELS / "reject.tflite", tmp_path / "reject.tflite")
        with pytest.raises(ModelError, match="names digit_model and reject_model"):
            load_classifier(card)

    def test_companion_must_have_the_reject_class(self, copied_model):
        shutil.copy(MODELS / "digits.tflite", copied_model.parent / "r.tflite")
        copied_model.with_suffix(".json").write_text('{"reject_model": "r.tflite"}')
        with pytest.raises(ModelError, match="11-class companion"):
            load_classifier(copied_model)


class TestPairModel:
    """The pair model the default card names: two touching digits as one 28x56 picture."""

    def test_default_card_carries_the_pair_model(self):
        card = json.loads((MODELS / "digits-reject.json").read_text())
        assert card["pair_model"] == "pairs.tflite"
        classifier = load_classifier()
        assert classifier.pairs is not None and classifier.pairs.classes == PAIR_CLASSES
        assert "+pairs.tflite@" in classifier.model_id  # results say which pair model read them

    def test_reads_a_composed_pair_of_test_digits(self, mnist):
        """MNIST *test* digits (never composed in training) side by side, overlapping:
        most are read as their two digits, and a single digit drawn wide is not a pair."""
        from digitwatch.training import synth

        rng = np.random.default_rng(5)
        pairs = load_classifier().pairs
        pics, truth, wide = [], [], []
        for _ in range(60):
            i, j = rng.integers(len(mnist.x_test), size=2)
            ink = synth._side_by_side(synth._mnist_ink(mnist.x_test[i]), synth._mnist_ink(mnist.x_test[j]), rng,
                                      rng.uniform(-0.3, 0.0))
            pics.append(synth.to_pair(ink))
            truth.append(int(mnist.y_test[i]) * 10 + int(mnist.y_test[j]))
            wide.append(synth.to_pair(synth._wide_digit(rng, mnist.x_test, mnist.y_test)))
        read = pairs.predict(np.stack(pics)).argmax(1)
        assert (read == np.array(truth)).mean() >= 0.9
        assert (pairs.predict(np.stack(wide)).argmax(1) == PAIR_CLASSES - 1).mean() >= 0.8

    def test_a_digit_model_is_not_a_pair_model(self, copied_model, tmp_path):
        with pytest.raises(ModelError, match=r"expected one \(N, 28, 56, 1\) input"):
            LiteRTClassifier(copied_model, pair_model=True)
        card = tmp_path / "card.json"
        for name in ("digits.tflite", "reject.tflite", "digits.json", "reject.json"):
            shutil.copy(MODELS / name, tmp_path / name)
        card.write_text('{"digit_model": "digits.tflite", "reject_model": "reject.tflite", '
                        '"pair_model": "digits.tflite"}')
        with pytest.raises(ModelError, match="28, 56"):
            load_classifier(card)
        card.write_text('{"digit_model": "digits.tflite", "reject_model": "reject.tflite", '
                        '"pair_model": "../pairs.tflite"}')
        with pytest.raises(ModelError, match="file name beside the card"):
            load_classifier(card)

    def test_a_card_without_a_pair_model_reads_no_pairs(self, tmp_path):
        for name in ("digits.tflite", "reject.tflite", "digits.json", "reject.json"):
            shutil.copy(MODELS / name, tmp_path / name)
        card = tmp_path / "card.json"
        card.write_text('{"digit_model": "digits.tflite", "reject_model": "reject.tflite"}')
        assert load_classifier(card).pairs is None
        assert load_classifier(MODELS / "digits.tflite").pairs is None

    @pytest.mark.parametrize("card, message", [
        ('{"outputs": "softmax"}', "outputs must be"),
        ('{"outputs": "logits", "temperature": NaN}', "temperature"),
        ('{"outputs": ', "unreadable model card"),
    ])
    def test_a_hostile_or_cut_short_pair_card_is_refused_at_start(self, tmp_path, card, message):
        """The pair model's own card, planted or cut short: one ModelError line
        when the classifier loads, never pair probabilities read on the wrong scale."""
        for name in ("digits.tflite", "reject.tflite", "digits.json", "reject.json", "pairs.tflite"):
            shutil.copy(MODELS / name, tmp_path / name)
        (tmp_path / "pairs.json").write_text(card)
        default = tmp_path / "card.json"
        default.write_text('{"digit_model": "digits.tflite", "reject_model": "reject.tflite", '
                           '"pair_model": "pairs.tflite"}')
        with pytest.raises(ModelError, match=message) as err:
            load_classifier(default)
        assert "\n" not in str(err.value) and "pairs.json" in str(err.value)


class TestWriteWhole:
    def test_a_model_file_cut_short_leaves_the_old_one(self, tmp_path, monkeypatch):
        """A power loss or full disk while a .tflite is exported: the shipped
        file stays whole and loadable, no temporary file is left beside it."""
        from pathlib import Path

        from digitwatch.reader.model import write_whole

        target = tmp_path / "pairs.tflite"
        shutil.copy(MODELS / "pairs.tflite", target)
        real = Path.write_bytes

        def half_then_full(self, data):
            real(self, data[: len(data) // 2])
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(Path, "write_bytes", half_then_full)
        with pytest.raises(OSError):
            write_whole(target, b"\0" * 100_000)
        monkeypatch.undo()
        assert target.read_bytes() == (MODELS / "pairs.tflite").read_bytes()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs.tflite"]
        assert LiteRTClassifier(target, pair_model=True).classes == PAIR_CLASSES

    def test_a_writer_killed_mid_write_leaves_the_old_file_and_the_next_write_works(self, tmp_path):
        """A real SIGKILL while the new file is half written: the model beside
        it is untouched, and the next write replaces the leftover temporary."""
        import signal
        import subprocess
        import sys

        target = tmp_path / "pairs.tflite"
        shutil.copy(MODELS / "pairs.tflite", target)
        child = subprocess.Popen([sys.executable, "-c", (
            "import sys, time; from pathlib import Path; from digitwatch.reader.model import replace_whole\n"
            "def half(tmp):\n"
            "    f = open(tmp, 'wb'); f.write(b'x' * 50_000); f.flush(); print('half', flush=True); time.sleep(60)\n"
            f"replace_whole(Path({str(target)!r}), half)\n")], stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "half"
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
        leftover = tmp_path / ".pairs.tmp.tflite"
        assert leftover.exists() and target.read_bytes() == (MODELS / "pairs.tflite").read_bytes()
        from digitwatch.reader.model import write_whole

        write_whole(target, b"new")
        assert target.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["pairs.tflite"]

    def test_a_link_planted_as_the_temporary_file_is_not_written_through(self, tmp_path):
        from digitwatch.reader.model import write_whole

        outside = tmp_path / "outside.txt"
        outside.write_text("keep me")
        models = tmp_path / "models"
        models.mkdir()
        (models / ".digits.tmp.json").symlink_to(outside)
        write_whole(models / "digits.json", "{}\n")
        assert outside.read_text() == "keep me"
        assert (models / "digits.json").read_text() == "{}\n" and not (models / "digits.json").is_symlink()
        assert sorted(p.name for p in models.iterdir()) == ["digits.json"]

    def test_digitwatch_train_writes_its_card_whole(self, tmp_path, monkeypatch):
        from digitwatch.training import train as training
        from tests.conftest import disk_fills_half_way

        card = tmp_path / "m.json"
        card.write_text('{"temperature": 1.0}\n')
        with disk_fills_half_way(monkeypatch), pytest.raises(OSError):
            training.write_model_card(card, {"temperature": 2.0, "about": "x" * 1000})
        assert json.loads(card.read_text()) == {"temperature": 1.0}
        assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]
