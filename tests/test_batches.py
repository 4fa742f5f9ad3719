"""The batch and the loop's schedule on an injected clock: no sleeps, no daemon process."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from digitwatch.config import Settings
from digitwatch.daemon import claims, commit
from digitwatch.daemon.batches import Batches
from digitwatch.daemon.results_file import ResultsFile
from digitwatch.reader.model import OutputSpec
from digitwatch.reader.prepare import Prepared
from digitwatch.results import Result


class Clock:
    """Monotonic seconds that move only when told."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class NoModel:
    """A batch of refused files never reaches the model (classify_batch): any call is a failure."""

    model_id = "none"
    classes = 11
    pairs = None
    spec = OutputSpec()

    def predict(self, digits):
        raise AssertionError("the model was called for a batch of errors")


def _setup(tmp_path: Path, clock: Clock, **overrides) -> tuple[Batches, claims.Workspace, Path]:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    results = tmp_path / "results.jsonl"
    s = replace(Settings(), inbox=inbox, processed=tmp_path / "processed", failed=tmp_path / "failed",
                results=results, format="jsonl", **overrides)
    committer = commit.Committer({"processed": s.processed, "failed": s.failed}, ResultsFile(results, "jsonl"),
                                 results, "jsonl")
    ws = claims.Workspace(inbox, "one", results)
    return Batches(s, NoModel(), committer, "one", clock=clock), ws, results


def _claimed(ws: claims.Workspace, name: str) -> claims.Claim:
    (ws.inbox / name).write_bytes(b"not a png")
    claim = ws.reserve(name.encode())
    assert ws.take(claim)
    return claim


def _refused(name: str) -> Prepared:
    return Prepared(name, "ab" * 32, 0.0, error="not a PNG file")


class TestBatchTiming:
    """When a batch is due, on the injected clock."""

    def test_a_partial_batch_waits_batch_wait_ms_while_more_is_coming(self, tmp_path):
        clock = Clock()
        # Binary-exact steps (1/8 s), so the boundary is the boundary.
        batches, ws, _ = _setup(tmp_path, clock, batch_wait_ms=250.0, batch_size=4)
        batches.add(_claimed(ws, "a.png"), _refused("a.png"))
        assert not batches.due(more_coming=True)
        assert batches.wait_left() == 0.25
        clock.advance(0.125)
        assert not batches.due(more_coming=True)
        assert batches.wait_left() == 0.125
        clock.advance(0.125)
        assert batches.due(more_coming=True) and batches.wait_left() == 0.0

    def test_a_full_batch_or_nothing_more_coming_goes_at_once(self, tmp_path):
        clock = Clock()
        batches, ws, _ = _setup(tmp_path, clock, batch_wait_ms=1000.0, batch_size=2)
        batches.add(_claimed(ws, "a.png"), _refused("a.png"))
        assert batches.due(more_coming=False)
        batches.add(_claimed(ws, "b.png"), _refused("b.png"))
        assert batches.due(more_coming=True)

    def test_the_wait_starts_with_the_oldest_file_not_the_newest(self, tmp_path):
        clock = Clock()
        batches, ws, _ = _setup(tmp_path, clock, batch_wait_ms=250.0, batch_size=8)
        batches.add(_claimed(ws, "a.png"), _refused("a.png"))
        clock.advance(0.125)
        batches.add(_claimed(ws, "b.png"), _refused("b.png"))
        assert not batches.due(more_coming=True)
        clock.advance(0.125)
        assert batches.due(more_coming=True)


class TestCommit:
    """A due batch through the real commit protocol, logged once per file."""

    def test_refused_files_are_committed_to_failed_and_logged(self, tmp_path):
        clock = Clock()
        batches, ws, results = _setup(tmp_path, clock, batch_size=8)
        for name in ("a.png", "b.png"):
            batches.add(_claimed(ws, name), _refused(name))
        with capture_logs() as logs:
            assert batches.commit_next() == 2
        failed = [e for e in logs if e["event"] == "file_failed"]
        assert sorted(e["file"] for e in failed) == ["a.png", "b.png"]
        assert all(e["error"] == "not a PNG file" and e["status"] == "error" for e in failed)
        lines = [json.loads(x) for x in results.read_text().splitlines()]
        assert sorted(x["file"] for x in lines) == ["a.png", "b.png"]
        assert sorted(p.name for p in (tmp_path / "failed").rglob("*.png")) == ["a.png", "b.png"]
        assert batches.counters.error == 2 and batches.counters.batches == 1
        assert not batches.done and batches.wait_left() == pytest.approx(Settings().batch_wait_ms / 1000)


class TestLoopSchedule:
    """The watch loop's own timing (rescans, SIGHUP reopen), one turn per simulated wait."""

    def _daemon(self, tmp_path: Path, clock: Clock, **overrides):
        from digitwatch.daemon.loop import Daemon

        inbox = tmp_path / "inbox"
        inbox.mkdir(exist_ok=True)
        s = replace(Settings(), inbox=inbox, processed=tmp_path / "processed", failed=tmp_path / "failed",
                    results=tmp_path / "results.jsonl", format="jsonl", **overrides)
        d = Daemon(s, NoModel(), clock=clock)
        d.workspace = claims.Workspace(d.inbox, d.instance, s.results)
        d._recover = lambda **_: None  # no dead instances here
        d.handover.collect = lambda: None  # no worker processes here

        def wait(timeout: float) -> None:  # the loop's only sleep: time passes here
            clock.advance(max(timeout, 0.05))
            if clock.now >= self.stop_at:
                d.stopping.set()

        d._take_events = wait
        return d

    def test_rescans_come_every_rescan_seconds_of_the_clock(self, tmp_path):
        clock = Clock()
        d = self._daemon(tmp_path, clock, rescan_seconds=2.0)
        self.stop_at = clock.now + 9.0
        with capture_logs() as logs:
            d._loop(once=False)
        rescans = [e for e in logs if e["event"] == "inbox_rescanned"]
        # At +2, +4, +6, +8 (each turn waits at most 0.25 s, so none is late by more).
        assert len(rescans) == 4

    def test_results_reopened_is_logged_only_when_the_file_was_reopened(self, tmp_path):
        clock = Clock()
        d = self._daemon(tmp_path, clock, rescan_seconds=60.0)
        d.results.open()
        self.stop_at = clock.now + 0.5
        d._hups = 1
        with capture_logs() as logs:
            d._loop(once=False)
        assert [e["event"] for e in logs if e["event"].startswith("results_")] == ["results_reopened"]
        # Now the path is a folder: the reopen fails, and says so instead.
        d.results.close()
        (tmp_path / "results.jsonl").unlink()
        (tmp_path / "results.jsonl").mkdir()
        d.stopping = type(d.stopping)()
        self.stop_at = clock.now + 0.5
        d._hups = 2
        with capture_logs() as logs:
            d._loop(once=False)
        assert [e["event"] for e in logs if e["event"].startswith("results_")] == ["results_unavailable"]


class TestWorkersRead:
    """The daemon's workers read the files; the loop process makes no model call for them."""

    def test_results_from_the_workers_are_committed_without_a_model_call(self, tmp_path):
        clock = Clock()
        batches, ws, results = _setup(tmp_path, clock, batch_size=8)
        read = Result(file="a.png", digit=7, confidence=0.99, status="ok", error="", sha256="ab" * 32, width=28,
                      height=28, model="w", latency_ms=3.0, text="7", reason="")
        started = time.perf_counter() - 0.25
        batches.add(_claimed(ws, "a.png"), Prepared("a.png", "ab" * 32, started), read)
        assert batches.commit_next() == 1  # NoModel raises if called
        [line] = [json.loads(x) for x in results.read_text().splitlines()]
        assert line["text"] == "7" and line["status"] == "ok" and line["model"] == "w"
        assert line["latency_ms"] >= 250  # to the commit, as before: not the worker's 3 ms

    @pytest.mark.system
    def test_a_worker_reads_as_the_loop_process_would(self):
        import threading

        from digitwatch.daemon.pool import WorkerPool
        from digitwatch.daemon.worker import Limits, Reading
        from digitwatch.reader.model import load_classifier
        from digitwatch.reader.prepare import classify_batch, prepare_file
        from tests.conftest import SCAN_FIXTURES

        files = sorted(SCAN_FIXTURES.glob("*.png"))[:12]
        done = threading.Semaphore(0)
        with WorkerPool(2, limits=Limits(reading=Reading()), on_done=done.release) as pool:
            for f in files:
                pool.submit(f.name, str(f), f.name)
            got = {}
            while len(got) < len(files):
                assert done.acquire(timeout=60)
                got.update((o.token, o) for o in pool.completed())
        here = classify_batch(load_classifier(), [prepare_file(f, f.name) for f in files], low_confidence=None)
        for f, mine in zip(files, here, strict=True):
            theirs = got[f.name].result
            assert theirs is not None and got[f.name].candidates is None  # only the result crosses the pipe
            assert (theirs.text, theirs.status, theirs.reason, theirs.sha256) == (
                mine.text, mine.status, mine.reason, mine.sha256)
            assert theirs.confidence == pytest.approx(mine.confidence, abs=1e-6)
