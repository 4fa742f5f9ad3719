"""The watch daemon end to end: a real watchdog observer on real folders, real
PNG files, the shipped model, real signals and subprocesses."""

from __future__ import annotations

import collections
import csv
import datetime as dt
import hashlib
import io
import json
import os
import random
import re
import signal
import time
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.daemon_harness import GOOD, MODEL, RESCANNED, DaemonProc, drop, read_results

pytestmark = pytest.mark.system

PNG = GOOD[0].read_bytes()


def png(i: int) -> bytes:
    return GOOD[i % len(GOOD)].read_bytes()


def utc_seconds(ts: str) -> float:
    """A result line's `ts` (ISO 8601, UTC, `Z`) as seconds since the epoch,
    with no local-time step (mktime - timezone is an hour off in summer time)."""
    return dt.datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


def quiet_across_rescans(d: DaemonProc) -> None:
    """Two rescans pass (the daemon runs with --rescan-seconds 1), the last
    finding nothing left in the inbox that the name rules take: whatever could
    still give a file a second line has been listed and drained."""
    assert d.wait_rescans(2)["found"] == 0, d.events(RESCANNED)[-3:]


SCANS = sorted((Path(__file__).parent / "fixtures" / "scans").glob("*.png"))


def plant(folder: Path, name: str, data: bytes) -> Path:
    """A file already settled (written a minute ago): the start-up listing takes it."""
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.utime(path, (time.time() - 60, time.time() - 60))
    return path


def files_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and ".errors" not in p.parts]


class TestIntake:
    """Which files are taken, and when."""

    def test_backlog_then_new_files(self, tmp_path):
        d = DaemonProc(tmp_path)
        for i in range(3):
            (d.inbox / f"old{i}.png").write_bytes(png(i))
            os.utime(d.inbox / f"old{i}.png", (time.time() - 60, time.time() - 60))
        d.start()
        d.wait_lines(3)
        drop(d.inbox, "new.png", png(5))
        rows = d.wait_lines(4)
        assert d.terminate() == 0
        assert sorted(r["file"] for r in rows) == ["new.png", "old0.png", "old1.png", "old2.png"]
        assert all(r["status"] in ("ok", "low_confidence") for r in rows)
        assert not files_under(d.inbox)
        moved = files_under(d.processed)
        assert len(moved) == 4
        assert {r["moved_to"] for r in rows} == {str(p) for p in moved}

    def test_slow_writer_gets_one_line_after_last_byte(self, tmp_path):
        # Rescans every second list the file mid-write: they must wait for it
        # to be quiet for settle_seconds (2 s, beyond the writer's 0.6 s pauses).
        d = DaemonProc(tmp_path, "--rescan-seconds", "1", settle=2.0).start()
        target = d.inbox / "slow.png"
        chunks = [PNG[i : i + len(PNG) // 6 + 1] for i in range(0, len(PNG), len(PNG) // 6 + 1)]
        with target.open("wb") as fh:
            for chunk in chunks:
                fh.write(chunk)
                fh.flush()
                time.sleep(0.6)
            last_byte = time.time()
        rows = d.wait_lines(1)
        quiet_across_rescans(d)
        assert d.terminate() == 0
        rows = d.lines()
        assert len(rows) == 1
        assert rows[0]["status"] != "error"
        assert rows[0]["sha256"] == hashlib.sha256(PNG).hexdigest()
        assert utc_seconds(rows[0]["ts"]) >= last_byte - 0.01  # ts has milliseconds

    def test_rescan_finds_file_no_event_reported(self, tmp_path):
        d = DaemonProc(tmp_path, "--rescan-seconds", "1").start()
        outside = tmp_path / "elsewhere.png"
        outside.write_bytes(PNG)
        # A hard link makes only IN_CREATE: no close-after-write, no rename.
        os.link(outside, d.inbox / "linked.png")
        rows = d.wait_lines(1, timeout=15)
        assert d.terminate() == 0
        assert rows[0]["file"] == "linked.png"
        assert any(e["found"] == 1 for e in d.events(RESCANNED)), "not taken by a rescan"

    def test_stray_events_still_one_line(self, tmp_path):
        d = DaemonProc(tmp_path, "--rescan-seconds", "1").start()
        target = d.inbox / "touched.png"
        target.write_bytes(PNG)
        for _ in range(5):  # each open+close queues another "closed" event
            try:  # never re-create it once the daemon has taken it
                os.close(os.open(target, os.O_WRONLY | os.O_APPEND))
            except FileNotFoundError:
                break
        d.wait_lines(1)
        quiet_across_rescans(d)
        assert d.terminate() == 0
        assert [r["file"] for r in d.lines()] == ["touched.png"]

    def test_ignore_rules(self, tmp_path):
        d = DaemonProc(tmp_path, "--rescan-seconds", "1").start()
        ignored = [".hidden.png", "scan.png.part", "scan.png.tmp", "x.png.crdownload", "x.png~",
                   "Thumbs.db", ".DS_Store", "desktop.ini", "._scan.png", "notes.txt"]
        for name in ignored:
            (d.inbox / name).write_bytes(PNG)
        (d.inbox / "folder.png").mkdir()
        drop(d.inbox, "real.png", PNG)
        d.wait_lines(1)
        quiet_across_rescans(d)  # the listing takes none of them either
        assert d.terminate() == 0
        assert [r["file"] for r in d.lines()] == ["real.png"]
        left = sorted(p.name for p in d.inbox.iterdir() if p.name != ".digitwatch")
        assert left == sorted([*ignored, "folder.png"])

    def test_sub_folders_only_with_recursive(self, tmp_path):
        """Without --recursive a file in a sub-folder is not the daemon's (no
        line, left in place, across a rescan); with it, it gets its line under
        its relative name. (Events for new sub-folders: test_inbox.)"""
        d = DaemonProc(tmp_path, "--rescan-seconds", "1").start()
        deep = plant(d.inbox, "sub/deeper/deep.png", png(1))
        drop(d.inbox, "top.png", PNG)
        d.wait_lines(1)
        quiet_across_rescans(d)
        assert d.terminate() == 0
        assert [r["file"] for r in d.lines()] == ["top.png"] and deep.is_file()
        r = DaemonProc(tmp_path, "--recursive", "--rescan-seconds", "1", name="r").start()
        rows = r.wait_lines(2)
        quiet_across_rescans(r)
        assert r.terminate() == 0
        assert [row["file"] for row in r.lines()] == ["top.png", "sub/deeper/deep.png"]
        assert not deep.exists() and Path(rows[1]["moved_to"]).read_bytes() == png(1)

    def test_polling_mode(self, tmp_path):
        d = DaemonProc(tmp_path, "--polling", "--poll-interval", "0.2").start()
        drop(d.inbox, "polled.png", PNG)
        (d.inbox / "written.png").write_bytes(png(3))
        rows = d.wait_lines(2, timeout=20)
        assert d.terminate() == 0
        assert sorted(r["file"] for r in rows) == ["polled.png", "written.png"]


class TestOutcomes:
    """Where files go and what their lines say."""

    @staticmethod
    def threshold_splitting_scans() -> float:
        """A review threshold between two confidences the shipped model gives
        the fixture scans, so some fall below it whichever model ships."""
        r = run_cli("classify", "--format", "jsonl", "--model", str(MODEL), *map(str, SCANS))
        assert r.returncode == 0, r.stderr
        conf = {Path(x["file"]).name: x["confidence"] for x in map(json.loads, r.stdout.splitlines())}
        values = sorted(set(conf.values()))
        assert len(values) >= 2, f"every scan scores the same: {values}"
        k = len(values) // 2
        return (values[k - 1] + values[k]) / 2

    @pytest.mark.parametrize("review", [True, False], ids=["review-on", "review-off"])
    def test_low_confidence_goes_to_review_only_when_configured(self, tmp_path, review):
        threshold = self.threshold_splitting_scans()
        extra = ("--review", str(tmp_path / "review")) if review else ()
        d = DaemonProc(tmp_path, *extra, "--review-threshold", str(threshold))
        for src in SCANS:
            plant(d.inbox, src.name, src.read_bytes())
        plant(d.inbox, "broken.png", b"not a png")
        assert d.run_once() == 0, d.log.read_text()[-3000:]
        rows = {r["file"]: r for r in d.lines()}
        assert set(rows) == {p.name for p in SCANS} | {"broken.png"}
        status = {n: r["status"] for n, r in rows.items()}
        low = {n for n, st in status.items() if st == "low_confidence"}
        assert low and "ok" in status.values(), f"threshold {threshold} split nothing: {status}"
        assert all(rows[n]["confidence"] >= threshold for n, st in status.items() if st == "ok")
        where = {n: Path(r["moved_to"]).relative_to(tmp_path).parts[0] for n, r in rows.items()}
        expected = {"ok": "processed", "error": "failed",  # an error is never "for review"
                    "low_confidence": "review" if review else "processed"}
        assert {n: expected[st] for n, st in status.items()} == where
        assert where["broken.png"] == "failed"
        for n, r in rows.items():
            assert Path(r["moved_to"]).is_file(), n
        assert len(files_under(tmp_path / "review")) == (len(low) if review else 0)

    def test_poison_files_beside_good_ones(self, tmp_path):
        d = DaemonProc(tmp_path).start()
        bad = {"empty.png": b"", "text.png": b"not an image", "cut.png": PNG[: len(PNG) // 2]}
        for name, data in bad.items():
            drop(d.inbox, name, data)
        for i in range(5):
            drop(d.inbox, f"good{i}.png", png(i))
        rows = d.wait_lines(8)
        assert d.proc.poll() is None
        assert d.terminate() == 0
        by_name = {r["file"]: r for r in rows}
        for name in bad:
            assert by_name[name]["status"] == "error" and by_name[name]["error"]
            # Sidecars live in .errors/, a folder only the daemon writes: never another input's name.
            moved = Path(by_name[name]["moved_to"])
            sidecar = moved.parent / ".errors" / (moved.name + ".error.json")
            assert sidecar.is_file() and str(d.failed) in str(sidecar)
            assert json.loads(sidecar.read_text())["file"] == name
        assert all(by_name[f"good{i}.png"]["status"] != "error" for i in range(5))
        assert len(files_under(d.failed)) == 3 and len(files_under(d.processed)) == 5

    def test_name_collisions_never_overwrite(self, tmp_path):
        d = DaemonProc(tmp_path).start()
        for n in range(3):
            drop(d.inbox, "same.png", png(n))
            d.wait_lines(n + 1)
        assert d.terminate() == 0
        rows = d.lines()
        moved = [Path(r["moved_to"]) for r in rows]
        # The first keeps its name; later ones get a unique suffix at once (no probing).
        assert moved[0].name == "same.png"
        assert all(re.fullmatch(r"same-[0-9a-f]+-\d{8}\.png", p.name) for p in moved[1:])
        assert len(set(moved)) == 3
        for r, p in zip(rows, moved, strict=True):
            assert hashlib.sha256(p.read_bytes()).hexdigest() == r["sha256"]

    def test_symlink_and_fifo_refused_not_followed(self, tmp_path):
        secret = tmp_path / "secret.txt"
        secret.write_text("do not read")
        d = DaemonProc(tmp_path).start()
        os.symlink(secret, d.inbox / "link.png")
        os.mkfifo(d.inbox / "pipe.png")
        rows = d.wait_lines(2, timeout=15)
        assert d.terminate() == 0
        assert {r["file"]: r["status"] for r in rows} == {"link.png": "error", "pipe.png": "error"}
        assert all("refused" in r["error"] for r in rows)
        assert secret.read_text() == "do not read"
        assert (Path(next(r for r in rows if r["file"] == "link.png")["moved_to"])).is_symlink()

    def test_csv_quoting_and_formula_injection(self, tmp_path):
        d = DaemonProc(tmp_path, fmt="csv").start()
        names = ['a,b.png', 'say "hi".png', "two\nlines.png", "ünïcödé 数字.png",
                 "=cmd.png", "+1.png", "-2.png", "@sum.png"]
        for name in names:
            drop(d.inbox, name, PNG)
        d.wait_lines(len(names))
        assert d.terminate() == 0
        text = d.results.read_text(encoding="utf-8")
        assert text.count("ts,file,digit") == 1
        rows = list(csv.DictReader(io.StringIO(text)))
        expected = {("'" + n if n[0] in "=+-@" else n) for n in names}
        assert {r["file"] for r in rows} == expected

    def test_jsonl_lines_are_whole_json(self, tmp_path):
        d = DaemonProc(tmp_path).start()
        drop(d.inbox, "x\ny.png", PNG)
        rows = d.wait_lines(1)
        assert d.terminate() == 0
        assert rows[0]["file"] == "x\ny.png"
        assert len(d.results.read_text().splitlines()) == 1
        assert set(rows[0]) >= {"ts", "file", "digit", "confidence", "status", "error", "sha256",
                                "width", "height", "model", "latency_ms", "moved_to", "instance"}


class TestNeverLoseAFile:
    """Signals, kills and concurrent instances: every file ends with exactly one line."""

    def check_exactly_once(self, names: set[str], rows: list[dict], base: Path) -> None:
        counts = collections.Counter(r["file"] for r in rows)
        dupes = {n: c for n, c in counts.items() if c > 1}
        assert not dupes, f"duplicated: {dupes}"
        assert set(counts) == names, f"lost: {names - set(counts)}"
        placed = files_under(base / "processed") + files_under(base / "failed")
        assert len(placed) == len(names)
        assert not [p for p in (base / "inbox").rglob("*") if p.is_file() and p.name != "lock"]

    def test_sigterm_mid_batch_exits_zero_and_loses_nothing(self, tmp_path):
        d = DaemonProc(tmp_path, "--stop-timeout", "10", "--batch-size", "8").start()
        names = {f"t{i:03d}.png" for i in range(80)}
        for i, n in enumerate(sorted(names)):
            drop(d.inbox, n, png(i))
        d.wait_lines(1)
        started = time.monotonic()
        assert d.terminate(timeout=15) == 0
        assert time.monotonic() - started < 10
        assert d.events("daemon_stopped")
        # Whatever was not taken is still in the inbox; a second run drains it.
        assert d.run_once() == 0
        self.check_exactly_once(names, d.lines(), tmp_path)

    def test_sigkill_at_random_points(self, tmp_path):
        rng = random.Random(1)
        d = DaemonProc(tmp_path, "--batch-size", "4")
        names = {f"k{i:03d}.png" for i in range(150)}
        for i, n in enumerate(sorted(names)):
            drop(d.inbox, n, png(i))
        interrupted = 0
        for round_ in range(12):
            before = len(d.lines())
            d.start(wait=False)
            deadline = time.monotonic() + 30
            if round_ % 2:
                # Kill while files are moving: once this run has written a line,
                # then at a random moment.
                while len(d.lines()) == before and time.monotonic() < deadline and d.proc.poll() is None:
                    time.sleep(0.01)
                time.sleep(rng.uniform(0.0, 0.3))
            else:
                # Kill as soon as this run holds claims or journals: on a fast
                # machine a random moment can miss them all.
                while (not self.work_in_hand(d.inbox) and time.monotonic() < deadline
                       and d.proc.poll() is None):
                    time.sleep(0.002)
            d.kill()
            interrupted += bool(self.work_in_hand(d.inbox))
        assert interrupted >= 4, f"only {interrupted} of 12 kills caught claims or journals in hand"
        assert d.run_once() == 0
        self.check_exactly_once(names, d.lines(), tmp_path)

    @staticmethod
    def work_in_hand(inbox: Path) -> list[str]:
        """Claims and journals a killed instance left in its folder."""
        return [p.name for p in (inbox / ".digitwatch").glob("*/*")
                if p.parent.name != "quarantine" and p.name not in ("lock", "owner.json")]

    def test_sighup_storm_during_a_burst(self, tmp_path):
        """Signal handlers only set a flag: a HUP every 2 ms never recurses or
        deadlocks, and SIGTERM still stops the loop within stop_timeout."""
        d = DaemonProc(tmp_path, "--stop-timeout", "10", "--batch-size", "8").start()
        names = {f"h{i:03d}.png" for i in range(120)}
        import threading

        stop = threading.Event()

        def storm() -> None:
            while not stop.is_set():
                d.proc.send_signal(signal.SIGHUP)
                time.sleep(0.002)

        hupper = threading.Thread(target=storm)
        hupper.start()
        try:
            for i, n in enumerate(sorted(names)):
                drop(d.inbox, n, png(i))
            d.wait_lines(len(names), timeout=90)
            started = time.monotonic()
            d.proc.send_signal(signal.SIGTERM)
            rc = d.proc.wait(timeout=15)
        finally:
            stop.set()
            hupper.join()
        assert rc == 0 and time.monotonic() - started < 10
        assert d.events("results_reopened")
        assert "Traceback" not in d.log.read_text()
        self.check_exactly_once(names, d.lines(), tmp_path)

    def test_broken_destination_holds_only_its_own_files(self, tmp_path):
        """failed/ unusable: bad inputs stay claimed and retry with back-off;
        good ones in the same batches go through."""
        d = DaemonProc(tmp_path, "--batch-size", "8")
        d.failed.mkdir()
        day = time.strftime("%Y-%m-%d", time.gmtime())
        (d.failed / day).write_text("a file where the day folder should be")
        d.start()
        for i in range(6):
            drop(d.inbox, f"good{i}.png", png(i))
        for i in range(2):
            drop(d.inbox, f"bad{i}.png", b"not a png")
        rows = d.wait_lines(6, timeout=30)
        d.wait_log("commit_failed", timeout=20)
        assert sorted(r["file"] for r in rows) == [f"good{i}.png" for i in range(6)]
        assert len(self.work_in_hand(d.inbox)) >= 2  # the bad ones: claimed and journaled
        (d.failed / day).unlink()  # repaired: the next retry places them
        rows = d.wait_lines(8, timeout=40)
        assert d.terminate() == 0
        self.check_exactly_once({*(f"good{i}.png" for i in range(6)), "bad0.png", "bad1.png"}, rows, tmp_path)

    def test_three_instances_share_one_inbox(self, tmp_path):
        results = tmp_path / "shared.jsonl"
        daemons = [DaemonProc(tmp_path, name=f"i{k}", results=results).start() for k in range(3)]
        names = {f"m{i:03d}.png" for i in range(90)}
        for i, n in enumerate(sorted(names)):
            drop(daemons[0].inbox, n, png(i))
        daemons[0].wait_lines(90, timeout=60)
        for dp in daemons:
            assert dp.terminate() == 0
        rows = read_results(results, "jsonl")
        self.check_exactly_once(names, rows, tmp_path)
        # Shared, not one instance doing it all while the others idle, and each
        # line names the instance that committed it. (Which instance wins each
        # rename race is up to the scheduler: on an idle machine one of three
        # can lose every race for 90 files, so two is what can be required.)
        by_instance = collections.Counter(r["instance"] for r in rows)
        assert len(by_instance) >= 2 and set(by_instance) <= {"i0", "i1", "i2"}, by_instance
        for dp in daemons:
            name = dp.log.stem
            placed = {e["file"] for e in dp.events("file_classified") + dp.events("file_failed")}
            assert placed == {r["file"] for r in rows if r["instance"] == name}

    def test_unwritable_results_leaves_file_and_retries(self, tmp_path):
        d = DaemonProc(tmp_path, results=tmp_path / "out" / "results.jsonl")
        (tmp_path / "out").mkdir()
        d.start()  # an unwritable results file at start is exit 78 (test_cli); here it goes bad later
        # A directory where the results file should be: every append fails.
        d.results.unlink()
        d.results.mkdir()
        drop(d.inbox, "waiting.png", PNG)
        d.wait_log("commit_failed", timeout=20, count=3)
        assert d.proc.poll() is None
        assert not files_under(d.processed)
        # Retried on the back-off schedule, the attempts counted one by one.
        tries = [(e["attempt"], e["retry_in_s"]) for e in d.events("commit_failed")][:3]
        assert tries == [(1, 0.5), (2, 1.0), (3, 2.0)], tries
        # Fix the problem: the file goes through on a retry, once.
        d.results.rmdir()
        rows = d.wait_lines(1, timeout=40)
        assert d.terminate() == 0
        assert [r["file"] for r in rows] == ["waiting.png"]
        assert len(files_under(d.processed)) == 1

    def test_sighup_reopens_results(self, tmp_path):
        d = DaemonProc(tmp_path).start()
        drop(d.inbox, "one.png", PNG)
        d.wait_lines(1)
        rotated = d.results.with_suffix(".1")
        os.rename(d.results, rotated)
        d.proc.send_signal(signal.SIGHUP)
        d.wait_log("results_reopened")
        drop(d.inbox, "two.png", PNG)
        rows = d.wait_lines(1)
        assert d.terminate() == 0
        assert [r["file"] for r in rows] == ["two.png"]
        assert [r["file"] for r in read_results(rotated, "jsonl")] == ["one.png"]


class TestFaults:
    """The daemon survives its folders being pulled out from under it."""

    def test_inbox_removed_and_recreated(self, tmp_path):
        d = DaemonProc(tmp_path).start()
        drop(d.inbox, "before.png", PNG)
        d.wait_lines(1)
        import shutil

        shutil.rmtree(d.inbox)
        d.wait_log("inbox_missing", timeout=10)
        d.inbox.mkdir()
        d.wait_log("inbox_reappeared", timeout=10)
        drop(d.inbox, "after.png", PNG)
        rows = d.wait_lines(2, timeout=20)
        assert d.proc.poll() is None
        assert d.terminate() == 0
        assert [r["file"] for r in rows] == ["before.png", "after.png"]

    def test_results_file_deleted_under_it(self, tmp_path):
        d = DaemonProc(tmp_path).start()
        drop(d.inbox, "one.png", PNG)
        d.wait_lines(1)
        d.results.unlink()
        drop(d.inbox, "two.png", PNG)
        rows = d.wait_lines(1, timeout=20)
        assert d.terminate() == 0
        assert [r["file"] for r in rows] == ["two.png"]


class TestBackoff:
    """Failed commits retry after 0.5, 1, 2, ... s, never more than 30 s apart."""

    def test_schedule(self):
        from digitwatch.daemon.commit import MAX_BACKOFF, backoff_delay

        assert MAX_BACKOFF == 30.0
        assert [backoff_delay(n) for n in range(1, 10)] == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]

    def test_a_night_of_retries_stays_capped(self):
        """Attempt 1026 (8.5 hours at 30 s) used to raise OverflowError in the loop."""
        from digitwatch.daemon.commit import backoff_delay

        assert [backoff_delay(n) for n in (64, 1025, 1026, 10**6)] == [30.0] * 4


ARENA_PROBE = """
import ctypes, ctypes.util, os, re, sys, tempfile, threading
cap = sys.argv[1] == "cap"
if cap:
    from digitwatch.daemon.runtime import limit_malloc_arenas
    assert limit_malloc_arenas(2)
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
libc.fopen.restype = ctypes.c_void_p
libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
libc.fclose.argtypes = [ctypes.c_void_p]
threads, barrier = 8, threading.Barrier(9)
def work():
    libc.malloc(64 * 1024)  # below the mmap threshold: served from this thread's arena
    barrier.wait()  # all alive at once: a thread's arena is reused only after it exits
    barrier.wait()
pool = [threading.Thread(target=work) for _ in range(threads)]
for t in pool:
    t.start()
barrier.wait()
path = tempfile.mktemp()
fp = libc.fopen(path.encode(), b"w")
libc.malloc_info(0, fp)
libc.fclose(fp)
barrier.wait()
for t in pool:
    t.join()
print(len(re.findall(r'<heap nr="', open(path).read())))
os.unlink(path)
"""


def test_malloc_arena_cap_applies_on_glibc():
    """The RSS plateau in the soak depends on this call taking effect: eight
    threads allocating at once get at most 2 arenas (heaps in malloc_info(3))
    with the cap, and more without it (the probe can tell the difference)."""
    import platform
    import subprocess
    import sys

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt(M_ARENA_MAX) is glibc's")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_ARENA")}
    counts = {}
    for mode in ("cap", "free"):
        r = subprocess.run([sys.executable, "-c", ARENA_PROBE, mode], capture_output=True, text=True,
                           timeout=60, env=env, cwd=Path(__file__).resolve().parents[1])
        assert r.returncode == 0, r.stderr
        counts[mode] = int(r.stdout)
    assert counts["free"] > 2, f"the probe sees no extra arenas without the cap: {counts}"
    assert 1 <= counts["cap"] <= 2, counts
