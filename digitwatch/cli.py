"""The typer application. Commands are thin; this is the one place where domain
errors become exit codes.
"""

from __future__ import annotations

import shlex
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from digitwatch.errors import DigitwatchError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
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
        command="digitwatch " + shlex.join(sys.argv[1:]),
    )
    card = run_training(request)
    typer.echo(
        f"wrote {out}, {out.with_suffix('.tflite')} and {out.with_suffix('.json')}: "
        f"validation {card['validation_accuracy']:.4f}, "
        f"MNIST test {card['test_accuracy']['tflite']:.4f} (tflite)"
    )


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
