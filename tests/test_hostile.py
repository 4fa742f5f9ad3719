"""The hostile corpus: bad images and hostile names dropped into a running
daemon. Each gets exactly one result line or is ignored by rule; the daemon
keeps running; nothing outside its folders is touched."""

from __future__ import annotations

import os
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from digitwatch.training import pngwrite
from tests.daemon_harness import PNG_GOOD, DaemonProc

pytestmark = pytest.mark.system


def bad_images() -> dict[str, bytes]:
    good = PNG_GOOD
    crc_broken = bytearray(good)
    crc_broken[60] ^= 0xFF
    ok, jpeg = cv2.imencode(".jpg", np.zeros((8, 8), np.uint8))
    comp = zlib.compressobj(9)
    row = b"\x00" * 20_001
    bomb = b"".join(comp.compress(row * 1000) for _ in range(20)) + comp.flush()
    bomb_png = (b"\x89PNG\r\n\x1a\n" + pngwrite.ihdr(20_000, 20_000, 8, 0)
                + pngwrite.chunk(b"IDAT", bomb) + pngwrite.chunk(b"IEND", b""))
    no_idat = b"\x89PNG\r\n\x1a\n" + pngwrite.ihdr(10, 10, 8, 0) + pngwrite.chunk(b"IEND", b"")
    zero = b"\x89PNG\r\n\x1a\n" + pngwrite.ihdr(0, 0, 8, 0) + pngwrite.chunk(b"IEND", b"")
    not_zlib = (b"\x89PNG\r\n\x1a\n" + pngwrite.ihdr(10, 10, 8, 0)
                + pngwrite.chunk(b"IDAT", b"\x00" * 40) + pngwrite.chunk(b"IEND", b""))
    blank = pngwrite.encode(np.full((200, 200), 245, np.uint8), pngwrite.GRAY)
    rng = np.random.default_rng(0)
    noise = pngwrite.encode(np.clip(rng.normal(230, 6, (200, 200)), 0, 255).astype(np.uint8), pngwrite.GRAY)
    line = np.full((200, 200), 250, np.uint8)
    line[100:102] = 40
    return {
        "empty.png": b"",
        "one-byte.png": b"\x89",
        "signature-only.png": good[:8],
        "cut-in-header.png": good[:20],
        "cut-in-idat.png": good[: len(good) // 2],
        "cut-before-iend.png": good[:-12],
        "bad-crc.png": bytes(crc_broken),
        "text.png": b"this is not an image\n",
        "jpeg.png": jpeg.tobytes(),
        "html.png": b"<html><body>404</body></html>",
        "bomb-20000x20000.png": bomb_png,
        "no-idat.png": no_idat,
        "zero-size.png": zero,
        "not-zlib.png": not_zlib,
        "blank-page.png": blank,
        "noise-only.png": noise,
        "only-a-line.png": pngwrite.encode(line, pngwrite.GRAY),
        "random-bytes.png": os.urandom(3000),
    }


HOSTILE_NAMES = [
    "new\nline.png", 'quo"te.png', "it's.png", "=HYPERLINK(1).png", "+cmd.png", "-rm.png", "@at.png",
    "a,b;c.png", "tab\there.png", "ünï 数字.png", " leading space.png", "x" * 251 + ".png",
]


def test_hostile_corpus(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.txt"
    secret.write_text("keep out")
    before = secret.stat()
    d = DaemonProc(tmp_path, "--rescan-seconds", "1")
    # Still being written when the daemon starts (a slow, steady writer): the
    # backlog scan must wait for it to settle, then take it whole.
    import threading

    begun = threading.Event()

    def slow_writer() -> None:
        with (d.inbox / "in-progress.png").open("wb") as fh:
            step = len(PNG_GOOD) // 30 + 1
            for i in range(0, len(PNG_GOOD), step):
                fh.write(PNG_GOOD[i : i + step])
                fh.flush()
                begun.set()
                time.sleep(0.1)  # the writer's pace, not a wait for the daemon

    writer = threading.Thread(target=slow_writer)
    writer.start()
    assert begun.wait(10)  # part of the file is on disk before the daemon starts
    d.start()

    expected: set[str] = set()
    for name, data in bad_images().items():
        (d.inbox / name).write_bytes(data)
        expected.add(name)
    for name in HOSTILE_NAMES:
        (d.inbox / name).write_bytes(PNG_GOOD)
        expected.add(name)
    raw = os.path.join(os.fsencode(d.inbox), b"bad-\xff\xfe-bytes.png")
    with open(raw, "wb") as fh:
        fh.write(PNG_GOOD)
    expected.add("bad-\\xff\\xfe-bytes.png")
    os.symlink("/etc/passwd", d.inbox / "passwd.png")
    os.symlink(secret, d.inbox / "secret.png")
    os.mkfifo(d.inbox / "fifo.png")
    expected |= {"passwd.png", "secret.png", "fifo.png"}
    (d.inbox / "folder.png").mkdir()  # ignored: a directory
    (d.inbox / "gone.png").write_bytes(PNG_GOOD)
    os.unlink(d.inbox / "gone.png")  # deleted between event and claim: no line
    writer.join()
    expected.add("in-progress.png")
    assert len(expected) >= 30

    rows = d.wait_lines(len(expected), timeout=60)
    # Nothing left that a rescan or a stray event could give a second line.
    assert d.wait_rescans(2)["found"] == 0
    assert d.proc.poll() is None, "daemon died"
    rows = d.lines()
    assert d.terminate() == 0
    names = [r["file"] for r in rows]
    assert sorted(names) == sorted(expected)
    by = {r["file"]: r for r in rows}
    for name in bad_images():
        assert by[name]["status"] == "error", name
        assert "\n" not in by[name]["error"] and by[name]["error"]
    for name in ("passwd.png", "secret.png", "fifo.png"):
        assert by[name]["status"] == "error" and "refused" in by[name]["error"]
    for name in HOSTILE_NAMES:
        assert by[name]["status"] != "error", (name, by[name]["error"])
    assert by["in-progress.png"]["status"] != "error"
    assert by["bomb-20000x20000.png"]["error"].startswith("image is 20000x20000")
    # Nothing outside the configured folders changed.
    after = secret.stat()
    assert secret.read_text() == "keep out" and after.st_mtime_ns == before.st_mtime_ns
    assert sorted(p.name for p in outside.iterdir()) == ["secret.txt"]
    assert os.path.exists("/etc/passwd")
    left = sorted(p.name for p in d.inbox.iterdir() if p.name != ".digitwatch")
    assert left == ["folder.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["outside", "inbox", "processed", "failed", "results.jsonl", "d.log"])


# ---------------------------------------------------------------- hostile daemon state


def _journal(folder: Path, name: str, rel: bytes, target: bytes, results: Path, roots: dict) -> bytes:
    """A well-formed journal entry, built with the daemon's own encoder."""
    from digitwatch.daemon import claims, commit
    from digitwatch.results import Result

    f = claims.Folder(folder.name, -1, folder)
    claim = claims.Claim(f, name.encode(), rel)
    r = Result(file=os.fsdecode(rel), digit=1, confidence=0.9, status="ok", error="", sha256="", width=1,
               height=1, model="m", latency_ms=1.0, ts="2026-01-01T00:00:00.000Z", instance="dead")
    return commit.encode_journal(results, [commit.Intent(claim, "processed", "2026-01-01", target, "link", r)])


def test_planted_state_is_quarantined_and_good_files_still_get_their_line(tmp_path):
    """The bar: planted state under inbox/.digitwatch touches nothing outside,
    never stops the daemon, and a good file dropped beside it gets its line."""
    outside = tmp_path / "outside"
    (outside / "victim").mkdir(parents=True)
    (outside / "victim" / "secret.txt").write_text("keep out")
    (outside / "note.txt").write_text("not a png")
    before = {p: p.read_bytes() for p in outside.rglob("*") if p.is_file()}
    d = DaemonProc(tmp_path, "--rescan-seconds", "1")
    root = d.inbox / ".digitwatch"
    root.mkdir(mode=0o700)
    roots = {"processed": d.processed, "failed": d.failed}
    # A dead instance: real leftovers and a real journal beside garbage ones.
    dead = root / "dead-1-1"
    dead.mkdir(mode=0o700)
    (dead / "lock").write_bytes(b"")
    (dead / "00000003-left.png").write_bytes(PNG_GOOD)
    (dead / "00000004-journaled.png").write_bytes(PNG_GOOD)
    (dead / "journal-00000001.json").write_bytes(
        _journal(dead, "00000004", b"journaled.png", b"journaled.png", d.results, roots))
    # Another: garbage, empty, truncated, wrong-schema journals and one climbing out.
    bad = root / "bad-5-5"
    bad.mkdir(mode=0o700)
    (bad / "lock").write_bytes(b"")
    (bad / "journal-00000002.json").write_bytes(b"\x00garbage{")
    (bad / "journal-00000003.json").write_bytes(b"")
    (bad / "journal-00000004.json").write_bytes(b'{"v": 2, "entries": [')
    (bad / "journal-00000005.json").write_bytes(b'[{"token": "00000009", "rel": "x", "path": "/etc/passwd"}]')
    (bad / "00000006-victim.png").write_bytes(b"")
    (bad / "journal-00000006.json").write_bytes(
        _journal(bad, "00000006", b"../../../../outside/victim/secret.txt", b"../../x", d.results, roots))
    os.symlink(outside, dead / "00000007")  # a token folder linking outside
    # Another dead instance: a journal for another results file.
    other = root / "other-2-2"
    other.mkdir(mode=0o700)
    (other / "lock").write_bytes(b"")
    (other / "00000001-theirs.png").write_bytes(PNG_GOOD)
    (other / "journal-00000001.json").write_bytes(
        _journal(other, "00000001", b"theirs.png", b"theirs.png", tmp_path / "elsewhere.jsonl", roots))
    # A fake dead instance whose claim folder links outside, and a folder that is a link.
    evil = root / "evil-3-3"
    evil.mkdir(mode=0o700)
    (evil / "lock").write_bytes(b"")
    os.symlink(outside, evil / "00000001")
    os.symlink(outside, root / "link-4-4")
    (root / "junk.txt").write_text("x")

    d.start()
    drop_path = d.inbox / "good.png"
    drop_path.write_bytes(PNG_GOOD)
    rows = d.wait_lines(3, timeout=30)
    d.wait_rescans(2)  # each runs recovery again: it must place nothing more
    assert d.proc.poll() is None, "daemon died"
    assert d.terminate() == 0
    rows = d.lines()
    assert sorted(r["file"] for r in rows) == ["good.png", "journaled.png", "left.png"]
    assert {p: p.read_bytes() for p in outside.rglob("*") if p.is_file()} == before
    assert not os.path.lexists(tmp_path / "x")
    quarantined = sorted(n.split("-", 1)[1] for n in os.listdir(root / "quarantine"))
    assert quarantined == sorted([
        "00000007", "journal-00000002.json", "journal-00000003.json", "journal-00000004.json",
        "journal-00000005.json", "journal-00000006.json", "journal-00000001.json", "00000001",
        "link-4-4", "junk.txt", "00000006-victim.png", "00000001-theirs.png"])
    events = d.events("state_quarantined")
    assert len(events) == len(quarantined) and all(e["reason"] for e in events)
    # The quarantined journals' claims stay, set aside for a person, never placed.
    placed = sorted(p.name for p in d.processed.rglob("*.png"))
    assert placed == ["good.png", "journaled.png", "left.png"]


@pytest.mark.parametrize("plant", ["symlink_outside", "symlink_parent", "regular_file"])
def test_untrusted_state_root_refuses_to_start(tmp_path, plant):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "a.png").write_bytes(PNG_GOOD)
    d = DaemonProc(tmp_path)
    root = d.inbox / ".digitwatch"
    if plant == "symlink_outside":
        root.symlink_to(outside)
    elif plant == "symlink_parent":
        root.symlink_to("..")
    else:
        root.write_text("x")
    (d.inbox / "waiting.png").write_bytes(PNG_GOOD)
    rc = d.run_once(timeout=60)
    assert rc == 78
    message = [line for line in d.log.read_text().splitlines() if line.startswith("digitwatch: error")]
    assert len(message) == 1 and str(root) in message[0]
    assert sorted(os.listdir(outside)) == ["a.png"] and (d.inbox / "waiting.png").exists()
    assert not d.processed.exists() and not d.results.exists()


def test_second_instance_with_another_results_file_refuses_to_start(tmp_path):
    first = DaemonProc(tmp_path, name="first").start()
    second = DaemonProc(tmp_path, name="second", results=tmp_path / "other.jsonl")
    rc = second.run_once(timeout=60)
    assert first.terminate() == 0
    assert rc == 78
    assert "one results file per inbox" in second.log.read_text()
