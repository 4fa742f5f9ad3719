"""The worker process pool with real processes, real PNGs and the real
pipeline: results equal the in-process pipeline's; a worker killed mid-file,
a decode that hangs and a decode that runs out of memory each fail that file
alone and the pool keeps serving; workers die with their parent; close()
leaves no process, thread or descriptor behind."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from digitwatch.daemon.pool import OUT_OF_MEMORY, Limits, Outcome, WorkerPool, worker_count
from digitwatch.reader.prepare import prepare_file
from tests import worker_tasks
from tests.conftest import ROOT, SCAN_FIXTURES

FIXTURES = sorted(SCAN_FIXTURES.glob("*.png"))
GOOD = [p for p in FIXTURES if p.name.startswith("mnist-clean")]
WAIT = 60.0  # generous: seven engineers share two cores


class Pool:
    """A started WorkerPool whose on_done feeds a queue the test waits on."""

    def __init__(self, workers: int = 2, **kwargs) -> None:
        self.wakes: queue.Queue = queue.Queue()
        self.pool = WorkerPool(workers, on_done=lambda: self.wakes.put(None), **kwargs).start()
        self.got: dict = {}

    def submit(self, token, path: Path, name: str | None = None) -> None:
        self.pool.submit(token, path, name or path.name)

    def wait_for(self, tokens, timeout: float = WAIT) -> dict[object, Outcome]:
        """Block on the pool's wake-ups until every token has its outcome."""
        deadline = time.monotonic() + timeout
        while not set(tokens) <= self.got.keys():
            left = deadline - time.monotonic()
            assert left > 0, f"still waiting for {set(tokens) - self.got.keys()} after {timeout} s"
            with contextlib.suppress(queue.Empty):
                self.wakes.get(timeout=left)
            self.drain()
        return {t: self.got[t] for t in tokens}

    def drain(self) -> bool:
        """Take what has completed, without waiting."""
        for outcome in self.pool.completed():
            assert outcome.token not in self.got, f"{outcome.token} completed twice"
            self.got[outcome.token] = outcome
        return True

    def close(self) -> None:
        self.pool.close()


@pytest.fixture
def make_pool():
    pools = []

    def make(*args, **kwargs) -> Pool:
        pools.append(Pool(*args, **kwargs))
        return pools[-1]

    yield make
    for p in pools:
        p.close()


def wait_until(cond, timeout: float = WAIT, what: str = "condition"):
    """Poll a condition that another process brings about (no event to wait on)."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.01)


def alive(pid: int) -> bool:
    """Running, and not a zombie waiting for a reaper."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def assert_matches_in_process(outcome: Outcome, path: Path) -> None:
    want = prepare_file(path, path.name, follow_links=False)
    got = outcome.prepared()
    assert (got.name, got.sha256, got.error, got.width, got.height) == (
        want.name, want.sha256, want.error, want.width, want.height)
    if want.candidates is None:
        assert outcome.candidates is None
    else:
        assert outcome.candidates.crops.dtype == np.float32
        assert outcome.candidates.spans == want.candidates.spans
        np.testing.assert_allclose(got.candidates.crops, want.candidates.crops, atol=1e-6)


def staged(tmp_path: Path, src: Path, name: str) -> Path:
    """A copy of a fixture under a new name, as a claimed file would be."""
    dst = tmp_path / name
    shutil.copyfile(src, dst)
    return dst


class TestResults:
    """A worker runs the daemon's own pipeline: the same record as in-process."""

    def test_every_fixture_equals_in_process_prepare(self, make_pool):
        pool = make_pool(2)
        for i, path in enumerate(FIXTURES):
            pool.submit(i, path)
        got = pool.wait_for(range(len(FIXTURES)))
        for i, path in enumerate(FIXTURES):
            assert_matches_in_process(got[i], path)
        assert sum(o.error == "" for o in got.values()) >= len(GOOD)
        assert pool.pool.in_flight() == 0 and pool.pool.replaced == 0

    def test_refusals_are_outcomes_not_crashes(self, make_pool, tmp_path):
        link = tmp_path / "link.png"
        link.symlink_to(GOOD[0])
        fifo = tmp_path / "pipe.png"
        os.mkfifo(fifo)
        pool = make_pool(1)
        pool.submit("link", link)
        pool.submit("fifo", fifo)
        pool.submit("gone", tmp_path / "gone.png")
        got = pool.wait_for(["link", "fifo", "gone"])
        assert "symbolic link" in got["link"].error
        assert "FIFO" in got["fifo"].error
        assert got["gone"].error.startswith("cannot read")
        assert pool.pool.replaced == 0

    def test_descriptors_handed_over_read_like_paths(self, make_pool):
        before = len(os.listdir("/proc/self/fd"))
        pool = make_pool(2)
        for i, path in enumerate(GOOD + FIXTURES[:6]):
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            os.read(fd, 100)  # the worker must not start where the offset was left
            pool.submit(i, fd, path.name)
        got = pool.wait_for(range(len(GOOD) + 6))
        for i, path in enumerate(GOOD + FIXTURES[:6]):
            assert_matches_in_process(got[i], path)
        pool.close()
        assert len(os.listdir("/proc/self/fd")) == before  # each closed once its file was done

    def test_default_size_is_the_cpus_this_process_may_use(self):
        assert worker_count() == len(os.sched_getaffinity(0))
        assert WorkerPool().size == worker_count()


class TestCrash:
    """A worker killed mid-file fails that file alone and is replaced."""

    def test_segfault_mid_file_fails_only_that_file(self, make_pool, tmp_path):
        pool = make_pool(2, task=worker_tasks.marked, depth=2)
        hang = staged(tmp_path, GOOD[0], "hang-a.png")
        others = [staged(tmp_path, GOOD[i % len(GOOD)], f"ok-{i}.png") for i in range(6)]
        pool.submit("hang", hang)
        for i, p in enumerate(others):  # as descriptors: a re-queued one is sent again
            pool.submit(i, os.open(p, os.O_RDONLY | os.O_CLOEXEC), p.name)
        pid = int(wait_until(lambda: hang.with_name(hang.name + ".started").exists()
                             and hang.with_name(hang.name + ".started").read_text(), what="hang marker"))
        # Everything the other worker can do is done; the victim holds the
        # hanging file and perhaps one queued behind it.
        wait_until(lambda: pool.drain() and pool.pool.in_flight() == len(pool.pool.busy()[pid])
                   and set(range(len(others))) <= pool.got.keys() | set(pool.pool.busy()[pid]),
                   what="every file done but those the victim holds")
        assert pool.pool.busy()[pid][0] == "hang"
        os.kill(pid, signal.SIGSEGV)
        got = pool.wait_for(["hang", *range(len(others))])
        assert got["hang"].error == "decoder crashed (signal 11)"
        assert got["hang"].candidates is None
        for i, p in enumerate(others):
            assert got[i].error == "", (i, got[i].error)
            np.testing.assert_allclose(got[i].prepared().candidates.crops, prepare_file(p, p.name).candidates.crops,
                                       atol=1e-6)
        # A fresh worker took the dead one's place, and serves.
        pids = wait_until(lambda: len(pool.pool.pids()) == 2 and pool.pool.pids(), what="replacement")
        assert pid not in pids and not alive(pid)
        assert pool.pool.replaced == 1
        more = [staged(tmp_path, GOOD[0], f"after-{i}.png") for i in range(4)]
        for i, p in enumerate(more):
            pool.submit(("after", i), p)
        assert all(o.error == "" for o in pool.wait_for([("after", i) for i in range(4)]).values())

    def test_the_file_queued_behind_a_crash_is_sent_again(self, make_pool, tmp_path):
        pool = make_pool(1, task=worker_tasks.marked, depth=2)
        hang = staged(tmp_path, GOOD[0], "hang-e.png")
        pool.submit("hang", hang)
        pool.submit("behind", os.open(GOOD[1], os.O_RDONLY | os.O_CLOEXEC), GOOD[1].name)
        pool.submit("backlog", GOOD[0])
        pid = int(wait_until(lambda: hang.with_name(hang.name + ".started").exists()
                             and hang.with_name(hang.name + ".started").read_text(), what="hang marker"))
        assert pool.pool.busy() == {pid: ["hang", "behind"]}  # sent to the worker that will die
        os.kill(pid, signal.SIGSEGV)
        got = pool.wait_for(["hang", "behind", "backlog"])
        assert got["hang"].error == "decoder crashed (signal 11)"
        assert_matches_in_process(got["behind"], GOOD[1])
        assert_matches_in_process(got["backlog"], GOOD[0])

    def test_sigkill_between_files_fails_nothing(self, make_pool, tmp_path):
        pool = make_pool(1)
        pool.submit("first", GOOD[0])
        pool.wait_for(["first"])
        (pid,) = pool.pool.pids()
        os.kill(pid, signal.SIGKILL)
        new = wait_until(lambda: pool.pool.pids() != [pid] and pool.pool.pids(), what="replacement")
        assert pid not in new
        pool.submit("second", GOOD[1])
        assert pool.wait_for(["second"])["second"].error == ""
        assert len(pool.got) == 2  # the kill failed no file


class TestTimeLimit:
    """A decode that never returns fails with the time limit; the pool recovers."""

    def test_hang_fails_within_limit_and_pool_recovers(self, make_pool, tmp_path):
        limit = 1.0
        pool = make_pool(1, task=worker_tasks.marked, limits=Limits(time_limit=limit))
        (pid,) = pool.pool.pids()
        hang = staged(tmp_path, GOOD[0], "hang-b.png")
        after = staged(tmp_path, GOOD[1], "after.png")
        t0 = time.monotonic()
        pool.submit("hang", hang)
        pool.submit("after", after)
        got = pool.wait_for(["hang"])
        took = time.monotonic() - t0
        assert got["hang"].error == "decoding took longer than 1 s"
        assert limit <= took < limit + 10.0, took  # margin: a loaded machine
        # The file queued behind it went to the replacement, unharmed.
        assert pool.wait_for(["after"])["after"].error == ""
        assert pool.pool.pids() != [pid] and not alive(pid)


class TestMemoryLimit:
    """RLIMIT_AS in the worker: a decode that needs more fails that file only."""

    def test_real_page_over_the_limit_fails_and_the_worker_goes_on(self, make_pool, tmp_path):
        # 27 MB decoded (under the pipeline's own decode bound), ~0.1 MB on disk
        page = np.full((3000, 3000, 3), 255, np.uint8)
        cv2.putText(page, "7", (1000, 2000), cv2.FONT_HERSHEY_SIMPLEX, 30, (0, 0, 0), 100)
        big = tmp_path / "big.png"
        big.write_bytes(cv2.imencode(".png", page)[1].tobytes())
        pool = make_pool(1, task=worker_tasks.marked, limits=Limits(memory_limit=16 * 1024**2))
        (pid,) = pool.pool.pids()
        pool.submit("big", big)
        pool.submit("huge", staged(tmp_path, GOOD[0], "huge-c.png"))
        pool.submit("small", GOOD[0])
        got = pool.wait_for(["big", "huge", "small"])
        assert got["big"].error == OUT_OF_MEMORY
        assert got["huge"].error == OUT_OF_MEMORY
        assert_matches_in_process(got["small"], GOOD[0])
        assert pool.pool.pids() == [pid]  # it caught both and kept serving

    def test_without_the_limit_the_same_page_decodes(self, make_pool, tmp_path):
        page = np.full((3000, 3000, 3), 255, np.uint8)
        cv2.putText(page, "7", (1000, 2000), cv2.FONT_HERSHEY_SIMPLEX, 30, (0, 0, 0), 100)
        big = tmp_path / "big.png"
        big.write_bytes(cv2.imencode(".png", page)[1].tobytes())
        pool = make_pool(1, limits=Limits(memory_limit=None))
        pool.submit("big", big)
        assert_matches_in_process(pool.wait_for(["big"])["big"], big)


PARENT = """
import json, sys
from pathlib import Path
from digitwatch.daemon.pool import WorkerPool
from tests import worker_tasks
pool = WorkerPool(2, task=worker_tasks.marked).start()
pool.submit("hang", sys.argv[1], Path(sys.argv[1]).name)
print("PIDS", json.dumps(pool.pids()), flush=True)
sys.stdin.read()
"""


class TestParentDeath:
    """Workers never outlive the loop process, even when it is SIGKILLed."""

    def test_sigkill_of_parent_kills_busy_and_idle_workers(self, tmp_path):
        hang = staged(tmp_path, GOOD[0], "hang-d.png")
        parent = subprocess.Popen([sys.executable, "-c", PARENT, str(hang)], cwd=ROOT, stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
        try:
            line = b""
            while not line.startswith(b"PIDS "):  # structlog's events share stdout
                line = parent.stdout.readline()
                assert line, "the parent exited before starting its pool"
            pids = json.loads(line[5:])
            assert len(pids) == 2 and all(alive(p) for p in pids)
            # One worker is stuck in a file (not reading its socket): only
            # PR_SET_PDEATHSIG can stop it.
            busy = int(wait_until(lambda: hang.with_name(hang.name + ".started").exists()
                                  and hang.with_name(hang.name + ".started").read_text(), what="hang marker"))
            assert busy in pids
            parent.kill()
            parent.wait(10)
            wait_until(lambda: not any(alive(p) for p in pids), timeout=10, what="workers gone")
        finally:
            if parent.poll() is None:
                parent.kill()
                parent.wait()


class TestClose:
    """close() is quick and leaves nothing behind, cycle after cycle."""

    def test_no_process_thread_or_fd_leak(self, tmp_path):
        def fds() -> int:
            return len(os.listdir("/proc/self/fd"))

        threads, before = threading.active_count(), fds()
        seen: list[int] = []
        for cycle in range(5):
            pool = Pool(2)
            pool.submit(cycle, GOOD[cycle % len(GOOD)])
            assert pool.wait_for([cycle])[cycle].error == ""
            seen += pool.pool.pids()
            t0 = time.monotonic()
            pool.close()
            assert time.monotonic() - t0 < 5.0
            assert pool.pool.pids() == []
        assert len(set(seen)) == 10
        assert not any(alive(p) or Path(f"/proc/{p}").exists() for p in seen)  # killed and reaped
        assert fds() == before
        assert threading.active_count() == threads

    def test_submit_after_close_is_an_error_outcome(self):
        pool = Pool(1)
        pool.close()
        pool.submit("late", GOOD[0])
        assert pool.wait_for(["late"])["late"].error


def state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


@pytest.mark.system
class TestDaemon:
    """Through the real daemon: a worker that segfaults mid-file costs that file."""

    def test_worker_segfault_mid_file_fails_that_file_only(self, tmp_path):
        from tests.daemon_harness import DaemonProc, decoder_pids, drop

        page = np.full((5000, 5000, 3), 255, np.uint8)  # long enough to decode that the kill lands mid-file
        cv2.putText(page, "7", (1500, 3500), cv2.FONT_HERSHEY_SIMPLEX, 50, (0, 0, 0), 160)
        d = DaemonProc(tmp_path, "--workers", "1").start()
        worker, new = 0, []
        try:
            (worker,) = wait_until(lambda: decoder_pids(d.proc.pid), what="the daemon's worker")
            assert state(worker) in "SD"  # idle, waiting for a file
            drop(d.inbox, "big.png", cv2.imencode(".png", page)[1].tobytes())
            wait_until(lambda: state(worker) == "R", what="the worker busy on big.png")
            os.kill(worker, signal.SIGSEGV)
            (row,) = d.wait_lines(1)
            assert row["file"] == "big.png" and row["status"] == "error"
            assert row["error"] == "decoder crashed (signal 11)"
            assert "/failed/" in row["moved_to"]
            new = wait_until(lambda: [p for p in decoder_pids(d.proc.pid) if p != worker], what="replacement")
            assert len(new) == 1 and not alive(worker)
            drop(d.inbox, "good.png", GOOD[0].read_bytes())
            rows = d.wait_lines(2)
            assert rows[1]["file"] == "good.png" and rows[1]["status"] in ("ok", "low_confidence")
            assert d.events("worker_replaced")[0]["file"] == "big.png"
        finally:
            d.terminate()
        assert not any(alive(p) for p in [worker, *new])

    def test_time_limit_from_the_config_file_fails_a_slow_file(self, tmp_path):
        """worker_timeout_s in the TOML reaches the workers: a real page that
        takes ~0.5 s to decode here (5000x5000 RGB, near the decode bound)
        fails at a 0.05 s limit with that reason, and its worker is replaced."""
        from tests.daemon_harness import DaemonProc, decoder_pids, drop

        page = np.full((5000, 5000, 3), 255, np.uint8)
        cv2.putText(page, "7", (1500, 3500), cv2.FONT_HERSHEY_SIMPLEX, 50, (0, 0, 0), 160)
        toml = tmp_path / "limits.toml"
        toml.write_text("[digitwatch]\nworker_timeout_s = 0.05\n")
        d = DaemonProc(tmp_path, "--config", str(toml), "--workers", "1").start()
        try:
            assert d.events("workers_started")[0]["time_limit_s"] == 0.05
            (worker,) = wait_until(lambda: decoder_pids(d.proc.pid), what="the daemon's worker")
            drop(d.inbox, "slow.png", cv2.imencode(".png", page)[1].tobytes())
            (row,) = d.wait_lines(1)
            assert row["file"] == "slow.png" and row["status"] == "error"
            assert row["error"] == "decoding took longer than 0.05 s"
            assert "/failed/" in row["moved_to"]
            replaced = d.wait_log("worker_replaced")
            assert replaced["pid"] == worker and replaced["file"] == "slow.png"
            wait_until(lambda: [p for p in decoder_pids(d.proc.pid) if p != worker], what="replacement")
        finally:
            d.terminate()
