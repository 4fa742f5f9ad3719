"""Train the pair model: two touching or overlapping digits read as one picture.

    digitwatch train --step pairs --data DIR --out models/pairs.tflite [--count N] [--epochs E]

The number reader cuts touching digits apart along paths through the thinnest
ink; digits that overlap leave no such path, and each cut piece carries a
fragment of its neighbour. The pair model reads such a blob whole: 100 classes
"ab" (10*a + b) and one for "not two digits" (a wide single digit, a digit and
a fragment, three digits, half digits, letters, marks). Its pictures are made
exactly as serving makes them (synth.to_pair -> imaging.finish_pair) from
MNIST *training* digits only: the validation indices (data.split_indices,
seed 0) are kept out and give the held-out figures.

Keras from scratch: AdamW with a one-cycle rate (warm-up then cosine decay), a
random shift of up to 2 px per batch, then int8 export with logits out and
the model card beside it.
"""

from __future__ import annotations

import json
import multiprocessing
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from digitwatch.reader.contract import PAIR_CLASSES, PAIR_REJECT, PAIR_WIDTH, SIDE
from digitwatch.training import synth
from digitwatch.training.data import load_mnist, split_indices

CHANNELS = (32, 64, 128)
HIDDEN = 256
BN_EPS = 1e-5
DROPOUT = 0.3
MAX_SHIFT = 2  # px each way, one shift per batch: the cheap augmentation
WEIGHT_DECAY = 1e-4
WARMUP_SHARE = 0.3  # of all steps: the rate climbs, then decays along a cosine
ROUND_TRIP_MIN_AGREE = 0.98  # int8 .tflite and the float network: same class this often
REFERENCE_PICTURES = 256


@dataclass(frozen=True)
class PairRequest:
    """A `digitwatch train --step pairs` invocation."""

    data: Path | None
    out: Path  # the .tflite; its card is written beside it (.json)
    command: str
    count: int = 600_000
    val_count: int = 20_000
    epochs: int = 12
    batch: int = 512
    lr: float = 3e-3
    seed: int = 0
    procs: int = 0  # processes drawing pictures; 0: one per CPU


def _chunk(args: tuple) -> tuple[np.ndarray, np.ndarray]:
    mnist_dir, which, count, seed = args
    import cv2

    cv2.setNumThreads(1)
    mnist = load_mnist(Path(mnist_dir) if mnist_dir else None)
    train, val = split_indices(len(mnist.x_train), seed=0, limit=None)
    idx = train if which == "train" else val
    x, y = synth.pair_samples(count, np.random.default_rng(seed), mnist.x_train[idx], mnist.y_train[idx])
    return (x * 255).round().astype(np.uint8), y.astype(np.int16)


def make_data(mnist_dir: Path | None, which: str, count: int, seed: int, procs: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` pair pictures (uint8, ink high) from the train or validation digits, in `procs` processes."""
    per = -(-count // (procs * 4))
    jobs = [(mnist_dir and str(mnist_dir), which, per, seed * 100_003 + k) for k in range(procs * 4)]
    with multiprocessing.get_context("fork").Pool(procs) as pool:
        parts = pool.map(_chunk, jobs)
    x = np.concatenate([p[0] for p in parts])[:count]
    y = np.concatenate([p[1] for p in parts])[:count]
    return x, y


def keras_net():
    import keras

    inp = keras.Input((SIDE, PAIR_WIDTH, 1))
    h = inp
    for n, c in enumerate(CHANNELS):
        for _ in range(2 if n < 2 else 1):
            h = keras.layers.Conv2D(c, 3, padding="same")(h)
            h = keras.layers.BatchNormalization(epsilon=BN_EPS)(h)
            h = keras.layers.ReLU()(h)
        h = keras.layers.MaxPooling2D(2)(h)
    h = keras.layers.Flatten()(h)
    h = keras.layers.Dense(HIDDEN, activation="relu")(h)
    h = keras.layers.Dropout(DROPOUT)(h)
    h = keras.layers.Dense(PAIR_CLASSES)(h)
    out = keras.layers.Softmax()(h)
    return keras.Model(inp, out, name="pairs")


def summarize(p: np.ndarray, y: np.ndarray) -> dict:
    """Accuracy on pairs, the share of pairs refused and of non-pairs read as pairs."""
    pred = p.argmax(1)
    pair = y != PAIR_REJECT
    return {
        "pairs_right": round(float((pred[pair] == y[pair]).mean()), 4),
        "pairs_refused": round(float((pred[pair] == PAIR_REJECT).mean()), 4),
        "non_pairs_read_as_pair": round(float((pred[~pair] != PAIR_REJECT).mean()), 4),
    }

def _shifted(x, rng):
    """One random shift of up to MAX_SHIFT px each way for the whole batch."""
    import tensorflow as tf

    dy, dx = (int(v) for v in rng.integers(-MAX_SHIFT, MAX_SHIFT + 1, 2))
    return tf.roll(x, shift=(dy, dx), axis=(1, 2))


def _schedule(lr: float, steps: int):
    import keras

    warmup = max(1, int(steps * WARMUP_SHARE))
    return keras.optimizers.schedules.CosineDecay(
        lr / 25, decay_steps=max(1, steps - warmup), warmup_target=lr, warmup_steps=warmup, alpha=1e-3)


def train_pairs(request: PairRequest) -> dict:
    """Draw the pictures, train from scratch, export int8, check the export, write the card."""
    import keras
    import tensorflow as tf

    from digitwatch.reader.model import LiteRTClassifier, OutputSpec, write_whole
    from digitwatch.training.train import library_versions, sha256_file

    t0 = time.time()
    procs = request.procs or max(1, multiprocessing.cpu_count() or 2)
    x, y = make_data(request.data, "train", request.count, request.seed * 2 + 1, procs)
    xv, yv = make_data(request.data, "validation", request.val_count, request.seed * 2 + 2, procs)
    keras.utils.set_random_seed(request.seed)
    model = keras_net()
    steps = request.epochs * max(1, len(x) // request.batch)
    opt = keras.optimizers.AdamW(_schedule(request.lr, steps), weight_decay=WEIGHT_DECAY)
    loss_fn = keras.losses.SparseCategoricalCrossentropy()
    rng = np.random.default_rng(request.seed)

    @tf.function
    def step(xb, yb):
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, model(xb, training=True))
        opt.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables,
                                strict=True))
        return loss

    xv_f = xv[..., None].astype(np.float32) / 255.0
    for epoch in range(request.epochs):
        order = rng.permutation(len(x))
        for s in range(max(1, len(x) // request.batch)):
            b = order[s * request.batch : (s + 1) * request.batch]
            xb = _shifted(tf.constant(x[b][..., None].astype(np.float32) / 255.0), rng)
            loss = step(xb, tf.constant(y[b].astype(np.int32)))
        validation = summarize(_predict(model, xv_f), yv)
        print(f"epoch {epoch + 1}: loss {float(loss):.3f} validation {json.dumps(validation)} "
              f"({time.time() - t0:.0f} s)", flush=True)
    float_p = _predict(model, xv_f)
    out = request.out
    out.parent.mkdir(parents=True, exist_ok=True)
    write_whole(out, _int8_logits(model, request.data))
    served = LiteRTClassifier(out, pair_model=True, spec=OutputSpec(logits=True)).predict(xv_f[:REFERENCE_PICTURES])
    same = float((served.argmax(1) == float_p[:REFERENCE_PICTURES].argmax(1)).mean())
    if same < ROUND_TRIP_MIN_AGREE:
        from digitwatch.errors import ModelError

        raise ModelError(f"the int8 pair model agrees with the float network on {same:.1%} of pictures")
    trained = {
        **{k: v for k, v in asdict(request).items() if k not in ("data", "out", "command", "procs")},
        "train_pictures": len(x), "validation_pictures": len(xv), "validation": summarize(float_p, yv),
        "int8_same_class": same, "seconds": round(time.time() - t0), "framework": "keras",
    }
    card = {
        "name": "digitwatch pair reader",
        "about": "Two touching or overlapping digits read as one 28x56 picture (contract.to_pair_input): "
                 "classes 10*a+b for 'ab', 100 for 'not two digits'. Trained on MNIST training digits composed "
                 "into pairs and non-pairs (synth.pair_samples), validation digits held out. "
                 "Weights and activations int8, logits out; 'validation' is the float network's.",
        "data_sources": ["MNIST training split (validation indices held out)",
                         "synth.pair_samples: compositions of those digits, fragments, drawn marks"],
        "outputs": "logits",
        "input": f"float32 (N, {SIDE}, {PAIR_WIDTH}, 1) in [0, 1], ink high, pair height 20 px",
        "classes": PAIR_CLASSES,
        "command": request.command,
        "training": trained,
        "versions": library_versions(),
        "sha256": sha256_file(out),
    }
    write_whole(out.with_suffix(".json"), json.dumps(card, indent=1) + "\n")
    return card


def _predict(model, x: np.ndarray, batch: int = 4096) -> np.ndarray:
    return np.concatenate([np.asarray(model(x[i : i + batch], training=False)) for i in range(0, len(x), batch)])


def _int8_logits(model, mnist_dir: Path | None) -> bytes:
    """The network without its softmax, weights and activations int8 (input
    and output float32): 4x less CPU than float32 (1.51 -> 0.38 ms per
    picture measured here), the same class for 99.97% of validation pictures.
    Logits leave the graph: an int8 softmax says at most 255/256. Quantization
    ranges come from 400 pictures of *training* digits."""
    import keras
    import tensorflow as tf

    logits = keras.Model(model.input, model.layers[-2].output)
    mnist = load_mnist(mnist_dir)
    train, _ = split_indices(len(mnist.x_train), seed=0, limit=None)
    cal, _ = synth.pair_samples(400, np.random.default_rng(7), mnist.x_train[train], mnist.y_train[train])
    converter = tf.lite.TFLiteConverter.from_keras_model(logits)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]

    def samples():
        for i in range(0, len(cal), 10):
            yield [cal[i : i + 10, ..., None].astype(np.float32)]

    converter.representative_dataset = samples
    return converter.convert()
