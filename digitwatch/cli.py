"""The typer application. Commands are thin; this is the one place where domain
errors become exit codes.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from digitwatch.classify import DEFAULT_LOW_CONFIDENCE
from digitwatch.config import Settings
from digitwatch.errors import DigitwatchError
from digitwatch.imaging import DEFAULT_MAX_PIXELS

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Read handwritten digits off scans dropped into an inbox folder.",
)


@app.callback()
def _root() -> None:
    """Read handwritten digits off scans dropped into an inbox folder."""


class Arch(str, Enum):
    cnn = "cnn"
    mlp = "mlp"


class ReportFormat(str, Enum):
    table = "table"
    json = "json"


DataOption = Annotated[
    Path | None,
    typer.Option(
        "--data",
        help="MNIST as an IDX folder or mnist.npz; default: Keras' downloader.",
    ),
]


@app.command()
def train(
    data: DataOption = None,
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
) -> None:
    """Train on MNIST, export .tflite beside the .keras, verify, write the model card."""
    from digitwatch.training import TrainRequest, run_training

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
        command="digitwatch " + shlex.join(sys.argv[1:]),
    )
    card = run_training(request)
    typer.echo(
        f"wrote {out}, {out.with_suffix('.tflite')} and {out.with_suffix('.json')}: "
        f"validation {card['validation_accuracy']:.4f}, "
        f"MNIST test {card['test_accuracy']['tflite']:.4f} (tflite)"
    )


class OutFormat(str, Enum):
    table = "table"
    csv = "csv"
    jsonl = "jsonl"


ModelOption = Annotated[
    Path | None,
    typer.Option(
        help="A .tflite (LiteRT, fast) or .keras (imports TensorFlow) model.",
        show_default="models/digits.tflite",
    ),
]


@app.command()
def classify(
    paths: Annotated[list[Path], typer.Argument(help="PNG files, or folders of them.")],
    format: Annotated[OutFormat, typer.Option("--format", "-f")] = OutFormat.table,
    model: ModelOption = None,
    debug_dir: Annotated[
        Path | None, typer.Option(help="Write each normalized 28x28 input here as a PNG.")
    ] = None,
    low_confidence: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Below this, status is low_confidence.")
    ] = DEFAULT_LOW_CONFIDENCE,
    recursive: Annotated[bool, typer.Option(help="Descend into sub-folders.")] = False,
    max_pixels: Annotated[
        int, typer.Option(min=1, help="Refuse images with more pixels (from the header).")
    ] = DEFAULT_MAX_PIXELS,
    expect: Annotated[
        str, typer.Option(help="'number' (1 or more digits) or 'digit' (exactly one).")
    ] = "number",
    length: Annotated[
        str | None, typer.Option(help="Digits a reading must have: 5 or 4-6.")
    ] = None,
) -> None:
    """Classify scans and print one record per file. Exit 1 if any file failed."""
    from digitwatch.batch import classify_paths
    from digitwatch.reading import constraints_for

    try:
        constraints_for(expect, length)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    failed = classify_paths(
        paths, out=sys.stdout, fmt=format.value, model=model, debug_dir=debug_dir,
        low_confidence=low_confidence, recursive=recursive, max_pixels=max_pixels,
        expect=expect, length=length,
    )
    raise typer.Exit(1 if failed else 0)


@app.command()
def evaluate(
    data: DataOption = None,
    model: ModelOption = None,
    report: Annotated[
        Path | None, typer.Option(help="Folder for confusion.png, worst_errors.png and reliability.png.")
    ] = None,
    format: Annotated[ReportFormat, typer.Option("--format", "-f")] = ReportFormat.table,
    numbers: Annotated[
        int, typer.Option(min=0, help="Scans of 1-12 digit numbers made of MNIST test digits.")
    ] = 600,
    non_digits: Annotated[
        int, typer.Option(min=0, help="Scans of letters, symbols, pen marks, shapes, smudges.")
    ] = 400,
    seed: Annotated[int, typer.Option(help="Seed of the scan sets.")] = 2026,
    low_confidence: Annotated[
        float | None,
        typer.Option(min=0.0, max=1.0, help="Answers below this are not ok; default: the model card's."),
    ] = None,
) -> None:
    """Score a model on the 10,000 MNIST test digits (never used in training), then
    on scans of numbers and non-digits (reliability.png with --report)."""
    from digitwatch import evaluation
    from digitwatch.data import load_mnist, to_input
    from digitwatch.model import load_classifier

    mnist = load_mnist(data)
    classifier = load_classifier(model)
    x = to_input(mnist.x_test)
    probs = np.concatenate([classifier.predict(x[i : i + 1000]) for i in range(0, len(x), 1000)])
    ev = evaluation.evaluate(probs, mnist.y_test, model=classifier.model_id)
    if report is not None:
        report.mkdir(parents=True, exist_ok=True)
        evaluation.confusion_png(ev, report / "confusion.png")
        evaluation.worst_errors_png(mnist.x_test, probs, mnist.y_test, report / "worst_errors.png")
    scan_report = None
    if numbers or non_digits:
        scan_report = evaluation.evaluate_scans(
            classifier, mnist, numbers=numbers, non_digits=non_digits, seed=seed,
            threshold=low_confidence if low_confidence is not None
            else (classifier.spec.low_confidence or DEFAULT_LOW_CONFIDENCE),
            report=report,
        )
    if format is ReportFormat.json:
        doc = json.loads(ev.to_json())
        doc["scans"] = scan_report.to_dict() if scan_report else None
        typer.echo(json.dumps(doc, indent=2))
    else:
        typer.echo(evaluation.format_table(ev), nl=False)
        if scan_report:
            typer.echo("\n" + evaluation.format_scan_report(scan_report), nl=False)


def _settings_from(config: Path | None, flags: dict) -> Settings:
    from digitwatch.config import load_settings

    return load_settings(config, dict(os.environ), flags)


ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", envvar="DIGITWATCH_CONFIG", help="TOML settings file."),
]


@app.command()
def watch(
    config: ConfigOption = None,
    once: Annotated[bool, typer.Option(help="Drain the inbox and exit (cron, tests).")] = False,
    inbox: Annotated[Path | None, typer.Option(help="Folder to watch.")] = None,
    processed: Annotated[Path | None, typer.Option(help="Where classified files go.")] = None,
    failed: Annotated[Path | None, typer.Option(help="Where unreadable files go.")] = None,
    review: Annotated[Path | None, typer.Option(help="Where low-confidence files go.")] = None,
    results: Annotated[Path | None, typer.Option(help="The CSV or JSON-lines results file.")] = None,
    format: Annotated[str | None, typer.Option("--format", help="csv or jsonl.")] = None,
    model: Annotated[Path | None, typer.Option(help=".tflite or .keras model.")] = None,
    patterns: Annotated[str | None, typer.Option(help="Comma-separated name patterns.")] = None,
    recursive: Annotated[bool | None, typer.Option("--recursive/--no-recursive")] = None,
    polling: Annotated[bool | None, typer.Option("--polling/--no-polling")] = None,
    poll_interval: Annotated[float | None, typer.Option()] = None,
    settle_seconds: Annotated[float | None, typer.Option()] = None,
    rescan_seconds: Annotated[float | None, typer.Option()] = None,
    batch_size: Annotated[int | None, typer.Option()] = None,
    batch_wait_ms: Annotated[float | None, typer.Option()] = None,
    review_threshold: Annotated[float | None, typer.Option()] = None,
    expect: Annotated[str | None, typer.Option(help="number or digit.")] = None,
    length: Annotated[str | None, typer.Option(help="Digits a reading must have: 5 or 4-6.")] = None,
    stop_timeout: Annotated[float | None, typer.Option()] = None,
    workers: Annotated[int | None, typer.Option()] = None,
    max_pixels: Annotated[int | None, typer.Option()] = None,
    instance: Annotated[str | None, typer.Option()] = None,
    log_format: Annotated[str | None, typer.Option(help="auto, json or console.")] = None,
    metrics_port: Annotated[int | None, typer.Option(help="Prometheus port; 0 = off.")] = None,
    metrics_bind: Annotated[str | None, typer.Option(help="Address for the metrics port.")] = None,
) -> None:
    """Watch the inbox: classify each new PNG, append a result line, move it aside."""
    # Every parameter but these two is a setting; None means "not given".
    flags = {k: v for k, v in locals().items() if k not in ("config", "once") and v is not None}
    from digitwatch import logs
    from digitwatch.config import check_paths
    from digitwatch.daemon import Daemon
    from digitwatch.model import load_classifier

    settings = _settings_from(config, flags)
    logs.configure(settings.log_format)
    check_paths(settings)
    classifier = load_classifier(settings.model)
    raise typer.Exit(Daemon(settings, classifier).run(once=once))


@app.command("check-config")
def check_config(
    config: ConfigOption = None,
    format: Annotated[ReportFormat, typer.Option("--format", "-f")] = ReportFormat.table,
) -> None:
    """Validate the settings (file < environment) and print the effective values."""
    from digitwatch.config import check_paths

    settings = _settings_from(config, {})
    check_paths(settings)
    values = settings.as_dict()
    if format is ReportFormat.json:
        typer.echo(json.dumps(values, indent=2))
    else:
        width = max(map(len, values))
        for key, value in values.items():
            shown = value if isinstance(value, str) else repr(value)
            typer.echo(f"{key.ljust(width)}  {shown}")
    typer.echo("configuration ok", err=True)


def main() -> None:
    """Console-script entry point. Typer handles usage errors (exit 2); domain
    errors become their own exit codes here, with a one-line message."""
    try:
        app()
    except DigitwatchError as exc:
        typer.echo(f"digitwatch: error: {exc}", err=True)
        sys.exit(int(exc.exit_code))


if __name__ == "__main__":
    main()
