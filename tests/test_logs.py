"""Logging: the processor chain as a table, journald detection, and the real
daemon's lines and STATUS= as systemd would receive them."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import threading
import time

import pytest
import structlog

from digitwatch import logs
from digitwatch.daemon import systemd
from tests.daemon_harness import PNG_GOOD, ROOT, DaemonProc, drop


def render(chain: list, method: str, **fields) -> str:
    """Run an event through a processor chain as structlog would."""
    event = {"event": "file_failed", **fields}
    for processor in chain:
        event = processor(None, method, event)
    return event


@pytest.fixture(autouse=True)
def _reset_structlog():
    yield
    structlog.reset_defaults()


class TestProcessors:
    """processors() is a pure function: every shape it can produce."""

    @pytest.mark.parametrize(
        ("json_output", "journal", "method", "prefix"),
        [
            (True, False, "info", ""),
            (True, False, "error", ""),
            (True, True, "debug", "<7>"),
            (True, True, "info", "<6>"),
            (True, True, "warning", "<4>"),
            (True, True, "error", "<3>"),
            (True, True, "exception", "<3>"),
            (True, True, "critical", "<2>"),
            (False, False, "warning", ""),
            (False, True, "warning", "<4>"),
            (False, True, "info", "<6>"),
        ],
    )
    def test_table(self, json_output, journal, method, prefix):
        line = render(logs.processors(json_output, journal=journal), method, file="a.png")
        assert isinstance(line, str) and "\n" not in line
        if prefix:
            assert line.startswith(prefix)
            line = line[len(prefix):]
        else:
            assert not line.startswith("<")
        if json_output:
            record = json.loads(line)
            assert record["event"] == "file_failed" and record["file"] == "a.png"
            assert record["level"] == ("error" if method == "exception" else method)
            assert record["timestamp"].endswith("Z")
        else:
            assert "file_failed" in line and "a.png" in line
            assert "\x1b[" not in line  # no colours unless asked for

    def test_console_colours_only_when_asked_and_never_for_the_journal(self):
        assert "\x1b[" in render(logs.processors(False, colors=True), "info")
        assert "\x1b[" not in render(logs.processors(False, journal=True, colors=True), "info")

    def test_same_input_same_chain(self):
        a, b = logs.processors(True, journal=True), logs.processors(True, journal=True)
        assert [type(p) for p in a] == [type(p) for p in b]


class TestJournalDetection:
    """JOURNAL_STREAM counts only when it names this very stream."""

    def test_cases(self, tmp_path):
        r, w = os.pipe()
        try:
            with os.fdopen(w, "w", closefd=False) as stream, (tmp_path / "f").open("w") as other:
                st = os.fstat(w)
                mine = f"{st.st_dev}:{st.st_ino}"
                assert logs.is_journal({"JOURNAL_STREAM": mine}, stream)
                assert not logs.is_journal({}, stream)
                assert not logs.is_journal({"JOURNAL_STREAM": mine}, other)  # inherited, redirected
                assert not logs.is_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"}, stream)
                assert not logs.is_journal({"JOURNAL_STREAM": "garbage"}, stream)
                assert not logs.is_journal({"JOURNAL_STREAM": ""}, stream)
        finally:
            os.close(r)
            os.close(w)


class TestStatusNotifier:
    """STATUS= goes out on change, at most every min_interval; READY's text stays."""

    def test_rate_limit_and_ready_text(self):
        now = [100.0]
        sent: list[tuple[str, ...]] = []
        n = systemd.StatusNotifier(0.5, clock=lambda: now[0], send=lambda *m: sent.append(m))
        n.ready("watching /in", "ok=0")
        assert sent == [("READY=1", "STATUS=watching /in")]
        assert not n.update("ok=0")  # nothing changed: READY's text stays
        now[0] += 1
        assert not n.update("ok=0") and n.shown == "watching /in"
        assert n.update("ok=1") and sent[-1] == ("STATUS=ok=1",)
        now[0] += 0.1
        assert not n.update("ok=2")  # too soon: held back...
        now[0] += 0.5
        assert n.update("ok=2") and n.shown == "ok=2"  # ...and sent on a later turn
        assert len(sent) == 3

    def test_text(self):
        counts = dict(ok=1, low_confidence=2, error=3, in_flight=4, waiting=5)
        assert systemd.status_text(**counts) == "ok=1 low_confidence=2 error=3 in_flight=4 waiting=5"
        assert systemd.status_text(**counts, blocked=7, blocked_reason="No space left on device: /r.csv") == (
            "commit blocked: No space left on device: /r.csv, 7 files waiting; "
            "ok=1 low_confidence=2 error=3 in_flight=4 waiting=5")


class _Journal:
    """The read end of the daemon's stdout pipe, read in a thread."""

    def __init__(self, fd: int) -> None:
        self.lines: list[str] = []
        self._fh = os.fdopen(fd, "r", errors="replace")
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self._fh:
            self.lines.append(line.rstrip("\n"))

    def wait(self, event: str, timeout: float = 60) -> str:
        """The first line whose JSON (after a `<N>` priority) is the event
        `event`; parsed, not matched as text with the renderer's spacing."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                body = line[3:] if re.match(r"<\d>", line) else line
                with contextlib.suppress(json.JSONDecodeError):
                    record = json.loads(body)
                    if isinstance(record, dict) and record.get("event") == event:
                        return line
            time.sleep(0.05)
        raise AssertionError(f"no {event} in {timeout}s:\n" + "\n".join(self.lines[-20:]))


class _Notify:
    """A NOTIFY_SOCKET server collecting datagrams in a thread."""

    def __init__(self, path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                self.messages.append(self.sock.recv(4096).decode())

    def statuses(self) -> list[str]:
        return [line[7:] for m in list(self.messages) for line in m.splitlines() if line.startswith("STATUS=")]

    def wait_status(self, text: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for status in self.statuses():
                if text in status:
                    return status
            time.sleep(0.05)
        raise AssertionError(f"no STATUS with {text!r} in {timeout}s: {self.statuses()}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.mark.system
class TestUnderSystemd:
    """The real daemon with stdout on a pipe named by JOURNAL_STREAM (what
    systemd does) and a NOTIFY_SOCKET: priorities, and STATUS= as it changes."""

    def test_priorities_and_status(self, tmp_path):
        d = DaemonProc(tmp_path, "--batch-wait-ms", "0")
        notify = _Notify(tmp_path / "notify.sock")
        r, w = os.pipe()
        st = os.fstat(w)
        env = {**d.env, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}", "NOTIFY_SOCKET": str(tmp_path / "notify.sock")}
        env.pop("WATCHDOG_USEC", None)
        proc = subprocess.Popen(d.args, stdout=w, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        os.close(w)
        journal = _Journal(r)
        try:
            assert journal.wait("daemon_started").startswith("<6>{")
            ready = notify.wait_status("watching")
            started = time.monotonic()
            assert ready == f"watching {d.inbox}"
            assert any(m.startswith("READY=1\n") for m in notify.messages)
            # The results file is there before any result: tail -f can start now.
            assert d.results.exists()

            drop(d.inbox, "good.png", PNG_GOOD)
            drop(d.inbox, "bad.png", b"not a png")
            d.wait_lines(2)
            assert journal.wait("file_classified").startswith("<6>{")
            assert journal.wait("file_failed").startswith("<4>{")
            # The READY text stayed until the counters changed.
            statuses = notify.statuses()
            assert statuses[0] == ready
            status = notify.wait_status("error=1")
            assert status.startswith("ok=1 low_confidence=0 error=1")

            # A results file that cannot be written: commits block, STATUS says so.
            d.results.unlink()
            d.results.mkdir()
            drop(d.inbox, "later.png", PNG_GOOD)
            assert journal.wait("commit_failed").startswith("<3>{")
            blocked = notify.wait_status("commit blocked")
            # The reason's wording is the commit code's; the path and the count are ours to check.
            assert blocked.startswith("commit blocked: ") and str(d.results) in blocked, blocked
            assert ", 1 files waiting; ok=1 low_confidence=0 error=1" in blocked, blocked

            # Fixed: the waiting file lands, STATUS shows it.
            d.results.rmdir()
            assert [row["file"] for row in d.wait_lines(1)] == ["later.png"]
            notify.wait_status("ok=2 low_confidence=0 error=1")
            sent, elapsed = len(notify.statuses()), time.monotonic() - started
        finally:
            if proc.poll() is None:
                proc.terminate()
            rc = proc.wait(timeout=60)
            notify.close()
        assert rc == 0
        # Rate-limited in the real process too: at most one per 0.5 s (+ READY's).
        assert sent <= elapsed / 0.5 + 2, (elapsed, notify.statuses())
        for line in journal.lines:
            assert line[:3] in ("<2>", "<3>", "<4>", "<6>", "<7>"), line
