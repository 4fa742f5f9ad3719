"""Two digitwatch daemons on two NFS client mounts of one export; run INSIDE the
User-Mode Linux guest of shared/tools/nfs-uml (M1, M2, OUT in the environment).

    python tests/nfs_scenario.py --files 1000 --results shared|per-host [--kill-at 0.3]

Both daemons poll (`--polling`: inotify sees nothing written through the
other mount). Files are dropped alternately through M1 and M2 (dot-name, then
rename); once a share of the lines is out, host1's daemon is SIGKILLed and
host2 must take over its claims. Prints one line `NFS-RESULT {json}` with the
counts: lines, distinct, placed copies, lost, duplicated, seconds.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's digitwatch, not whatever the venv has installed
FIXTURES = sorted((ROOT / "tests" / "fixtures" / "scans").glob("*.png"))

# Native code that picks AVX/AVX-512 by itself computes wrong results or
# crashes in the guest (see shared/tools/README.md): hold numpy, OpenBLAS and
# OpenCV (and its IPP) to SSE. Checked by classifying the fixtures first.
GUEST_ENV = {
    "NPY_DISABLE_CPU_FEATURES": "X86_V3 X86_V4 AVX512_ICL AVX512_SPR",
    "OPENBLAS_CORETYPE": "Nehalem",
    "OPENBLAS_NUM_THREADS": "1",
    "OPENCV_CPU_DISABLE": "AVX2,FP16,AVX,FMA3",
    "OPENCV_IPP": "disabled",
}


def read_lines(paths: list[Path]) -> list[dict]:
    rows = []
    for p in paths:
        if p.exists():
            rows += list(csv.DictReader(io.StringIO(p.read_text(errors="replace"))))
    return rows


SAME_PATH = Path("/run/dw-share")  # --same-path: where each daemon sees its own mount


def daemon(mount: Path, name: str, results: Path, env: dict, log: Path, args) -> subprocess.Popen:
    """One daemon on one mount. With --same-path it runs in its own mount
    namespace with its mount bound at SAME_PATH, as hosts that all mount the
    share at one path: every path it is given (results included) reads the same."""
    base = (SAME_PATH if args.same_path else mount) / "work"
    if args.same_path:
        results = SAME_PATH / results.relative_to(mount)
    cmd = [
        sys.executable, "-m", "digitwatch.cli", "watch", "--polling",
        "--poll-interval", str(args.poll), "--settle-seconds", str(args.settle),
        "--rescan-seconds", str(args.rescan), "--inbox", str(base / "inbox"),
        "--processed", str(base / "processed"), "--failed", str(base / "failed"),
        "--results", str(results), "--format", "csv", "--instance", name, "--log-format", "json",
    ]
    if args.same_path:
        SAME_PATH.mkdir(exist_ok=True)
        script = f'mount --bind "{mount}" "{SAME_PATH}" && exec "$@"'
        cmd = ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", *cmd]
    return subprocess.Popen(cmd, stdout=log.open("ab"), stderr=subprocess.STDOUT, cwd=ROOT, env=env)


def known_classification(env: dict, out: Path) -> dict:
    """The guest computes what the host does: the clean fixtures, by label."""
    r = subprocess.run([sys.executable, "-m", "digitwatch.cli", "classify", "--format", "csv",
                        *map(str, FIXTURES)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    wrong = [row["file"] for row in rows if row["digit"] != Path(row["file"]).stem.rsplit("-", 1)[1]]
    return {"rc": r.returncode, "files": len(rows), "wrong": wrong}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=1000)
    ap.add_argument("--results", choices=["shared", "per-host"], default="shared")
    ap.add_argument("--kill-at", type=float, default=0.3, help="share of lines out before host1 is killed")
    ap.add_argument("--poll", type=float, default=0.5)
    ap.add_argument("--settle", type=float, default=0.5)
    ap.add_argument("--rescan", type=float, default=5.0)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--same-path", action="store_true",
                    help="each daemon sees its mount at one path (/run/dw-share), as hosts mounting the share alike")
    args = ap.parse_args()
    m1, m2, out = Path(os.environ["M1"]), Path(os.environ["M2"]), Path(os.environ["OUT"])
    env = {**os.environ, **GUEST_ENV, "PYTHONPATH": str(ROOT)}
    mounts = [line for line in Path("/proc/mounts").read_text().splitlines()
              if line.split()[2] in ("nfs", "nfs4") and line.split()[1] == str(m1)]
    summary: dict = {"files": args.files, "results_mode": args.results, "same_path": args.same_path,
                     "mount": mounts}
    from digitwatch.daemon import fsinfo

    summary["fsinfo_on_mount"] = fsinfo.network_fs(m1)
    # Which digit the guest reads does not matter here (every file one line,
    # one placed copy): on some CPUs the User-Mode Linux guest's SIMD paths
    # compute other digits, so this is reported, and the run goes on.
    summary["known_classification"] = known_classification(env, out)
    summary["arithmetic_trusted"] = not summary["known_classification"]["wrong"]
    (m1 / "work" / "inbox").mkdir(parents=True)
    summary["fsinfo_warnings"] = fsinfo.nfs_warnings({"inbox": m1 / "work" / "inbox"}, polling=False)
    if args.results == "shared":
        res1, res2 = m1 / "work" / "results.csv", m2 / "work" / "results.csv"
        all_results = [m1 / "work" / "results.csv"]
    else:
        res1, res2 = m1 / "work" / "results-host1.csv", m2 / "work" / "results-host2.csv"
        all_results = [m1 / "work" / "results-host1.csv", m1 / "work" / "results-host2.csv"]
    t0 = time.monotonic()
    d1 = daemon(m1, "host1", res1, env, out / "host1.log", args)
    d2 = daemon(m2, "host2", res2, env, out / "host2.log", args)
    expected = []
    killed_at = None
    lines_at_kill = None
    for i in range(args.files):
        mount = m1 if i % 2 == 0 else m2
        src = FIXTURES[i % len(FIXTURES)]
        name = f"f{i:04d}-{src.name}"
        tmp = mount / "work" / "inbox" / f".{name}.part"
        tmp.write_bytes(src.read_bytes())
        os.rename(tmp, mount / "work" / "inbox" / name)
        expected.append(name)
    summary["dropped_s"] = round(time.monotonic() - t0, 1)
    deadline = t0 + args.timeout
    n = 0
    while time.monotonic() < deadline:
        rows = read_lines(all_results)
        n = len(rows)
        both = {r["instance"] for r in rows} >= {"host1", "host2"}  # both at work: a real takeover
        if killed_at is None and both and n >= args.kill_at * args.files:
            d1.send_signal(signal.SIGKILL)
            d1.wait()
            killed_at, lines_at_kill = round(time.monotonic() - t0, 1), n
        if n >= args.files and killed_at is not None:
            break
        if d2.poll() is not None or (killed_at is None and d1.poll() is not None):
            break  # a daemon ended by itself (refused to start?): report it, do not wait out the timeout
        time.sleep(0.5)
    summary["done_s"] = round(time.monotonic() - t0, 1)
    # A late duplicate would come from a rescan (each one also finishes a dead
    # instance's claims): wait until host2 has completed two more of them.
    rescans = (out / "host2.log").read_text(errors="replace").count("inbox_rescanned")
    deadline = time.monotonic() + 4 * args.rescan + 30
    while ((out / "host2.log").read_text(errors="replace").count("inbox_rescanned") < rescans + 2
           and d2.poll() is None and time.monotonic() < deadline):
        time.sleep(0.2)
    if d2.poll() is None:
        d2.send_signal(signal.SIGTERM)
        try:
            d2.wait(timeout=60)
        except subprocess.TimeoutExpired:
            d2.kill()
    if d1.poll() is None:
        d1.kill()
    rows = read_lines(all_results)
    files = [r["file"] for r in rows]
    placed = [p.name for p in (m1 / "work" / "processed").rglob("*.png")]
    placed += [p.name for p in (m1 / "work" / "failed").rglob("*.png")] if (m1 / "work" / "failed").exists() else []
    work = m1 / "work" / "inbox" / ".digitwatch"
    summary.update({
        "killed_host1_at_s": killed_at, "lines_at_kill": lines_at_kill,
        "lines": len(files), "distinct": len(set(files)),
        "lost": len(set(expected) - set(files)), "duplicated": len(files) - len(set(files)),
        "by_instance": {k: sum(1 for r in rows if r["instance"] == k) for k in ("host1", "host2")},
        "status": {k: sum(1 for r in rows if r["status"] == k) for k in ("ok", "low_confidence", "error")},
        "placed": len(placed), "placed_distinct": len(set(placed)),
        "placed_extra_copies": len(placed) - len(set(placed) & set(expected)),
        "left_in_inbox": sorted(p.name for p in (m1 / "work" / "inbox").iterdir() if p.name != ".digitwatch"),
        "left_claims": sorted(str(p.relative_to(work)) for p in work.rglob("*") if p.is_file()
                              and p.name != "lock") if work.exists() else [],
        "host1_rc_before_kill": None if killed_at is not None else d1.returncode,
        "host2_rc": d2.returncode,
        "refusals": {h: _refusal(out / f"{h}.log") for h in ("host1", "host2")},
        "events": {h: _count_events(out / f"{h}.log") for h in ("host1", "host2")},
    })
    summary["left_in_inbox"] = summary["left_in_inbox"][:10]
    summary["left_claims"] = summary["left_claims"][:10]
    print("NFS-RESULT " + json.dumps(summary), flush=True)
    ok = summary["lost"] == 0 and summary["duplicated"] == 0 and summary["placed_extra_copies"] == 0
    return 0 if ok else 1


def _refusal(log: Path) -> str | None:
    """The daemon's one-line error, if it refused to run."""
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    errors = [line for line in lines if line.startswith("digitwatch: error:")]
    return errors[-1][:400] if errors else None


def _count_events(log: Path) -> dict:
    counts: dict[str, int] = {}
    for line in log.read_text(errors="replace").splitlines() if log.exists() else []:
        if line.startswith("{"):
            try:
                event = json.loads(line).get("event", "?")
            except ValueError:
                continue
            if event not in ("file_classified", "batch_classified"):
                counts[event] = counts.get(event, 0) + 1
        elif "Traceback" in line:
            counts["Traceback"] = counts.get("Traceback", 0) + 1
    return counts


if __name__ == "__main__":
    sys.exit(main())
