"""The docs stay true to the code: the generated key table, the README's size and links."""

from __future__ import annotations

import re
from pathlib import Path

from tests import docs_table

ROOT = Path(__file__).resolve().parents[1]


def test_the_configuration_key_table_is_what_make_docs_writes():
    text = docs_table.DOC.read_text()
    assert text == docs_table.rendered(text), "docs/configuration.md is stale: run `make docs`"


def test_every_setting_has_a_row():
    from dataclasses import fields

    from digitwatch.config import Settings

    text = docs_table.DOC.read_text()
    for f in fields(Settings):
        assert f"| `{f.name}` |" in text, f.name


def test_the_readme_is_short_and_its_links_resolve():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme):
        if "://" not in target:
            assert (ROOT / target).exists(), target


def test_every_docs_page_links_resolve():
    for page in (ROOT / "docs").rglob("*.md"):
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" not in target:
                assert (page.parent / target).exists(), f"{page}: {target}"


def test_the_readme_sample_line_carries_no_path_of_a_machine():
    readme = (ROOT / "README.md").read_text()
    for line in readme.splitlines():
        if line.count(",") > 10:  # a results line
            assert "/work/" not in line and "/home/" not in line and "/root/" not in line, line
