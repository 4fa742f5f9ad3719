"""Runs the real daemon (`python -m digitwatch.cli watch`) in a subprocess on real
folders, and reads back its results file. Shared by the daemon tests and the
benchmarks."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "digits-reject.json"
GOOD = sorted((Path(__file__).parent / "fixtures" / "scans").glob("mnist-clean-*.png"))


class DaemonProc:
    """One daemon instance on folders under `base`."""

    def __init__(self, base: Path, *extra: str, fmt: str = "jsonl", name: str = "d",
                 results: Path | None = None, settle: float = 0.3, env: dict | None = None) -> None:
        self.base = base
        self.inbox = base / "inbox"
        self.processed = base / "processed"
        self.failed = base / "failed"
        self.results = results or base / f"results.{fmt}"
        self.fmt = fmt
        self.log = base / f"{name}.log"
        self.inbox.mkdir(parents=True, exist_ok=True)
        self.args = [
            sys.executable, "-m", "digitwatch.cli", "watch",
            "--inbox", str(self.inbox), "--processed", str(self.processed),
            "--failed", str(self.failed), "--results", str(self.results), "--format", fmt,
            "--settle-seconds", str(settle), "--log-format", "json", "--model", str(MODEL),
            "--instance", name, *extra,
        ]
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None

    def start(self, *more: str, wait: bool = True) -> DaemonProc:
        self._log_fh = self.log.open("ab")
        self.proc = subprocess.Popen([*self.args, *more], stdout=self._log_fh,
                                     stderr=subprocess.STDOUT, cwd=ROOT, env=self.env)
        if wait:
            self.wait_log("daemon_started", timeout=60)
        return self

    def run_once(self, timeout: float = 120) -> int:
        with self.log.open("ab") as fh:
            return subprocess.run([*self.args, "--once"], stdout=fh, stderr=subprocess.STDOUT,
                                  cwd=ROOT, env=self.env, timeout=timeout).returncode

    def wait_log(self, event: str, timeout: float = 30, count: int = 1) -> dict:
        """Until the log holds `count` events named `event` (parsed JSON, not
        matched as text: the renderer's spacing is not ours); returns the last."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.events(event)
            if len(found) >= count:
                return found[count - 1]
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.05)
        raise AssertionError(f"no {event} within {timeout}s:\n{self.log.read_text()[-3000:]}")

    def wait_rescans(self, n: int = 2, timeout: float = 60) -> dict:
        """Until `n` more inbox rescans than so far are logged (run the daemon
        with a short --rescan-seconds). The first may have begun before this
        call; the n-th (n >= 2) began after it, and it listed and queued
        anything still in the inbox. Returns the last one's event."""
        seen = len(self.events(RESCANNED))
        return self.wait_log(RESCANNED, timeout=timeout, count=seen + n)

    def events(self, name: str) -> list[dict]:
        return [e for e in log_events(self.log) if e.get("event") == name]

    def lines(self) -> list[dict]:
        return read_results(self.results, self.fmt)

    def wait_lines(self, n: int, timeout: float = 30) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rows = self.lines()
            if len(rows) >= n:
                return rows
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.05)
        raise AssertionError(f"{len(self.lines())} of {n} lines after {timeout}s:\n{self.log.read_text()[-2000:]}")

    def terminate(self, timeout: float = 30) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout=timeout)
        self._log_fh.close()
        return rc

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=10)
        self._log_fh.close()


RESCANNED = "inbox_rescanned"


def log_events(path: Path) -> list[dict]:
    """Every JSON event in a daemon's log (a `<N>` journald priority prefix
    allowed); other lines (a refusal's one-line message) are skipped."""
    out = []
    if not path.exists():
        return out
    for line in path.read_text(errors="replace").splitlines():
        body = line[3:] if line[:1] == "<" and line[2:3] == ">" else line
        if body.startswith("{"):
            try:
                out.append(json.loads(body))
            except json.JSONDecodeError:
                continue  # the last line, half written
    return out


def read_results(path: Path, fmt: str) -> list[dict]:
    if not path.exists():
        return []
    raw = path.read_bytes()
    # A batch is one write(2), but a reader may catch it half done (as `tail -f`
    # can): only whole lines count.
    text = raw[: raw.rfind(b"\n") + 1].decode("utf-8")
    if fmt == "jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return list(csv.DictReader(text.splitlines(keepends=True)))


def drop(inbox: Path, name: str, data: bytes) -> Path:
    """Drop a file the way careful tools do: write a temporary name, then rename."""
    tmp = inbox / f".{name}.part"
    tmp.write_bytes(data)
    target = inbox / name
    os.rename(tmp, target)
    return target


PNG_GOOD = GOOD[0].read_bytes()


def decoder_pids(parent: int) -> list[int]:
    """The daemon's worker processes (children running digitwatch.daemon.worker)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent and b"digitwatch.daemon.worker" in cmdline:
            out.append(int(entry.name))
    return sorted(out)
