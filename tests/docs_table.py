"""The configuration key table in docs/configuration.md, made from config.HELP
so the docs cannot drift: `make docs` writes it, tests/test_docs.py checks it."""

from __future__ import annotations

import argparse
import re
from dataclasses import fields
from pathlib import Path

from digitwatch.config import CHOICES, ENV_PREFIX, HELP, Settings

DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
BEGIN, END = "<!-- keys-begin (generated: make docs) -->", "<!-- keys-end -->"


def _default(value: object) -> str:
    if value is None:
        return "(none)"
    if isinstance(value, tuple):
        return ", ".join(f"`{v}`" for v in value)
    if value == "":
        return '`""`'
    return f"`{value}`"


def table() -> str:
    """One row per Settings field: TOML key, environment variable, flag, default, help."""
    rows = ["| key (TOML) | environment | flag | default | what |", "|---|---|---|---|---|"]
    for f in fields(Settings):
        help_text = HELP[f.name]
        if f.name in CHOICES:
            help_text += " One of " + ", ".join(f"`{c}`" for c in CHOICES[f.name]) + "."
        rows.append(f"| `{f.name}` | `{ENV_PREFIX}{f.name.upper()}` | `--{f.name.replace('_', '-')}` "
                    f"| {_default(f.default)} | {help_text.replace('|', '/')} |")
    return "\n".join(rows) + "\n"


def rendered(text: str) -> str:
    """The page with the generated block replaced."""
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{DOC}: no {BEGIN} ... {END} block")
    return pattern.sub(lambda _: f"{BEGIN}\n{table()}{END}", text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--write", action="store_true", help="Rewrite docs/configuration.md in place.")
    args = ap.parse_args()
    new = rendered(DOC.read_text())
    if args.write:
        DOC.write_text(new)
    else:
        print(table(), end="")


if __name__ == "__main__":
    main()
