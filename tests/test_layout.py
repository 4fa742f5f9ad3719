"""The house's layout: three wings whose imports only run down, nothing imports tests or torch."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "digitwatch"
# What each part may import from the package (itself always). The basics at the
# top level import no wing; config knows the reader's defaults; the daemon and
# training both stand on the reader; cli and classify sit on top of everything.
BASICS = {"errors", "results", "files", "logs", "__init__"}
MAY_IMPORT = {
    "basics": {"basics"},
    "config": {"basics", "reader"},
    "reader": {"basics", "reader"},
    "daemon": {"basics", "config", "reader", "daemon"},
    "training": {"basics", "reader", "training"},
    "classify": {"basics", "config", "reader", "daemon"},
    "review": {"basics", "config", "reader", "daemon"},
    "cli": {"basics", "config", "reader", "daemon", "training", "classify", "review"},
    "__main__": {"cli"},
}


def _part(module: str) -> str:
    """'digitwatch.daemon.claims' -> 'daemon'; 'digitwatch.errors' -> 'basics'."""
    parts = module.split(".")[1:] or ["__init__"]
    head = parts[0]
    if head in ("reader", "daemon", "training", "review"):
        return head
    return "basics" if head in BASICS else head


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module)
            out += [f"{node.module}.{a.name}" for a in node.names
                    if node.module == "digitwatch" and not a.name.startswith("__")]
    return out


SOURCES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
class TestLayout:
    """Each source file, by its imports."""

    def test_never_imports_the_test_suite_or_torch(self, path):
        bad = [m for m in _imports(path) if m.split(".")[0] in ("tests", "torch")]
        assert not bad, bad

    def test_imports_only_run_down(self, path):
        rel = path.relative_to(PACKAGE).with_suffix("")
        me = _part("digitwatch." + ".".join(rel.parts))
        allowed = MAY_IMPORT[me] | {me}
        wrong = [m for m in _imports(path) if m.startswith("digitwatch.") and _part(m) not in allowed]
        assert not wrong, f"{me} imports {wrong}"


@pytest.mark.system
def test_mypy_passes_over_the_package():
    """`make typecheck`, in `make test`: strict modules listed in pyproject.toml."""
    import subprocess
    import sys

    pytest.importorskip("mypy")
    r = subprocess.run([sys.executable, "-m", "mypy", "digitwatch"], capture_output=True, text=True,
                       cwd=PACKAGE.parent, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:]
