"""`digitwatch classify` (classify_cmd.py): which files a folder gives, and what
its output lines hold."""

from __future__ import annotations

from pathlib import Path

from digitwatch.classify_cmd import expand
from tests.conftest import SCAN_FIXTURES

SCAN = sorted(SCAN_FIXTURES.glob("mnist-*.png"))[0]


class TestExpand:
    """A folder given to `classify` gives what the daemon would take from it as an inbox."""

    def _folder(self, root: Path) -> None:
        for rel in ("a.png", "B.PNG", "sub/c.png", ".hidden.png", "._a.png", "Thumbs.db", "notes.txt",
                    "d.png.part", ".digitwatch/claimed/e.png", "sub/.cache/f.png"):
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(SCAN.read_bytes())

    def test_flat_folder_takes_the_inbox_names(self, tmp_path):
        self._folder(tmp_path)
        got = [p.relative_to(tmp_path).as_posix() for p, err in expand([tmp_path], recursive=False)]
        assert got == ["B.PNG", "a.png"]

    def test_recursive_never_enters_hidden_folders(self, tmp_path):
        # An inbox's own .digitwatch folder holds claimed files: classifying the
        # inbox must not read them a second time, as the daemon does not.
        self._folder(tmp_path)
        got = [p.relative_to(tmp_path).as_posix() for p, err in expand([tmp_path], recursive=True)]
        assert got == ["B.PNG", "a.png", "sub/c.png"]

    def test_files_named_directly_are_taken_whatever_their_name(self, tmp_path):
        self._folder(tmp_path)
        named = [tmp_path / "notes.txt", tmp_path / ".hidden.png", tmp_path / "gone.png"]
        assert list(expand(named, recursive=False)) == [
            (named[0], None), (named[1], None), (named[2], "no such file or directory"),
        ]
