"""`make soak`: faults and a long run, reported as files in, result lines out,
files lost and duplicated lines.

    python -m tests.bench.soak [--files 5000] [--kills 50] [--soak-files 100000] [--out DIR]

Faults: SIGKILL loop with restarts; the issue-10 kill bar (1,000 inputs, 25
SIGKILLs, half aimed between placing and reporting with DIGITWATCH_CRASH_AT,
on one filesystem and with processed/ failed/ on a tmpfs, so placing copies);
results disk full (a small tmpfs, needs root; skipped otherwise); results
file deleted under the daemon; inbox removed and recreated.

    python -m tests.bench.soak --only kill-bar --bar-files 1000 --bar-kills 25

Soak: many files through one daemon while the daemon's RSS and open file
descriptors, its workers' PSS (/proc/PID/smaps_rollup: shared numpy and
OpenCV pages counted once) and descriptors, and throughput are sampled every
1,000 files; each series must be flat (exit status 1 otherwise).

    python -m tests.bench.soak --only soak --soak-files 3000
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from tests.bench.run import make_pool
from tests.bench.run import stage as fill
from tests.daemon_harness import DaemonProc, decoder_pids, read_results


def placed(base: Path) -> int:
    return sum(1 for root in ("processed", "failed") for p in (base / root).rglob("*")
               if (p.is_file() or p.is_symlink()) and ".errors" not in p.parts)


def temp_left(base: Path) -> int:
    """Temporary copy names and claims or journals left anywhere after the final run."""
    temps = sum(1 for p in base.rglob("*.tmp"))
    state = base / "inbox" / ".digitwatch"
    held = [p for p in state.glob("*/*") if p.parent.name != "quarantine"] if state.exists() else []
    return temps + len(held)


def tally(name: str, files_in: int, rows: list[dict], base: Path, note: str = "") -> dict:
    counts = collections.Counter(r["file"] for r in rows)
    return {
        "fault": name,
        "files_in": files_in,
        "lines_out": len(rows),
        "files_placed": placed(base),
        "lost": files_in - len(counts),
        "duplicated": sum(c - 1 for c in counts.values() if c > 1),
        "note": note,
    }


def sigkill_loop(work: Path, pool, files: int, kills: int) -> dict:
    base = work / "kill"
    d = DaemonProc(base, "--batch-size", "16")
    for p in fill(base / "stage", pool, files, "k"):
        os.rename(p, d.inbox / p.name)
    rng = random.Random(5)
    done = caught = 0
    for _ in range(kills):
        d.start(wait=False)
        time.sleep(rng.uniform(0.8, 2.0))
        d.kill()
        done += 1
        caught += in_hand(base)
    assert d.run_once(timeout=600) == 0
    return tally("SIGKILL loop", files, d.lines(), base,
                 f"{done} kills at random moments ({caught} caught claims/journals in hand), then one --once")


def in_hand(base: Path) -> bool:
    """Whether a killed instance left claims or journals: the kill interrupted work."""
    state = base / "inbox" / ".digitwatch"
    return any(p.name not in ("lock", "owner.json") for p in state.glob("*/*") if p.parent.name != "quarantine")


def kill_bar(work: Path, pool, files: int, kills: int, *, other_fs: bool) -> dict:
    """The issue's bar: `files` inputs, `kills` SIGKILLs, every other one aimed
    between placing and reporting (a crash point after a file or a batch is
    placed, before its line), the others at a random moment mid-burst; then one
    --once. processed/ and failed/ on a tmpfs when `other_fs` (copies, not links)."""
    name = "kill bar, other fs" if other_fs else "kill bar, one fs"
    base = work / ("bar-tmpfs" if other_fs else "bar")
    out = base / "out"
    out.mkdir(parents=True)
    if other_fs:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512m", "tmpfs", str(out)], capture_output=True)
        if r.returncode != 0:
            return {"fault": name, "skipped": f"cannot mount tmpfs: {r.stderr.decode().strip()}"}
    try:
        args = ("--batch-size", "16", "--processed", str(out / "processed"), "--failed", str(out / "failed"))
        d = DaemonProc(base, *args)
        for p in fill(base / "stage", pool, files, "b"):
            os.rename(p, d.inbox / p.name)
        rng = random.Random(10)
        aimed = timed = caught = 0
        for k in range(kills):
            before = len(d.lines())
            if k % 2 == 0:
                step = rng.choice(["placed", "placed_batch"])
                n = rng.randint(1, 40) if step == "placed" else rng.randint(1, 3)
                run = DaemonProc(base, *args, name=f"aimed{k}", env={"DIGITWATCH_CRASH_AT": f"{step}:{n}"})
                run.start(wait=False)
                try:
                    run.proc.wait(timeout=120)
                    aimed += run.proc.returncode == -9
                except subprocess.TimeoutExpired:
                    run.kill()
            else:
                d.start(wait=False)
                deadline = time.monotonic() + 60
                while len(d.lines()) == before and time.monotonic() < deadline and d.proc.poll() is None:
                    time.sleep(0.01)
                time.sleep(rng.uniform(0.0, 0.5))
                d.kill()
                timed += 1
            caught += in_hand(base)
        assert d.run_once(timeout=900) == 0
        rows = d.lines()
        result = tally(name, files, rows, out, f"{aimed} kills at a crash point between placing and "
                       f"reporting, {timed} timed mid-burst; {caught} of {kills} caught claims/journals "
                       f"in hand; then one --once")
        result["extra_placed"] = result["files_placed"] - files
        result["temp_or_state_left"] = temp_left(base) + temp_left(out)
        return result
    finally:
        if other_fs:
            subprocess.run(["umount", "-l", str(out)], capture_output=True)


def disk_full(work: Path, pool, files: int = 300) -> dict:
    base = work / "full"
    mnt = base / "results-fs"
    mnt.mkdir(parents=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        return {"fault": "results disk full", "skipped": f"cannot mount tmpfs: {r.stderr.decode().strip()}"}
    try:
        d = DaemonProc(base, results=mnt / "results.jsonl").start()
        for p in fill(base / "stage", pool, files, "f"):
            os.rename(p, d.inbox / p.name)
        d.wait_log("commit_failed", timeout=60)
        time.sleep(3)
        alive = d.proc.poll() is None
        stuck = sum(1 for _ in d.inbox.rglob("*.png"))
        subprocess.run(["mount", "-o", "remount,size=16m", str(mnt)], check=True)
        d.wait_lines(files, timeout=120)
        d.terminate()
        rows = read_results(mnt / "results.jsonl", "jsonl")
        return tally("results disk full", files, rows, base,
                     f"48 KB tmpfs filled; daemon alive: {alive}; {stuck} files waited in the inbox; "
                     "then grown to 16 MB")
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def results_deleted(work: Path, pool, files: int = 600) -> dict:
    base = work / "deleted"
    d = DaemonProc(base).start()
    keep = base / "kept-old-results.jsonl"
    staged = fill(base / "stage", pool, files, "r")
    for i, p in enumerate(staged):
        os.rename(p, d.inbox / p.name)
        if i == files // 2:
            time.sleep(0.5)
            os.link(d.results, keep)  # a second name, so the old lines can be counted
            os.unlink(d.results)
    d.wait_lines(1, timeout=30)
    deadline = time.monotonic() + 120
    while placed(base) < files and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    d.terminate()
    rows = read_results(keep, "jsonl") + d.lines()
    return tally("results file deleted", files, rows, base, "deleted half way; lines counted in both files")


def inbox_recreated(work: Path, pool, files: int = 400) -> dict:
    base = work / "recreated"
    d = DaemonProc(base).start()
    first = fill(base / "stage", pool, files // 2, "a")
    for p in first:
        os.rename(p, d.inbox / p.name)
    d.wait_lines(len(first), timeout=60)
    shutil.rmtree(d.inbox)
    time.sleep(1.0)
    d.inbox.mkdir()
    d.wait_log("inbox_reappeared", timeout=30)
    second = fill(base / "stage2", pool, files - len(first), "b")
    for p in second:
        os.rename(p, d.inbox / p.name)
    d.wait_lines(files, timeout=60)
    alive = d.proc.poll() is None
    d.terminate()
    return tally("inbox removed and recreated", files, d.lines(), base,
                 f"half before, half after; daemon alive: {alive}")


class LineCounter:
    """Counts lines appended to a file, reading only what is new."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset, self.count = path, 0, 0

    def __call__(self) -> int:
        try:
            with self.path.open("rb") as fh:
                fh.seek(self.offset)
                chunk = fh.read()
        except FileNotFoundError:
            return self.count
        self.offset += len(chunk)
        self.count += chunk.count(b"\n")
        return self.count


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc (clock ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pss_mb(pid: int) -> float:
    """Proportional set size: what this process adds, shared pages divided among their users."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    return 0.0


def workers_sample(parent: int) -> dict:
    """The workers' PSS (summed) and open descriptors (the most any one holds)."""
    pss, fds, pids = 0.0, 0, []
    for pid in decoder_pids(parent):
        try:
            pss += pss_mb(pid)
            fds = max(fds, len(os.listdir(f"/proc/{pid}/fd")))
            pids.append(pid)
        except OSError:  # replaced between listing and reading
            continue
    return {"workers": len(pids), "workers_pss_mb": round(pss, 1), "worker_fds_max": fds}


# What a series may grow from the second tenth of the run (the first is warm-up)
# to the last tenth and still count as flat: (absolute, relative).
FLAT_SLACK = {"rss_mb": (10.0, 0.10), "fds": (2, 0.0), "workers_pss_mb": (10.0, 0.10),
              "worker_fds_max": (2, 0.0)}


def flatness(samples: list[dict]) -> dict[str, dict]:
    """For each sampled series: its level early and late, and whether it stayed flat."""
    if len(samples) < 3:
        return {}
    tenth = max(1, len(samples) // 10)
    out = {}
    for key, (absolute, relative) in FLAT_SLACK.items():
        early = sum(s[key] for s in samples[tenth : 2 * tenth]) / tenth
        late = sum(s[key] for s in samples[-tenth:]) / tenth
        out[key] = {"early": round(early, 1), "late": round(late, 1),
                    "flat": late - early <= max(absolute, relative * early)}
    return out


def soak(work: Path, pool, files: int) -> dict:
    base = work / "soak"
    d = DaemonProc(base, "--batch-size", "32").start()
    stage = base / "stage"
    stage.mkdir()
    samples = []
    lines = LineCounter(d.results)
    chunk = 1000
    started = time.perf_counter()
    for start in range(0, files, chunk):
        batch = fill(stage, pool, min(chunk, files - start), f"s{start // chunk:04d}-")
        t0 = time.perf_counter()
        cpu0 = cpu_seconds(d.proc.pid)
        for p in batch:
            os.rename(p, d.inbox / p.name)
        while lines() < start + len(batch):
            time.sleep(0.05)
        rate = len(batch) / (time.perf_counter() - t0)
        # The daemon's own CPU per file tells its work from the machine's noise.
        cpu_ms = (cpu_seconds(d.proc.pid) - cpu0) * 1000 / len(batch)
        status = Path(f"/proc/{d.proc.pid}/status").read_text()
        rss = int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]) / 1024
        fds = len(os.listdir(f"/proc/{d.proc.pid}/fd"))
        samples.append({"files": start + len(batch), "rss_mb": round(rss, 1), "fds": fds,
                        "files_per_s": round(rate, 1), "cpu_ms_per_file": round(cpu_ms, 2),
                        **workers_sample(d.proc.pid)})
        # Keep the disk from filling: processed files are not needed after counting.
        for day in (base / "processed").iterdir():
            for p in day.iterdir():
                p.unlink()
    elapsed = time.perf_counter() - started
    total_lines = lines()
    d.terminate()
    first, last = samples[0], samples[-1]
    tenth = max(1, len(samples) // 10)

    def mean(rows: list[dict], key: str, digits: int) -> float:
        return round(sum(r[key] for r in rows) / len(rows), digits)

    return {"files": files, "lines": total_lines, "seconds": round(elapsed, 1),
            "rss_mb_first": first["rss_mb"], "rss_mb_last": last["rss_mb"],
            "rss_mb_max": max(s["rss_mb"] for s in samples),
            "fds_first": first["fds"], "fds_last": last["fds"], "fds_max": max(s["fds"] for s in samples),
            "files_per_s_first_tenth": mean(samples[:tenth], "files_per_s", 1),
            "files_per_s_last_tenth": mean(samples[-tenth:], "files_per_s", 1),
            "cpu_ms_per_file_first_tenth": mean(samples[:tenth], "cpu_ms_per_file", 2),
            "cpu_ms_per_file_last_tenth": mean(samples[-tenth:], "cpu_ms_per_file", 2),
            "workers_pss_mb_first": first["workers_pss_mb"], "workers_pss_mb_last": last["workers_pss_mb"],
            "workers_pss_mb_max": max(s["workers_pss_mb"] for s in samples),
            "worker_fds_first": first["worker_fds_max"], "worker_fds_last": last["worker_fds_max"],
            "workers_first": first["workers"], "workers_last": last["workers"],
            "flatness": flatness(samples),
            "samples": samples}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=5000)
    ap.add_argument("--kills", type=int, default=50)
    ap.add_argument("--soak-files", type=int, default=100_000)
    ap.add_argument("--bar-files", type=int, default=1000)
    ap.add_argument("--bar-kills", type=int, default=25)
    ap.add_argument("--only", choices=["kill-bar", "soak"],
                    help="kill-bar: only the kill bar (no soak); soak: only the soak (no faults)")
    ap.add_argument("--out", type=Path, default=Path("bench-results"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="digitwatch-soak-"))
    pool = make_pool(40)
    try:
        bar = [] if args.only == "soak" else [
            kill_bar(work, pool, args.bar_files, args.bar_kills, other_fs=False),
            kill_bar(work, pool, args.bar_files, args.bar_kills, other_fs=True)]
        if args.only == "soak":
            faults, long_run = [], soak(work, pool, args.soak_files)
        elif args.only == "kill-bar":
            faults, long_run = bar, None
        else:
            faults = [
                sigkill_loop(work, pool, args.files, args.kills),
                *bar,
                disk_full(work, pool),
                results_deleted(work, pool),
                inbox_recreated(work, pool),
            ]
            long_run = soak(work, pool, args.soak_files) if args.soak_files else None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if faults:
        print(f"{'fault':<30} {'files in':>9} {'lines out':>10} {'placed':>7} {'lost':>5} {'dup':>4}  note")
    for f in faults:
        if "skipped" in f:
            print(f"{f['fault']:<30} skipped: {f['skipped']}")
            continue
        print(f"{f['fault']:<30} {f['files_in']:>9} {f['lines_out']:>10} {f['files_placed']:>7} "
              f"{f['lost']:>5} {f['duplicated']:>4}  {f['note']}")
        if "extra_placed" in f:
            print(f"{'':<30} extra placed copies: {f['extra_placed']}; temporary names, claims or "
                  f"journals left: {f['temp_or_state_left']}")
    if long_run:
        s = long_run
        print(f"\nsoak: {s['files']} files, {s['lines']} lines in {s['seconds']} s; "
              f"RSS {s['rss_mb_first']} -> {s['rss_mb_last']} MB (max {s['rss_mb_max']}); "
              f"fds {s['fds_first']} -> {s['fds_last']} (max {s['fds_max']}); "
              f"files/s first tenth {s['files_per_s_first_tenth']}, last tenth {s['files_per_s_last_tenth']}; "
              f"daemon CPU ms/file first tenth {s['cpu_ms_per_file_first_tenth']}, "
              f"last tenth {s['cpu_ms_per_file_last_tenth']}")
        print(f"workers: {s['workers_first']} -> {s['workers_last']}; PSS (all workers) "
              f"{s['workers_pss_mb_first']} -> {s['workers_pss_mb_last']} MB (max {s['workers_pss_mb_max']}); "
              f"fds per worker {s['worker_fds_first']} -> {s['worker_fds_last']}")
        for key, f in s["flatness"].items():
            print(f"  {key:<16} second tenth {f['early']:>8} last tenth {f['late']:>8}  "
                  f"{'flat' if f['flat'] else 'GROWS'}")
        if not s["flatness"]:
            print("  flatness: too few samples (one per 1,000 files; at least 3 needed)")
    (args.out / "soak.json").write_text(json.dumps({"faults": faults, "soak": long_run}, indent=2))
    print(f"wrote {args.out / 'soak.json'}")
    if long_run and not all(f["flat"] for f in long_run["flatness"].values()):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
