"""Training end to end on a small slice, export round-trip, and the shipped model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from digitwatch.errors import ModelError
from tests.conftest import MODELS

pytestmark = pytest.mark.system


@pytest.fixture(scope="module")
def small_run(mnist_dir, tmp_path_factory):
    from digitwatch.training.train import TrainRequest, run_training

    # The 11-class recipe end to end, small: drawn non-digits, font digits,
    # logits out, a temperature fitted on the validation split.
    out = tmp_path_factory.mktemp("train") / "small.keras"
    # An MLP: a CNN this small and short leaves batch-norm statistics unsettled.
    card = run_training(TrainRequest(
        data=mnist_dir, arch="mlp", epochs=3, members=1, width=8, out=out, seed=3,
        limit=5000, augment=False, command="digitwatch train (test)", quantize=False,
        reject=True, synthetic_rejects=2000, font_digits=500,
    ))
    return out, card


@pytest.fixture(scope="module")
def quantized_run(mnist_dir, tmp_path_factory):
    # One epoch on 600 digits leaves batch-norm statistics unsettled and the
    # answers near ties, which int8 rounding flips; a small MLP trains enough.
    from digitwatch.training.train import TrainRequest, run_training

    out = tmp_path_factory.mktemp("train-int8") / "mlp.keras"
    card = run_training(TrainRequest(
        data=mnist_dir, arch="mlp", epochs=2, members=1, width=8, out=out, seed=3,
        limit=5000, augment=False, command="digitwatch train (test, int8)",
    ))
    return out, card


class TestTraining:
    """A few thousand digits, three epochs: a loadable 11-class model whose card tells the truth."""

    def test_split_counts_the_synthetic_inputs(self, small_run):
        _, card = small_run
        # 4500 MNIST + 2000 drawn non-digits + 500 font digits; 500 + 250 to validate.
        assert card["split"] == {"train": 7000, "validation": 750, "test": 10000}
        assert card["classes"] == 11 and card["outputs"] == "logits"

    def test_card_figures_are_what_the_loaded_model_measures(self, small_run, mnist):
        from digitwatch.reader.contract import to_model_input
        from digitwatch.reader.model import load_classifier

        out, card = small_run
        classifier = load_classifier(out.with_suffix(".tflite"))  # reads the card: logits, temperature
        assert classifier.classes == 11
        p = classifier.predict(to_model_input(mnist.x_test))
        assert np.allclose(p.sum(1), 1.0, atol=1e-5)
        assert float(np.mean(p.argmax(1) == mnist.y_test)) == pytest.approx(card["test_accuracy"]["tflite"])
        assert float(np.mean(p.argmax(1) == 10)) == pytest.approx(card["test_rejected_as_not_digit"])
        # Three short epochs already tell digits from drawn non-digits, mostly.
        assert card["test_accuracy"]["tflite"] > 0.8 and card["held_out_non_digits_refused"] > 0.5

    def test_temperature_fitted_and_calibrates_validation(self, small_run):
        # The temperature minimizes NLL. This toy run's raw outputs are already
        # nearly calibrated (ECE 0.024 on 750 inputs, 15 bins), so its ECE
        # after scaling moves within binning noise (measured 0.028): it must
        # stay small. The shipped head, far off raw, is held to more below.
        _, card = small_run
        assert card["temperature"] != 1.0
        ece = card["validation_ece"]
        assert ece["temperature"] < 0.04

    def test_the_shipped_reject_heads_temperature_calibrates_it(self):
        ece = json.loads((MODELS / "reject.json").read_text())["validation_ece"]
        assert ece["temperature"] < ece["uncalibrated"] / 5  # measured 0.0054 against 0.070

    def test_int8_export_is_smaller_and_verified(self, quantized_run):
        out, card = quantized_run
        assert card["tflite_quantization"].startswith("int8")
        assert card["test_accuracy"]["tflite"] >= card["test_accuracy"]["keras"] - 0.001
        assert card["test_accuracy"]["keras"] > 0.85
        # int8 weights: about a quarter of the float32 file.
        assert out.with_suffix(".tflite").stat().st_size < 0.4 * out.stat().st_size

    def test_keras_and_litert_loaders_agree(self, small_run, mnist):
        # Both loaders read the card (logits, temperature) themselves; the
        # export check in training compared raw outputs only.
        from digitwatch.reader.contract import to_model_input
        from digitwatch.reader.model import load_classifier

        out, _ = small_run
        x = to_model_input(mnist.x_test[:200])
        a = load_classifier(out).predict(x)
        b = load_classifier(out.with_suffix(".tflite")).predict(x)
        assert np.abs(a - b).max() < 1e-4
        assert (a.argmax(1) == b.argmax(1)).all()

    def test_mlp_is_the_original_network(self):
        from digitwatch.training.train import build_mlp

        m = build_mlp()
        dense = [layer for layer in m.layers if layer.__class__.__name__ == "Dense"]
        assert [d.units for d in dense] == [128, 128, 10]
        assert m.count_params() == 784 * 128 + 128 + 128 * 128 + 128 + 128 * 10 + 10

    def test_augmenter_keeps_range_and_changes_digits(self, mnist):
        from digitwatch.reader.contract import to_model_input
        from digitwatch.training.train import make_augmenter

        x = to_model_input(mnist.x_train[:64])
        y = make_augmenter(0)(x).numpy()
        assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
        assert np.abs(y - x).mean() > 0.01

    def test_export_mismatch_fails_loudly(self):
        from digitwatch.training.train import verify_export

        p = np.full((3, 10), 0.1, np.float32)
        p[:, 0] = 0.2
        q = p.copy()
        q[1] = np.roll(q[1], 1)
        with pytest.raises(ModelError, match="1 argmax disagreements"):
            verify_export(p, q)
        with pytest.raises(ModelError, match="probability difference"):
            verify_export(p, p + 2e-4)

    def test_int8_export_judged_by_argmax_and_accuracy(self):
        from digitwatch.training.train import verify_export

        labels = np.zeros(1000, np.int64)
        p = np.full((1000, 10), 0.05, np.float32)
        p[:, 0] = 0.55
        # Rounding noise far above the float32 tolerance is fine for int8...
        assert verify_export(p, p + 0.01, labels) == pytest.approx(0.01)
        with pytest.raises(ModelError, match="probability difference"):
            verify_export(p, p + 0.01)
        # ...but changed answers are not: 6 of 1000 is over 0.5%.
        q = p.copy()
        q[:6] = np.roll(q[:6], 1, axis=1)
        with pytest.raises(ModelError, match="int8 export mismatch: 6 argmax"):
            verify_export(p, q, labels)

    def test_unsafe_formats_refused(self, tmp_path):
        from digitwatch.reader.model import load_keras_model

        (tmp_path / "m.h5").write_bytes(b"x")
        with pytest.raises(ModelError, match="only .keras"):
            load_keras_model(tmp_path / "m.h5")


class TestFineTune:
    """--init starts from a trained model's weights; --low-res adds low-resolution digits."""

    @pytest.fixture(scope="class")
    def base(self, mnist_dir, tmp_path_factory):
        from digitwatch.training.train import TrainRequest, run_training

        out = tmp_path_factory.mktemp("base") / "base.keras"
        run_training(TrainRequest(
            data=mnist_dir, arch="cnn", epochs=1, members=1, width=4, out=out, seed=5,
            limit=1200, augment=False, command="digitwatch train (test base)", quantize=False,
        ))
        return out

    def test_fine_tune_starts_from_the_given_weights(self, base, mnist_dir, tmp_path):
        import keras

        from digitwatch.reader.model import load_keras_model
        from digitwatch.training.train import TrainRequest, run_training, sha256_file

        out = tmp_path / "tuned.keras"
        card = run_training(TrainRequest(
            data=mnist_dir, arch="cnn", epochs=1, members=1, width=4, out=out, seed=6,
            limit=1200, augment=False, command="digitwatch train (test tune)", quantize=False,
            low_res=300, init=base,
        ))
        assert card["fine_tuned_from"]["sha256"] == sha256_file(base)
        assert card["fine_tuned_from"]["command"] == "digitwatch train (test base)"  # how the start was made
        assert card["low_res_digits"] == 300
        # 1080 training digits + 300 of them again at low resolution.
        assert card["split"]["train"] == 1380
        assert 0.0 <= card["low_res_validation_accuracy"] <= 1.0
        start, tuned = load_keras_model(base), load_keras_model(out)
        keras.utils.set_random_seed(6)
        from digitwatch.training.train import build_cnn_member

        fresh = build_cnn_member(4, "member_0")
        # One short epoch at a quarter of the rate moves the weights a little;
        # a fresh start is nowhere near them.
        w0, w1, wf = (m.layers[1].get_weights()[0] for m in (start, tuned, fresh))
        assert np.abs(w1 - w0).mean() < 0.5 * np.abs(wf - w0).mean()
        assert not np.array_equal(w1, w0)

    def test_fine_tuning_in_place_records_the_start_and_survives_a_hostile_card(self, base, mnist_dir, tmp_path):
        """--out the same file as --init (as the README's command does): the card
        names the model it started from, not the one it wrote; a planted card
        beside the start (a JSON nesting bomb) costs its command, not the run."""
        import shutil

        from digitwatch.training.train import TrainRequest, run_training, sha256_file

        model = tmp_path / "m.keras"
        shutil.copy(base, model)
        start = sha256_file(model)
        (tmp_path / "m.json").write_text("[" * 100_000 + "]" * 100_000)
        card = run_training(TrainRequest(
            data=mnist_dir, arch="cnn", epochs=1, members=1, width=4, out=model, seed=7,
            limit=1200, augment=False, command="digitwatch train (test in place)", quantize=False, init=model,
        ))
        assert card["fine_tuned_from"]["sha256"] == start != sha256_file(model)
        assert "command" not in card["fine_tuned_from"]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "m.keras", "m.tflite"]

    def test_a_keras_save_cut_short_leaves_the_old_model(self, base, tmp_path, monkeypatch):
        import shutil

        import keras

        from digitwatch.reader.model import load_keras_model
        from digitwatch.training.train import save_without_optimizer, sha256_file

        model = tmp_path / "m.keras"
        shutil.copy(base, model)
        before = sha256_file(model)
        real = keras.Model.save

        def cut_short(self, path, *args, **kwargs):
            real(self, path, *args, **kwargs)
            with open(path, "r+b") as f:
                f.truncate(100)
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(keras.Model, "save", cut_short)
        with pytest.raises(OSError):
            save_without_optimizer(load_keras_model(base), model)
        monkeypatch.undo()
        assert sha256_file(model) == before and sorted(p.name for p in tmp_path.iterdir()) == ["m.keras"]

    def test_init_of_another_shape_is_refused(self, base, mnist_dir, tmp_path):
        from digitwatch.training.train import TrainRequest, run_training

        with pytest.raises(ModelError, match="1 members of 10 classes, not 2 of 10"):
            run_training(TrainRequest(
                data=mnist_dir, arch="cnn", epochs=1, members=2, width=4, out=tmp_path / "x.keras", seed=6,
                limit=1200, augment=False, command="digitwatch train (test refuse)", quantize=False, init=base,
            ))


class TestShippedModel:
    """The model in models/ meets the bar and matches its card."""

    def test_card_matches_files(self):
        from digitwatch.training.train import sha256_file

        card = json.loads((MODELS / "digits.json").read_text())
        for name, digest in card["files"].items():
            assert sha256_file(MODELS / name) == digest

    def test_tflite_accuracy_on_mnist_test(self, mnist, shipped_tflite):
        # The digit model alone, measured here through the loader (card
        # temperature applied), against the bar and against what its card claims.
        from digitwatch.reader.contract import to_model_input
        from digitwatch.reader.model import load_classifier

        classifier = load_classifier(shipped_tflite)

        card = json.loads((MODELS / "digits.json").read_text())
        x = to_model_input(mnist.x_test)
        probs = np.concatenate([classifier.predict(x[i : i + 1000]) for i in range(0, 10000, 1000)])
        measured = float(np.mean(probs.argmax(1) == mnist.y_test))
        assert measured >= 0.995
        assert measured == pytest.approx(card["test_accuracy"]["tflite"], abs=1e-4)


class TestRecipeSteps:
    """Every shipped artefact is made by `digitwatch train --step ...` from the package alone."""

    def test_the_pair_step_trains_from_scratch_and_exports_a_pair_model(self, mnist_dir, tmp_path):
        import subprocess
        import sys

        from digitwatch.reader.model import LiteRTClassifier, OutputSpec

        out = tmp_path / "pairs.tflite"
        r = subprocess.run([sys.executable, "-m", "digitwatch", "train", "--step", "pairs", "--data", str(mnist_dir),
                            "--count", "2000", "--epochs", "1", "--out", str(out)],
                           capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-2000:]
        card = json.loads(out.with_suffix(".json").read_text())
        assert card["command"].startswith("digitwatch train --step pairs")
        assert card["training"]["framework"] == "keras" and card["training"]["train_pictures"] == 2000
        assert card["training"]["int8_same_class"] >= 0.98
        served = LiteRTClassifier(out, pair_model=True, spec=OutputSpec(logits=True))
        p = served.predict(np.zeros((3, 28, 56, 1), np.float32))
        assert p.shape == (3, 101) and np.allclose(p.sum(1), 1, atol=1e-3)

    def test_the_answers_step_refits_a_copy_of_the_shipped_card(self, mnist_dir, tmp_path):
        import shutil
        import subprocess
        import sys

        for f in MODELS.iterdir():
            if f.suffix in (".json", ".tflite"):
                shutil.copy(f, tmp_path / f.name)
        card_path = tmp_path / "digits-reject.json"
        r = subprocess.run([sys.executable, "-m", "digitwatch", "train", "--step", "answers", "--data", str(mnist_dir),
                            "--model", str(card_path), "--singles", "40", "--numbers", "20", "--non-digits", "20",
                            "--write"], capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-2000:]
        card = json.loads(card_path.read_text())
        fitted = card["answer_calibration"]["fitted"]
        assert fitted["command"].startswith("digitwatch train --step answers")
        assert 0.0 < card["recommended_low_confidence"] <= 1.0

    def test_a_step_refuses_options_it_does_not_take(self, tmp_path):
        from tests.conftest import run_cli

        r = run_cli("train", "--step", "pairs", "--bogus", "1", "--out", str(tmp_path / "p.tflite"))
        assert r.returncode == 2 and "bogus" in r.stderr


class TestCorrections:
    """`digitwatch train --corrections`: what people corrected joins the training data."""

    def test_a_small_run_trains_on_the_corrections_and_records_them(self, mnist_dir, tmp_path, capsys):
        import hashlib

        from digitwatch.training.train import TrainRequest, run_training

        folder = tmp_path / "corrections"
        folder.mkdir()
        rng = np.random.default_rng(1)
        for i in range(30):
            sha = hashlib.sha256(str(i).encode()).hexdigest()
            np.save(folder / f"{sha[:32]}.npy", rng.random((1, 28, 28)).astype(np.float32), allow_pickle=False)
            (folder / f"{sha[:32]}.json").write_text(json.dumps(
                {"sha256": sha, "label": str(i % 10), "inputs": f"{sha[:32]}.npy"}))
        card = run_training(TrainRequest(
            data=mnist_dir, arch="mlp", epochs=1, members=1, width=8, out=tmp_path / "m.keras", seed=3,
            limit=2000, augment=False, command="digitwatch train (test)", quantize=False,
            corrections=folder, corrections_repeat=5,
        ))
        assert card["corrections"] == {"folder": str(folder), "repeat": 5}
        out = capsys.readouterr().out
        assert "corrected inputs x5 (30 decisions, 0 unusable" in out
