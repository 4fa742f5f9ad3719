"""Training, evaluation metrics and export. The only module that imports TensorFlow.

Reads like a recipe: data -> model -> train -> export -> verify. The
augmentation prepares the network for what `digitwatch.reader.imaging` produces from
real scans (slightly different stroke widths, blur, residual noise, imperfect
centring), so it is applied to the MNIST digits as they are, in 28x28 space.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from digitwatch.errors import ModelError
from digitwatch.reader.contract import DIGITS, INPUT_DESCRIPTION, REJECT, SIDE, to_model_input
from digitwatch.reader.model import load_keras_model, replace_whole, to_probabilities, write_whole
from digitwatch.training.data import Mnist, split_indices

# TensorFlow logs a wall of CUDA probing on machines without a GPU.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from keras import layers  # noqa: E402

BATCH_SIZE = 128
PEAK_LR = 2e-3
LABEL_SMOOTHING = 0.1
EXPORT_ATOL = 1e-4  # float32 export: probabilities agree this closely
# int8 export: rounding moves probabilities by ~1e-2 (measured 0.013 at most on
# MNIST test), so it is held to what users see instead: the argmax.
QUANT_MAX_DISAGREE = 0.005  # at most 0.5% of test digits classified differently
QUANT_MAX_DROP = 0.001  # and at most 0.1 points of test accuracy lost
CALIBRATION_SIZE = 1_000  # training digits that set the int8 activation ranges
# Fine-tuning (--init) starts from trained weights: a quarter of the peak rate
# moves them toward the new data without first wrecking what they know.
FINE_TUNE_LR = 0.25


@dataclass(frozen=True)
class TrainSettings:
    """Everything that determines a training run."""

    arch: str = "cnn"
    epochs: int = 20
    members: int = 4
    width: int = 24
    seed: int = 0
    limit: int | None = None  # use only the first N training digits (tests, smoke runs)
    augment: bool = True
    reject: bool = False  # an 11th class, "not a digit", trained on synthetic non-digits
    synthetic_rejects: int = 40_000  # with reject: drawn non-digits added to training
    font_digits: int = 10_000  # with reject: Hershey-font digits added as "other hands"
    renormalized: int = 0  # with reject: training digits again, through synth's crop normalization
    low_res: int = 0  # training digits again as low-resolution scans (synth.low_res)
    init: Path | None = None  # start from this .keras model's weights (fine-tuning) instead of at random
    corrections: Path | None = None  # a review station's corrections folder: its training part is added
    corrections_repeat: int = 20  # ... this many times over (a few hundred inputs among 54,000)
    fine_tune_rate: float = FINE_TUNE_LR  # with init: the peak rate's share

    @property
    def classes(self) -> int:
        return DIGITS + 1 if self.reject else DIGITS


@dataclass(frozen=True)
class TrainOutcome:
    """What a training run produced, for the model card."""

    model: keras.Model
    val_accuracy: float
    member_val_accuracy: list[float]
    wall_seconds: float
    train_count: int
    val_count: int
    val_outputs: np.ndarray  # the model's raw outputs on the validation split
    val_labels: np.ndarray


def split_train_validation(
    mnist: Mnist, *, seed: int, limit: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Hold out a validation split of the training digits; the test set is never touched."""
    train, val = split_indices(len(mnist.x_train), seed=seed, limit=limit)
    return (
        to_model_input(mnist.x_train[train]),
        mnist.y_train[train],
        to_model_input(mnist.x_train[val]),
        mnist.y_train[val],
    )


# ---------------------------------------------------------------- models


def build_mlp(classes: int = DIGITS, logits: bool = False) -> keras.Model:
    """The original student network: 128-128-10 dense."""
    inputs = keras.Input((SIDE, SIDE, 1), name="digit")
    x = layers.Flatten()(inputs)
    x = layers.Dense(128, activation="relu")(x)
    x = layers.Dense(128, activation="relu")(x)
    outputs = layers.Dense(classes, activation=None if logits else "softmax")(x)
    return keras.Model(inputs, outputs, name="mlp")


def build_cnn_member(width: int, name: str, classes: int = DIGITS, logits: bool = False) -> keras.Model:
    """A batch-norm CNN: two stride-2 stages, then a 4x4 conv to a 1x1 feature
    vector. With `logits` the last layer has no softmax (serving applies it,
    calibrated)."""
    inputs = keras.Input((SIDE, SIDE, 1), name="digit")

    def conv(x, filters: int, kernel: int, strides: int = 1, padding: str = "valid"):
        x = layers.Conv2D(filters, kernel, strides=strides, padding=padding, use_bias=False)(x)
        x = layers.BatchNormalization()(x)
        return layers.ReLU()(x)

    x = conv(inputs, width, 3)
    x = conv(x, width, 3)
    x = conv(x, width, 5, strides=2, padding="same")
    x = layers.Dropout(0.4)(x)
    x = conv(x, 2 * width, 3)
    x = conv(x, 2 * width, 3)
    x = conv(x, 2 * width, 5, strides=2, padding="same")
    x = layers.Dropout(0.4)(x)
    x = conv(x, 4 * width, 4)
    x = layers.Flatten()(x)
    x = layers.Dropout(0.4)(x)
    outputs = layers.Dense(classes, activation=None if logits else "softmax")(x)
    return keras.Model(inputs, outputs, name=name)


def build_ensemble(members: list[keras.Model]) -> keras.Model:
    """Average member outputs (probabilities, or logits) inside one graph, so one
    file serves them all."""
    if len(members) == 1:
        return members[0]
    inputs = keras.Input((SIDE, SIDE, 1), name="digit")
    outputs = layers.Average(name="mean_probability")([m(inputs) for m in members])
    return keras.Model(inputs, outputs, name=f"cnn_ensemble_{len(members)}")


# ---------------------------------------------------------------- augmentation


def _random_affine(x: tf.Tensor, rng: tf.random.Generator) -> tf.Tensor:
    """Rotation, anisotropic zoom, shear and shift: imperfect crops and slanted writing."""
    n = tf.shape(x)[0]
    angle = rng.uniform([n], -0.17, 0.17)  # about 10 degrees
    zoom_x = rng.uniform([n], 0.9, 1.12)  # inverse map: >1 shrinks the digit
    zoom_y = zoom_x * rng.uniform([n], 0.92, 1.08)
    shear = rng.uniform([n], -0.15, 0.15)
    shift_x = rng.uniform([n], -1.5, 1.5)
    shift_y = rng.uniform([n], -1.5, 1.5)
    cos, sin = tf.cos(angle), tf.sin(angle)
    # Output -> input pixel map: M = R(angle) @ Shear @ diag(zoom), about the centre.
    m00 = zoom_x * cos
    m01 = zoom_y * (cos * shear - sin)
    m10 = zoom_x * sin
    m11 = zoom_y * (sin * shear + cos)
    c = (SIDE - 1) / 2.0
    a2 = c - m00 * c - m01 * c + shift_x
    b2 = c - m10 * c - m11 * c + shift_y
    zeros = tf.zeros_like(angle)
    transforms = tf.stack([m00, m01, a2, m10, m11, b2, zeros, zeros], axis=1)
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=x,
        transforms=transforms,
        output_shape=[SIDE, SIDE],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="CONSTANT",
    )


def _blend(x: tf.Tensor, target: tf.Tensor, amount: tf.Tensor) -> tf.Tensor:
    return x + amount[:, None, None, None] * (target - x)


def _gated(rng: tf.random.Generator, n: tf.Tensor, p: float, low: float, high: float):
    """Per-sample amount in [low, high] with probability p, else 0."""
    on = tf.cast(rng.uniform([n]) < p, tf.float32)
    return on * rng.uniform([n], low, high)


_BLUR = tf.constant(
    np.outer([0.25, 0.5, 0.25], [0.25, 0.5, 0.25]).reshape(3, 3, 1, 1), dtype=tf.float32
)


def make_augmenter(seed: int) -> Callable[[tf.Tensor], tf.Tensor]:
    """Batch augmentation in graph ops: affine jitter, stroke width, blur, noise."""
    rng = tf.random.Generator.from_seed(seed)

    def augment(x: tf.Tensor) -> tf.Tensor:
        n = tf.shape(x)[0]
        x = _random_affine(x, rng)
        dilated = tf.nn.max_pool2d(x, 3, 1, "SAME")
        eroded = -tf.nn.max_pool2d(-x, 3, 1, "SAME")
        x = _blend(x, dilated, _gated(rng, n, 0.25, 0.2, 1.0))
        x = _blend(x, eroded, _gated(rng, n, 0.12, 0.2, 0.5))
        blurred = tf.nn.conv2d(x, _BLUR, 1, "SAME")
        x = _blend(x, blurred, _gated(rng, n, 0.25, 0.3, 1.0))
        # Residual noise inside the strokes after normalization.
        sigma = _gated(rng, n, 0.15, 0.0, 0.05)[:, None, None, None]
        x = x + sigma * rng.normal(tf.shape(x))
        return tf.clip_by_value(x, 0.0, 1.0)

    return augment


# ---------------------------------------------------------------- training


def _fit_verbosity() -> int:
    """Keras progress bars on a terminal, one line per epoch in logs and CI."""
    return 1 if sys.stdout.isatty() else 2


def _dataset(x, y, *, classes: int, seed: int, augment: bool, batch: int = BATCH_SIZE) -> tf.data.Dataset:
    ds = tf.data.Dataset.from_tensor_slices((x, keras.ops.one_hot(y, classes)))
    ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True).batch(batch)
    if augment:
        augmenter = make_augmenter(seed)
        ds = ds.map(lambda a, b: (augmenter(a), b), num_parallel_calls=1)
    return ds.prefetch(2)


def _train_member(
    index: int, settings: TrainSettings, x_train, y_train, x_val, y_val, start: keras.Model | None = None
) -> tuple[keras.Model, float]:
    seed = settings.seed * 1000 + index
    keras.utils.set_random_seed(seed)
    model = start or build_cnn_member(
        settings.width, name=f"member_{index}", classes=settings.classes, logits=settings.reject
    )
    peak = PEAK_LR * (settings.fine_tune_rate if start is not None else 1.0)
    steps = math.ceil(len(x_train) / BATCH_SIZE) * settings.epochs
    warmup = min(steps // 10, math.ceil(len(x_train) / BATCH_SIZE))
    schedule = keras.optimizers.schedules.CosineDecay(
        peak / 20, decay_steps=max(1, steps - warmup), alpha=0.005,
        warmup_target=peak, warmup_steps=warmup,
    )
    model.compile(
        optimizer=keras.optimizers.Adam(schedule),
        loss=keras.losses.CategoricalCrossentropy(
            from_logits=settings.reject, label_smoothing=LABEL_SMOOTHING
        ),
        metrics=["accuracy"],
    )
    print(f"member {index + 1}/{settings.members}: {model.count_params()} parameters", flush=True)
    model.fit(
        _dataset(x_train, y_train, classes=settings.classes, seed=seed, augment=settings.augment),
        validation_data=_dataset(
            x_val, y_val, classes=settings.classes, seed=seed, augment=False, batch=1000
        ),
        epochs=settings.epochs,
        verbose=_fit_verbosity(),
    )
    return model, accuracy(predict(model, x_val), y_val)


def with_synthetic(
    mnist: Mnist, settings: TrainSettings
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The training split plus, for the 11-class model, drawn non-digits (label
    REJECT) and Hershey-font digits; the validation split gets its own
    non-digits from another seed. Compositions use training digits only."""
    x_train, y_train, x_val, y_val = split_train_validation(
        mnist, seed=settings.seed, limit=settings.limit
    )
    from digitwatch.training import synth

    train_idx, _ = split_indices(len(mnist.x_train), seed=settings.seed, limit=settings.limit)
    images, labels = mnist.x_train[train_idx], mnist.y_train[train_idx]
    if settings.low_res:
        rng = np.random.default_rng(settings.seed + 505)
        pick = rng.choice(len(images), min(settings.low_res, len(images)), replace=False)
        x_train = np.concatenate([x_train, synth.low_res(images[pick], rng)[..., None]])
        y_train = np.concatenate([y_train, labels[pick]])
        print(f"training on {len(pick)} training digits again as low-resolution scans", flush=True)
    if settings.corrections is not None:
        from digitwatch.training import corrections

        fixed = corrections.load(settings.corrections)
        if len(fixed.x_train):
            x_train = np.concatenate([x_train, np.repeat(fixed.x_train[..., None], settings.corrections_repeat, 0)])
            y_train = np.concatenate([y_train, np.repeat(fixed.y_train, settings.corrections_repeat)])
        print(f"training on {len(fixed.x_train)} corrected inputs x{settings.corrections_repeat} "
              f"({fixed.decisions} decisions, {fixed.unusable} unusable, {len(fixed.x_held)} inputs held out)",
              flush=True)
    if not settings.reject:
        return x_train, y_train, x_val, y_val
    rng = np.random.default_rng(settings.seed + 101)
    rejects, _ = synth.rejects(settings.synthetic_rejects, rng, images, labels)
    fonts, font_labels = synth.font_digits(settings.font_digits, rng)
    if settings.renormalized:
        pick = rng.choice(len(images), min(settings.renormalized, len(images)), replace=False)
        fonts = np.concatenate([fonts, synth.renormalized(images[pick])])
        font_labels = np.concatenate([font_labels, labels[pick]])
    val_rejects, _ = synth.rejects(max(1, len(x_val) // 2), np.random.default_rng(settings.seed + 202),
                                   images, labels)
    x_train = np.concatenate([x_train, rejects[..., None], fonts[..., None]])
    y_train = np.concatenate([y_train, np.full(len(rejects), REJECT, np.uint8), font_labels])
    x_val = np.concatenate([x_val, val_rejects[..., None]])
    y_val = np.concatenate([y_val, np.full(len(val_rejects), REJECT, np.uint8)])
    print(f"training on {len(x_train)} inputs: {len(rejects)} drawn non-digits, "
          f"{len(fonts)} font digits", flush=True)
    return x_train, y_train, x_val, y_val


def train(mnist: Mnist, settings: TrainSettings) -> TrainOutcome:
    """Train the requested architecture on the training split; never sees the test set."""
    started = time.monotonic()
    x_train, y_train, x_val, y_val = with_synthetic(mnist, settings)
    if settings.arch == "mlp":
        keras.utils.set_random_seed(settings.seed)
        model = build_mlp(settings.classes, logits=settings.reject)
        model.compile(
            optimizer="adam",
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=settings.reject),
            metrics=["accuracy"],
        )
        model.fit(
            x_train, y_train, epochs=settings.epochs, validation_data=(x_val, y_val),
            verbose=_fit_verbosity(),
        )
        members_acc = [accuracy(predict(model, x_val), y_val)]
    elif settings.arch == "cnn":
        members, members_acc = [], []
        starts = _members_of(settings.init, settings) if settings.init else [None] * settings.members
        for index in range(settings.members):
            member, acc = _train_member(index, settings, x_train, y_train, x_val, y_val, starts[index])
            print(f"member {index + 1}: validation accuracy {acc:.4f}", flush=True)
            members.append(member)
            members_acc.append(acc)
        model = build_ensemble(members)
    else:
        raise ValueError(f"unknown architecture {settings.arch!r}")
    val_outputs = predict(model, x_val)
    val_acc = accuracy(val_outputs, y_val)
    return TrainOutcome(
        model=model,
        val_accuracy=val_acc,
        member_val_accuracy=members_acc,
        wall_seconds=time.monotonic() - started,
        train_count=len(x_train),
        val_count=len(x_val),
        val_outputs=val_outputs,
        val_labels=y_val,
    )


def _provenance(init: Path, rate: float = FINE_TUNE_LR) -> dict:
    """Where a fine-tuned model started: the file, and how that was made (its
    card's command and own provenance), so the chain can be retraced."""
    entry: dict = {"model": str(init), "sha256": sha256_file(init), "peak_lr_factor": rate}
    try:
        card = json.loads(init.with_suffix(".json").read_text())
    except (OSError, ValueError, RecursionError):  # no card, or not one: the checksum still says what it was
        return entry
    if isinstance(card, dict):
        entry["command"] = card.get("command")
        if isinstance(card.get("fine_tuned_from"), dict):
            entry["fine_tuned_from"] = card["fine_tuned_from"]
    return entry


def _members_of(path: Path, settings: TrainSettings) -> list[keras.Model]:
    """The members of a trained .keras model, to fine-tune; refused unless the
    model is the architecture the settings ask for."""
    model = load_keras_model(path)
    members = [layer for layer in model.layers if isinstance(layer, keras.Model)] or [model]
    classes = int(members[0].output_shape[-1])
    if len(members) != settings.members or classes != settings.classes:
        raise ModelError(f"--init {path}: {len(members)} members of {classes} classes, "
                         f"not {settings.members} of {settings.classes}")
    return members


def predict(model: keras.Model, x: np.ndarray, batch: int = 1000) -> np.ndarray:
    """Class probabilities for float inputs (N, 28, 28, 1)."""
    return np.asarray(model.predict(x, batch_size=batch, verbose=0))


def accuracy(probabilities: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(probabilities, axis=1) == labels))


# ---------------------------------------------------------------- save, export, verify


def _uncompiled(model: keras.Model) -> keras.Model:
    # clone_model would copy the compile state too; from_config does not.
    clone = keras.Model.from_config(model.get_config())
    clone.set_weights(model.get_weights())
    return clone


def save_without_optimizer(model: keras.Model, path: Path) -> None:
    """Save graph and weights only. Compiled members would each carry their Adam
    state (twice their weights) into the file, even through a reload."""
    members = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    bare = build_ensemble([_uncompiled(m) for m in members]) if members else _uncompiled(model)
    # Whole or not at all: `--out` may be the `--init` model itself, and a
    # save cut short would lose both.
    replace_whole(path, bare.save)


def export_tflite(model: keras.Model, path: Path, calibration: np.ndarray | None = None) -> None:
    """Convert to .tflite; the batch dimension stays dynamic (-1).

    With `calibration` digits the weights and activations are int8 (input and
    output stay float32, so callers do not change): about 4x faster on CPU,
    which is where the daemon spends its model time. Without, float32."""
    # from_keras_model captures the Keras 3 variables; a hand-made concrete
    # function did not (its .tflite computed NaN).
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if calibration is not None:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]

        def samples():
            for i in range(0, len(calibration), 10):
                yield [to_model_input(calibration[i : i + 10])]

        converter.representative_dataset = samples
    write_whole(path, converter.convert())


def verify_export(
    keras_probs: np.ndarray, tflite_probs: np.ndarray, labels: np.ndarray | None = None
) -> float:
    """The .tflite must behave like the .keras. Float32 (no labels): every argmax
    and every probability to EXPORT_ATOL. int8 (labels given): argmax
    disagreements and accuracy loss within QUANT_MAX_DISAGREE / QUANT_MAX_DROP."""
    disagree = int(np.sum(np.argmax(keras_probs, 1) != np.argmax(tflite_probs, 1)))
    max_diff = float(np.max(np.abs(keras_probs - tflite_probs)))
    if labels is None:
        if disagree or max_diff >= EXPORT_ATOL:
            raise ModelError(
                f"export mismatch: {disagree} argmax disagreements, max probability difference "
                f"{max_diff:.2e} (limit {EXPORT_ATOL:.0e})"
            )
        return max_diff
    drop = accuracy(keras_probs, labels) - accuracy(tflite_probs, labels)
    if disagree > QUANT_MAX_DISAGREE * len(labels) or drop > QUANT_MAX_DROP:
        raise ModelError(
            f"int8 export mismatch: {disagree} argmax disagreements of {len(labels)} "
            f"(limit {QUANT_MAX_DISAGREE:.1%}), accuracy {drop:+.2%} lost "
            f"(limit {QUANT_MAX_DROP:.1%}); try --no-quantize"
        )
    return max_diff


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def library_versions() -> dict[str, str]:
    import ai_edge_litert
    import cv2

    return {
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        "opencv": cv2.__version__,
        "ai_edge_litert": getattr(ai_edge_litert, "__version__", "unknown"),
    }


def write_model_card(path: Path, card: dict) -> None:
    write_whole(path, json.dumps(card, indent=2, sort_keys=False) + "\n")


# ---------------------------------------------------------------- the whole recipe


@dataclass(frozen=True)
class TrainRequest:
    """A `digitwatch train` invocation."""

    data: Path | None
    arch: str
    epochs: int
    members: int
    width: int
    out: Path
    seed: int
    limit: int | None
    augment: bool
    command: str
    quantize: bool = True
    reject: bool = False
    synthetic_rejects: int = 40_000
    font_digits: int = 10_000
    renormalized: int = 0
    low_res: int = 0
    init: Path | None = None
    corrections: Path | None = None
    corrections_repeat: int = 20
    fine_tune_rate: float = FINE_TUNE_LR


def _held_out_rejects(mnist: Mnist, seed: int, count: int = 2000) -> np.ndarray:
    """Non-digits never trained on: another seed, letters in the held-out face
    only, compositions of MNIST *test* digits. Reported, never selected on."""
    from digitwatch.training import synth

    rng = np.random.default_rng(seed + 303)
    kinds = [
        synth.RejectKind(k.name, k.weight, lambda r, f=k.make: f(r, [synth.HELD_OUT_FACE]))
        if k.name.startswith("letter") else k
        for k in synth.REJECT_KINDS
    ]
    x, _ = synth.rejects(count, rng, mnist.x_test, mnist.y_test, kinds)
    return x[..., None]


def run_training(request: TrainRequest) -> dict:
    """Train, save .keras, export .tflite, verify the pair on MNIST test, write the card."""
    from digitwatch.reader.model import LiteRTClassifier, OutputSpec
    from digitwatch.training.calibration import expected_calibration_error, fit_temperature
    from digitwatch.training.data import load_mnist

    mnist = load_mnist(request.data)
    settings = TrainSettings(
        arch=request.arch, epochs=request.epochs, members=request.members,
        width=request.width, seed=request.seed, limit=request.limit, augment=request.augment,
        reject=request.reject, synthetic_rejects=request.synthetic_rejects,
        font_digits=request.font_digits, renormalized=request.renormalized,
        low_res=request.low_res, init=request.init, corrections=request.corrections,
        corrections_repeat=request.corrections_repeat, fine_tune_rate=request.fine_tune_rate,
    )
    # Before training: with --out the same file as --init, the start is
    # overwritten by the end, and its checksum would name the wrong model.
    provenance = _provenance(settings.init, settings.fine_tune_rate) if settings.init else None
    outcome = train(mnist, settings)
    out = request.out
    out.parent.mkdir(parents=True, exist_ok=True)
    tflite_path, card_path = out.with_suffix(".tflite"), out.with_suffix(".json")
    save_without_optimizer(outcome.model, out)
    calibration = None
    if request.quantize:
        # The int8 ranges must cover what serving sees: digits, and (11 classes)
        # non-digits, whose activations differ.
        calibration = to_model_input(mnist.x_train[:CALIBRATION_SIZE])
        if settings.reject:
            n = CALIBRATION_SIZE // 4
            from digitwatch.training import synth

            drawn, _ = synth.rejects(n, np.random.default_rng(request.seed + 404), mnist.x_train, mnist.y_train)
            calibration = np.concatenate([calibration[: CALIBRATION_SIZE - n], drawn[..., None]])
    export_tflite(outcome.model, tflite_path, calibration)

    # A first temperature from the validation split (28x28 digits and drawn
    # non-digits); `tests/bench/calibrate.py` refits it on realistic scans.
    logits = settings.reject
    val_z = outcome.val_outputs if logits else np.log(np.clip(outcome.val_outputs, 1e-12, 1))
    temperature = fit_temperature(val_z, outcome.val_labels) if settings.reject else 1.0
    spec = OutputSpec(logits=logits, temperature=1.0)

    # The test set is only measured here, after training is over: it reports,
    # it never selects. The reloaded .keras is what users will load.
    x_test = to_model_input(mnist.x_test)
    keras_probs = spec.apply(predict(load_keras_model(out), x_test))
    tflite = LiteRTClassifier(tflite_path, spec=spec)
    tflite_probs = tflite.predict(x_test)
    max_diff = verify_export(keras_probs, tflite_probs, mnist.y_test if request.quantize else None)
    extra: dict[str, Any] = {}
    if settings.low_res:
        # Validation digits (never trained on) as low-resolution scans, another seed.
        _, val_idx = split_indices(len(mnist.x_train), seed=settings.seed, limit=settings.limit)
        from digitwatch.training import synth

        small = synth.low_res(mnist.x_train[val_idx], np.random.default_rng(settings.seed + 606))
        extra["low_res_validation_accuracy"] = accuracy(tflite.predict(small), mnist.y_train[val_idx])
    if settings.reject:
        rej = tflite.predict(_held_out_rejects(mnist, settings.seed))
        val_p = to_probabilities(outcome.val_outputs, logits=True)
        val_t = to_probabilities(outcome.val_outputs, logits=True, temperature=temperature)
        right = val_p.argmax(1) == outcome.val_labels
        extra |= {
            "test_rejected_as_not_digit": float(np.mean(tflite_probs.argmax(1) == REJECT)),
            "held_out_non_digits_refused": float(np.mean(rej.argmax(1) == REJECT)),
            "validation_ece": {
                "uncalibrated": expected_calibration_error(val_p.max(1), right),
                "temperature": expected_calibration_error(val_t.max(1), right),
            },
        }

    card = {
        "name": "digitwatch digits",
        "architecture": (
            f"{settings.members} x BN-CNN (width {settings.width}) averaged"
            if settings.arch == "cnn" else f"MLP 128-128-{settings.classes}"
        ),
        "arch": settings.arch,
        "members": settings.members,
        "parameters": int(outcome.model.count_params()),
        "input": INPUT_DESCRIPTION,
        "output": (
            f"float32 (N, {settings.classes}) logits (averaged over members); serving applies "
            f"softmax(logits / temperature); class {REJECT} = not a digit"
            if logits else f"float32 (N, {settings.classes}) class probabilities"
        ),
        "classes": settings.classes,
        "outputs": "logits" if logits else "probabilities",
        "temperature": temperature,
        "synthetic": (
            {"non_digits": settings.synthetic_rejects, "font_digits": settings.font_digits,
             "renormalized_digits": settings.renormalized}
            if settings.reject else None
        ),
        "low_res_digits": settings.low_res,
        "corrections": None if settings.corrections is None else {
            "folder": str(settings.corrections), "repeat": settings.corrections_repeat},
        "fine_tuned_from": provenance,
        "command": request.command,
        "epochs": settings.epochs,
        "seed": settings.seed,
        "augmentation": settings.augment,
        "data": {"source": mnist.source, "sha256": mnist.checksums},
        "split": {"train": outcome.train_count, "validation": outcome.val_count,
                  "test": len(x_test)},
        "validation_accuracy": outcome.val_accuracy,
        "member_validation_accuracy": outcome.member_val_accuracy,
        "test_accuracy": {
            "keras": accuracy(keras_probs, mnist.y_test),
            "tflite": accuracy(tflite_probs, mnist.y_test),
        },
        "tflite_quantization": (
            f"int8 weights and activations, float32 input/output; calibrated on the first "
            f"{CALIBRATION_SIZE} training digits" if request.quantize else "none (float32)"
        ),
        "export_max_probability_difference": max_diff,
        **extra,
        "training_wall_seconds": round(outcome.wall_seconds, 1),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "versions": library_versions(),
        "files": {
            out.name: sha256_file(out),
            tflite_path.name: sha256_file(tflite_path),
        },
    }
    write_model_card(card_path, card)
    return card
