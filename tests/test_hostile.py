"""The hostile corpus: bad images and hostile names dropped into a running
daemon. Each gets exactly one result line or is ignored by rule; the daemon
keeps running; nothing outside its folders is touched."""

from __future__ import annotations

import os
import time
import zlib

import cv2
import numpy as np
import pytest

from tests import pngwrite
from tests.daemon_harness import PNG_GOOD, DaemonProc

pytestmark = pytest.mark.slow


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

    def slow_writer() -> None:
        with (d.inbox / "in-progress.png").open("wb") as fh:
            step = len(PNG_GOOD) // 30 + 1
            for i in range(0, len(PNG_GOOD), step):
                fh.write(PNG_GOOD[i : i + step])
                fh.flush()
                time.sleep(0.1)

    writer = threading.Thread(target=slow_writer)
    writer.start()
    time.sleep(0.3)
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
    time.sleep(1.5)  # a rescan or stray event must not add lines
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
