"""The typer application. Commands are thin; this is the one place where domain
errors become exit codes.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import sys
from enum import Enum, StrEnum
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from digitwatch import __version__
from digitwatch.config import CHOICES, HELP, KEYS, Settings
from digitwatch.errors import DigitwatchError
from digitwatch.reader.imaging import DEFAULT_MAX_PIXELS
from digitwatch.reader.prepare import threshold_for

# Built from config.CHOICES so the CLI and the config file accept the same words.
Expect = Enum("Expect", [(c, c) for c in CHOICES["expect"]], type=str)  # type: ignore[misc]

app = typer.Typer(
    add_completion=True,
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
    help="Read handwritten digits off scans dropped into an inbox folder.",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"digitwatch {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Read handwritten digits off scans dropped into an inbox folder."""


class Arch(StrEnum):
    cnn = "cnn"
    mlp = "mlp"


class Step(StrEnum):
    """The recipe's steps, in the order they make the shipped models (docs/training.md)."""

    digits = "digits"  # the digit ensemble, or with --reject the 11-class head
    pairs = "pairs"  # the pair reader (two touching digits as one picture)
    temperature = "temperature"  # a model's temperature on realistic scans
    answers = "answers"  # the whole-answer map and thresholds of a pair card


class ReportFormat(StrEnum):
    table = "table"
    json = "json"


DataOption = Annotated[
    Path | None,
    typer.Option(
        "--data",
        help="MNIST as an IDX folder or mnist.npz; default: Keras' downloader.",
    ),
]


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train(
    ctx: typer.Context,
    data: DataOption = None,
    step: Annotated[Step, typer.Option(
        help="digits (the default), pairs, temperature or answers; the last two take their own "
             "options after it (--model, --write, ...: `digitwatch train --step answers -- --help`).")] = Step.digits,
    count: Annotated[int, typer.Option(min=1, help="--step pairs: training pictures drawn.")] = 600_000,
    arch: Annotated[Arch, typer.Option(help="cnn (shipped) or mlp (the original baseline).")] = Arch.cnn,
    epochs: Annotated[int | None, typer.Option(help="Default: 20 for cnn, 3 for mlp.")] = None,
    members: Annotated[int, typer.Option(help="cnn: ensemble members averaged in one graph.")] = 4,
    width: Annotated[int, typer.Option(help="cnn: filters in the first stage.")] = 24,
    out: Annotated[Path, typer.Option(help="Where to write the .keras model.")] = Path(
        "models/digits.keras"
    ),
    seed: Annotated[int, typer.Option(help="Random seed for split, init and augmentation.")] = 0,
    limit: Annotated[
        int | None, typer.Option(help="Train on only the first N training digits (smoke runs).")
    ] = None,
    augment: Annotated[bool, typer.Option(help="cnn: scan-like augmentation.")] = True,
    quantize: Annotated[
        bool, typer.Option(help="int8 .tflite (about 4x faster on CPU); --no-quantize keeps float32.")
    ] = True,
    reject: Annotated[
        bool, typer.Option(help="Add an 11th class, 'not a digit', trained on drawn non-digits.")
    ] = False,
    synthetic: Annotated[
        int,
        typer.Option(
            min=0, help="With --reject: drawn non-digits (font digits: a quarter; renormalized MNIST: a half)."
        ),
    ] = 40_000,
    low_res: Annotated[
        int, typer.Option(min=0, help="Add this many training digits again as low-resolution scans (fax, 8x8 grids).")
    ] = 0,
    init: Annotated[
        Path | None,
        typer.Option(help="Fine-tune: start from this .keras model (same members, classes), at 1/4 the rate."),
    ] = None,
    corrections: Annotated[
        Path | None,
        typer.Option(help="A review station's corrections folder: its training part joins MNIST "
                          "(with --init: fine-tune the shipped model on what people corrected)."),
    ] = None,
    corrections_repeat: Annotated[int, typer.Option(min=1, help="How many times over the corrections are seen.")] = 20,
    fine_tune_rate: Annotated[float, typer.Option(min=0.001, max=1.0,
                                                  help="With --init: the share of the peak learning rate.")] = 0.25,
) -> None:
    """Train on MNIST, export .tflite beside the .keras, verify, write the model card.
    Each shipped model is made by one or more of these steps; its card records them."""
    command = "digitwatch " + shlex.join(sys.argv[1:])
    if step in (Step.temperature, Step.answers):
        from digitwatch.training import answers, calibrate

        argv = (["--data", str(data)] if data else []) + [a for a in ctx.args if a != "--"]
        (answers if step is Step.answers else calibrate).main(argv, command=command)
        return
    if ctx.args:
        raise typer.BadParameter(f"unknown options for --step {step.value}: {' '.join(ctx.args)}")
    if step is Step.pairs:
        from digitwatch.training.pairs import PairRequest, train_pairs

        if out.suffix != ".tflite":
            raise typer.BadParameter("--step pairs: --out must end in .tflite", param_hint="--out")
        card = train_pairs(PairRequest(data=data, out=out, command=command, count=count,
                                       val_count=min(20_000, max(count // 30, 100)),
                                       epochs=epochs if epochs is not None else 12, seed=seed))
        typer.echo(f"wrote {out} and {out.with_suffix('.json')}: validation {card['training']['validation']}")
        return
    from digitwatch.training.train import TrainRequest, run_training

    if out.suffix != ".keras":
        raise typer.BadParameter("--out must end in .keras", param_hint="--out")
    request = TrainRequest(
        data=data,
        arch=arch.value,
        epochs=epochs if epochs is not None else (20 if arch is Arch.cnn else 3),
        members=members if arch is Arch.cnn else 1,
        width=width,
        out=out,
        seed=seed,
        limit=limit,
        augment=augment and arch is Arch.cnn,
        quantize=quantize,
        reject=reject,
        synthetic_rejects=synthetic,
        font_digits=synthetic // 4,
        renormalized=synthetic // 2,
        low_res=low_res,
        init=init,
        corrections=corrections,
        corrections_repeat=corrections_repeat,
        fine_tune_rate=fine_tune_rate,
        command=command,
    )
    card = run_training(request)
    typer.echo(
        f"wrote {out}, {out.with_suffix('.tflite')} and {out.with_suffix('.json')}: "
        f"validation {card['validation_accuracy']:.4f}, "
        f"MNIST test {card['test_accuracy']['tflite']:.4f} (tflite)"
    )


class OutFormat(StrEnum):
    table = "table"
    csv = "csv"
    jsonl = "jsonl"


ModelOption = Annotated[
    Path | None,
    typer.Option(
        help="A .tflite (LiteRT, fast), .keras (imports TensorFlow), or a pair card (.json).",
        show_default="models/digits-reject.json",
    ),
]


@app.command()
def classify(
    paths: Annotated[list[Path], typer.Argument(help="PNG files, or folders of them.")],
    format: Annotated[OutFormat, typer.Option("--format", "-f", help="One record per file as this.")] = OutFormat.table,
    model: ModelOption = None,
    debug_dir: Annotated[
        Path | None, typer.Option(help="Write each normalized 28x28 input here as a PNG.")
    ] = None,
    low_confidence: Annotated[
        float | None, typer.Option(min=0.0, max=1.0, show_default="the model card's",
                                   help="Below this, status is low_confidence.")
    ] = None,
    recursive: Annotated[bool, typer.Option(help="Descend into sub-folders.")] = False,
    max_pixels: Annotated[
        int, typer.Option(min=1, help="Refuse images with more pixels (from the header).")
    ] = DEFAULT_MAX_PIXELS,
    expect: Annotated[
        Expect, typer.Option(help="'number' (1 or more digits) or 'digit' (exactly one).")
    ] = Expect.number,  # type: ignore[attr-defined]
    length: Annotated[
        str | None, typer.Option(help="Digits a reading must have: 5 or 4-6.")
    ] = None,
    workers: Annotated[
        int, typer.Option(min=0, help="Worker processes when there are many files; 0: one per CPU.")
    ] = 0,
) -> None:
    """Classify scans and print one record per file. Exit 1 if any file failed."""
    from digitwatch.classify import classify_paths
    from digitwatch.reader.reading import constraints_for

    try:
        constraints_for(expect.value, length)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    failed = classify_paths(
        paths, out=sys.stdout, fmt=format.value, model=model, debug_dir=debug_dir,
        low_confidence=low_confidence, recursive=recursive, max_pixels=max_pixels,
        expect=expect.value, length=length, workers=workers or None,
    )
    raise typer.Exit(1 if failed else 0)


@app.command()
def evaluate(
    data: DataOption = None,
    model: ModelOption = None,
    report: Annotated[
        Path | None, typer.Option(help="Folder for confusion.png, worst_errors.png and reliability.png.")
    ] = None,
    format: Annotated[ReportFormat, typer.Option("--format", "-f", help="For people or for programs.")] = (
        ReportFormat.table),
    numbers: Annotated[
        int, typer.Option(min=0, help="Scans of 1-12 digit numbers made of MNIST test digits.")
    ] = 600,
    non_digits: Annotated[
        int, typer.Option(min=0, help="Scans of letters, symbols, pen marks, shapes, smudges.")
    ] = 400,
    digits: Annotated[
        int, typer.Option(min=0, help="Single-digit scans of MNIST test digits, every variation.")
    ] = 0,
    seed: Annotated[int, typer.Option(help="Seed of the scan sets.")] = 2026,
    low_confidence: Annotated[
        float | None,
        typer.Option(min=0.0, max=1.0, help="Answers below this are not ok; default: the model card's."),
    ] = None,
    corrections: Annotated[
        Path | None,
        typer.Option(help="Also score the held-out part of a review station's corrections folder."),
    ] = None,
) -> None:
    """Score a model on the 10,000 MNIST test digits (never used in training), then
    on scans of numbers and non-digits (reliability.png with --report)."""
    from digitwatch.reader.contract import to_model_input
    from digitwatch.reader.model import load_classifier
    from digitwatch.training import evaluation
    from digitwatch.training.data import load_mnist

    mnist = load_mnist(data)
    classifier = load_classifier(model)
    x = to_model_input(mnist.x_test)
    probs = np.concatenate([classifier.predict(x[i : i + 1000]) for i in range(0, len(x), 1000)])
    ev = evaluation.evaluate(probs, mnist.y_test, model=classifier.model_id)
    if report is not None:
        report.mkdir(parents=True, exist_ok=True)
        evaluation.confusion_png(ev, report / "confusion.png")
        evaluation.worst_errors_png(mnist.x_test, probs, mnist.y_test, report / "worst_errors.png")
    scan_report = None
    if numbers or non_digits or digits:
        scan_report = evaluation.evaluate_scans(
            classifier, mnist, numbers=numbers, non_digits=non_digits, digits=digits, seed=seed,
            threshold=threshold_for(classifier, low_confidence),
            report=report,
        )
    held = None
    if corrections is not None:
        from digitwatch.training.corrections import load as load_corrections

        fixed = load_corrections(corrections)
        right = None
        if len(fixed.x_held):
            p = classifier.predict(to_model_input(fixed.x_held))
            right = float(np.mean(p[:, :10].argmax(1) == fixed.y_held))
        held = {"decisions": fixed.decisions, "held_out_inputs": len(fixed.x_held), "digit_accuracy": right}
    if format is ReportFormat.json:
        doc = json.loads(ev.to_json())
        doc["scans"] = scan_report.to_dict() if scan_report else None
        doc["corrections"] = held
        typer.echo(json.dumps(doc, indent=2))
    else:
        typer.echo(evaluation.format_table(ev), nl=False)
        if held is not None:
            acc = "n/a" if held["digit_accuracy"] is None else f"{held['digit_accuracy']:.4f}"
            typer.echo(f"corrections held out: {held['held_out_inputs']} inputs of {held['decisions']} decisions, "
                       f"digit accuracy {acc}")
        if scan_report:
            typer.echo("\n" + evaluation.format_scan_report(scan_report), nl=False)


def _settings_from(config: Path | None, flags: dict) -> Settings:
    from digitwatch.config import load_settings

    return load_settings(config, dict(os.environ), flags)


ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", envvar="DIGITWATCH_CONFIG", show_default="none",
                 help="TOML settings file (keys in a digitwatch table)."),
]

ResultsFormat = Enum("ResultsFormat", [(c, c) for c in CHOICES["format"]], type=str)  # type: ignore[misc]
LogFormat = Enum("LogFormat", [(c, c) for c in CHOICES["log_format"]], type=str)  # type: ignore[misc]

# How a default reads in --help where the value itself says little.
_SHOWN = {"review": "off", "model": "models/digits-reject.json", "instance": "the host name",
          "recursive": "no-recursive", "polling": "no-polling", "length": "any", "workers": "0 (one per CPU)",
          "review_token_file": "none", "corrections": "<results folder>/corrections"}


def _setting(key: str, *names: str, **kwargs) -> typer.models.OptionInfo:
    """A `watch` option for settings key `key`: its help from config.HELP and the
    default it stands for shown, though the parameter's own default is None
    (\"not given\": the file and the environment then decide)."""
    default = getattr(Settings(), key)
    if key in _SHOWN:
        shown = _SHOWN[key]
    elif isinstance(default, tuple):
        shown = ",".join(default)
    else:
        shown = str(default)
    return typer.Option(*names, help=HELP[key], show_default=shown, **kwargs)


def _finite(value: float | None) -> float | None:
    """click's FloatRange lets nan and inf through (no comparison with them fails)."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"expected a finite number, got {value}")
    return value


def _positive(value: float | None) -> float | None:
    if value is not None and _finite(value) is not None and value <= 0:
        raise typer.BadParameter(f"must be more than 0, got {value}")
    return value


def _duration(key: str, *, positive: bool = False) -> typer.models.OptionInfo:
    """A duration: finite, and above 0 (`positive`) or at least 0."""
    return _setting(key, min=None if positive else 0.0, callback=_positive if positive else _finite)


@app.command()
def watch(
    ctx: typer.Context,
    config: ConfigOption = None,
    once: Annotated[bool, typer.Option(help="Drain the inbox and exit (cron, tests).")] = False,
    inbox: Annotated[Path | None, _setting("inbox")] = None,
    processed: Annotated[Path | None, _setting("processed")] = None,
    failed: Annotated[Path | None, _setting("failed")] = None,
    review: Annotated[Path | None, _setting("review")] = None,
    results: Annotated[Path | None, _setting("results")] = None,
    format: Annotated[ResultsFormat | None, _setting("format", "--format", "-f")] = None,
    model: Annotated[Path | None, _setting("model")] = None,
    patterns: Annotated[str | None, _setting("patterns")] = None,
    recursive: Annotated[bool | None, _setting("recursive", "--recursive/--no-recursive")] = None,
    polling: Annotated[bool | None, _setting("polling", "--polling/--no-polling")] = None,
    poll_interval: Annotated[float | None, _duration("poll_interval", positive=True)] = None,
    settle_seconds: Annotated[float | None, _duration("settle_seconds")] = None,
    rescan_seconds: Annotated[float | None, _duration("rescan_seconds", positive=True)] = None,
    batch_size: Annotated[int | None, _setting("batch_size", min=1)] = None,
    batch_wait_ms: Annotated[float | None, _duration("batch_wait_ms")] = None,
    review_threshold: Annotated[float | None, _setting("review_threshold", min=0.0, max=1.0,
                                                       callback=_finite)] = None,
    expect: Annotated[Expect | None, _setting("expect")] = None,
    length: Annotated[str | None, _setting("length")] = None,
    stop_timeout: Annotated[float | None, _duration("stop_timeout", positive=True)] = None,
    workers: Annotated[int | None, _setting("workers", min=0)] = None,
    worker_memory_mb: Annotated[int | None, _setting("worker_memory_mb", min=1)] = None,
    worker_timeout_s: Annotated[float | None, _duration("worker_timeout_s", positive=True)] = None,
    max_pixels: Annotated[int | None, _setting("max_pixels", min=1)] = None,
    instance: Annotated[str | None, _setting("instance")] = None,
    log_format: Annotated[LogFormat | None, _setting("log_format")] = None,
    metrics_port: Annotated[int | None, _setting("metrics_port", min=0, max=65535)] = None,
    metrics_bind: Annotated[str | None, _setting("metrics_bind")] = None,
    review_bind: Annotated[str | None, _setting("review_bind")] = None,
    review_port: Annotated[int | None, _setting("review_port", min=1, max=65535)] = None,
    review_token_file: Annotated[Path | None, _setting("review_token_file")] = None,
    corrections: Annotated[Path | None, _setting("corrections")] = None,
) -> None:
    """Watch the inbox: classify each new PNG, append a result line, move it aside."""
    # Every settings key is a parameter of the same name; None means "not given".
    flags = {k: v for k, v in ctx.params.items() if k in KEYS and v is not None}
    import structlog

    from digitwatch import logs
    from digitwatch.daemon.loop import Daemon
    from digitwatch.daemon.startup import check_paths
    from digitwatch.reader.model import load_classifier

    settings = _settings_from(config, flags)
    logs.configure(settings.log_format)
    check_paths(settings)  # the daemon creates the results file (with its header) at start
    for caveat in _nfs_caveats(settings):
        structlog.get_logger("digitwatch").warning("nfs_caveat", message=caveat)
    classifier = load_classifier(settings.model)
    raise typer.Exit(Daemon(settings, classifier).run(once=once))


@app.command()
def review(
    config: ConfigOption = None,
    bind: Annotated[str | None, typer.Option(help="Address to listen on (review_bind).",
                                             show_default="127.0.0.1")] = None,
    port: Annotated[int | None, typer.Option(min=1, max=65535, help="TCP port (review_port).",
                                             show_default="8765")] = None,
) -> None:
    """Serve the review station: a page where people settle what the daemon would not vouch for."""
    flags = {k: v for k, v in (("review_bind", bind), ("review_port", port)) if v is not None}
    settings = _settings_from(config, flags)
    from digitwatch import logs

    logs.configure(settings.log_format)
    from digitwatch.review.run import serve

    raise typer.Exit(serve(settings, os.environ.get("DIGITWATCH_REVIEW_TOKEN")))


def _nfs_caveats(settings: Settings) -> list[str]:
    """What does not hold on NFS with these settings (systemd/README.md has the figures)."""
    from digitwatch.daemon.fsinfo import nfs_warnings

    return nfs_warnings({"inbox": settings.inbox, "results": settings.results.parent}, polling=settings.polling)


@app.command("check-config")
def check_config(
    config: ConfigOption = None,
    format: Annotated[ReportFormat, typer.Option("--format", "-f", help="For people or for programs.")] = (
        ReportFormat.table),
) -> None:
    """Validate the settings (file < environment) and print the effective values."""
    from digitwatch.daemon.startup import check_paths

    settings = _settings_from(config, {})
    # Nothing is created here: the folders must be makeable and writable by
    # whoever runs this (run it as the service's user, from its folder).
    check_paths(settings, create=False)
    for caveat in _nfs_caveats(settings):
        typer.echo(f"digitwatch: warning: {caveat}", err=True)
    values = settings.as_dict()
    if format is ReportFormat.json:
        typer.echo(json.dumps(values, indent=2))
    else:
        width = max(map(len, values))
        for key, value in values.items():
            shown = value if isinstance(value, str) else repr(value)
            typer.echo(f"{key.ljust(width)}  {shown}")
    try:
        base = f"relative paths resolved against {Path.cwd()}"
    except OSError:  # unreadable, but every path was absolute
        base = "all paths absolute"
    typer.echo(f"configuration ok ({base})", err=True)


def main() -> None:
    """Console-script entry point. Typer handles usage errors (exit 2); domain
    errors become their own exit codes here, with a one-line message."""
    try:
        # One name for completion and usage lines, however it was started.
        app(prog_name="digitwatch")
    except DigitwatchError as exc:
        from digitwatch.logs import is_journal

        # Under systemd this line is why the unit failed: file it as an error.
        priority = "<3>" if is_journal(os.environ, sys.stderr) else ""
        typer.echo(f"{priority}digitwatch: error: {exc}", err=True)
        sys.exit(int(exc.exit_code))


if __name__ == "__main__":
    main()
