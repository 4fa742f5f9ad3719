"""`make bench`: throughput, latency and memory of the daemon, measured against
a plain decode-only loop and the original per-file model.predict loop, all in
the same run on the same files; the worker-process pool against the thread
pool for 1..CPU-count workers; and what each stage of a file costs, for small
(~20 KB) and page-sized (100 KB+) scans; what reading costs (single digits
against 5-digit numbers, cold classify; tests/bench/reading_cost.py). Prints
tables and writes JSON.

    python -m tests.bench.run [--out DIR] [--files N] [--accuracy N] [--cost N] [--base DIR] [--quick]
    python -m tests.bench.run --cost-only [--cost N] [--base DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np

from digitwatch.training import pngwrite, scans
from digitwatch.training.data import load_mnist
from tests.conftest import MNIST_DIR
from tests.daemon_harness import DaemonProc


def make_pool(count: int, seed: int = 0, *, kb: tuple[int, int] = (70, 140),
              height: tuple[int, int] = (90, 200)) -> list[tuple[bytes, int]]:
    """Distinct PNGs of MNIST test digits, kb[0]-kb[1] KB each: scan-sized
    (70-140 KB) by default; small digits on small pages give ~20 KB ones."""
    mnist = load_mnist(MNIST_DIR)
    rng = np.random.default_rng(seed)
    pool = []
    i = 0
    while len(pool) < count:
        k = int(rng.integers(len(mnist.x_test)))
        ink = scans.ink_from_mnist(mnist.x_test[k], int(rng.integers(*height)))
        rgb, _ = scans.render_page(ink, "realistic", rng)
        data = pngwrite.encode_flavour(rgb, None, "gray8" if i % 2 else "rgb8")
        i += 1
        if kb[0] * 1000 <= len(data) <= kb[1] * 1000:
            pool.append((data, int(mnist.y_test[k])))
    return pool


def stage(folder: Path, pool, n: int, prefix: str = "scan") -> list[Path]:
    """Write n files cycling through the pool, ready to be renamed into an inbox."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"{prefix}{i:06d}.png"
        p.write_bytes(pool[i % len(pool)][0])
        paths.append(p)
    return paths


def _decode(data: bytes) -> None:
    cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)


def decode_only(paths: list[Path]) -> float:
    """files/s of a plain 2-thread read + decode loop: the floor any pipeline pays."""
    return _rate(lambda p: _decode(p.read_bytes()), paths, 2)


def _rate(fn, items, threads: int) -> float:
    """items/s of fn over items in `threads` threads (after a short warm-up)."""
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(fn, items[:10]))
        start = time.perf_counter()
        list(pool.map(fn, items))
        return len(items) / (time.perf_counter() - start)


def _ms_each(fn, items) -> float:
    """CPU ms per item of fn on this thread, after a short warm-up. CPU, not
    wall time: on a shared machine wall time mostly measures the neighbours."""
    for item in items[:5]:
        fn(item)
    start = time.thread_time()
    for item in items:
        fn(item)
    return (time.thread_time() - start) * 1000 / len(items)


def _task_cpu(pid: int) -> float:
    """CPU seconds (user + system) one process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _memory_mb(pid: int) -> dict:
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("Rss", "Pss", "Anonymous"):
            out[key.lower() + "_mb"] = int(rest.split()[0]) / 1024
    return out


def pool_run(paths: list[Path], workers: int, *, task=None, depth: int | None = None) -> dict:
    """files/s through a WorkerPool, and CPU per file in this process (submit,
    IPC, the collector thread) and in the workers."""
    from digitwatch.daemon import pool as wk

    done = threading.Semaphore(0)
    kwargs = {"task": task} if task is not None else {}
    started = time.perf_counter()
    pool = wk.WorkerPool(workers, on_done=done.release, depth=depth or wk.DEFAULT_DEPTH, **kwargs).start()
    start_s = time.perf_counter() - started
    try:
        for i, p in enumerate(paths[:10]):  # warm-up
            pool.submit(i, p, p.name)
        for _ in paths[:10]:
            done.acquire()
        pool.completed()
        pids = pool.pids()
        cpu0, wcpu0, t0 = time.process_time(), sum(map(_task_cpu, pids)), time.perf_counter()
        for i, p in enumerate(paths):
            pool.submit(i, p, p.name)
        for _ in paths:
            done.acquire()
        elapsed = time.perf_counter() - t0
        parent, worker = time.process_time() - cpu0, sum(map(_task_cpu, pids)) - wcpu0
        outcomes = pool.completed()
        memory = [_memory_mb(pid) for pid in pids]
    finally:
        pool.close()
    n = len(paths)
    return {"workers": workers, "files_per_s": n / elapsed, "parent_cpu_ms_per_file": parent * 1000 / n,
            "worker_cpu_ms_per_file": worker * 1000 / n, "errors": sum(bool(o.error) for o in outcomes),
            "start_s": start_s, "worker_memory": memory}


def threads_run(paths: list[Path], threads: int) -> dict:
    """files/s of today's thread pool running prepare_file, and its CPU per file."""
    from digitwatch.reader.prepare import prepare_file

    def prep(p: Path):
        return prepare_file(p, p.name, follow_links=False)

    with ThreadPoolExecutor(threads, thread_name_prefix="prepare") as pool:
        list(pool.map(prep, paths[:10]))
        cpu0, t0 = time.process_time(), time.perf_counter()
        list(pool.map(prep, paths))
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return {"threads": threads, "files_per_s": len(paths) / elapsed, "cpu_ms_per_file": cpu * 1000 / len(paths)}


def scaling(paths: list[Path]) -> list[dict]:
    """Worker processes against threads, 1..CPU count: a bigger machine shows its scaling."""
    import cv2 as _cv2

    _cv2.setNumThreads(1)  # as in the daemon
    from digitwatch.daemon.pool import worker_count

    rows = []
    for n in range(1, worker_count() + 1):
        rows.append({"n": n, "processes": pool_run(paths, n), "threads": threads_run(paths, n)})
    return rows


def stage_costs(paths: list[Path]) -> dict:
    """What one file costs, stage by stage, in CPU time on one thread: where a
    worker's time goes. IPC is a worker pool's round trip for a task that does
    nothing (one worker, one file at a time: nothing overlaps), in wall time,
    and the CPU it costs the loop process and the worker."""
    from digitwatch.files import DEFAULT_MAX_BYTES, read_file
    from digitwatch.reader import imaging
    from tests import worker_tasks

    cv2.setNumThreads(1)  # as in the daemon
    datas = [read_file(p, DEFAULT_MAX_BYTES, follow_links=False) for p in paths]
    grays = [imaging.decode_gray(d) for d in datas]
    echo = pool_run(paths, 1, task=worker_tasks.echo, depth=1)
    return {
        "kb_mean": float(np.mean([len(d) for d in datas])) / 1000,
        "read": _ms_each(lambda p: read_file(p, DEFAULT_MAX_BYTES, follow_links=False), paths),
        "hash": _ms_each(lambda d: hashlib.sha256(d).hexdigest(), datas),
        "decode": _ms_each(lambda d: imaging.decode_gray(d), datas),
        "normalize": _ms_each(imaging.normalize, grays),
        "ipc_round_trip": 1000 / echo["files_per_s"],
        "ipc_parent_cpu": echo["parent_cpu_ms_per_file"],
        "ipc_worker_cpu": echo["worker_cpu_ms_per_file"],
    }


def original_loop(paths: list[Path]) -> float:
    """files/s of the student script: imread, resize, invert, model.predict per file."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from digitwatch.training.train import build_mlp

    model = build_mlp()
    model.predict(np.zeros((1, 28, 28, 1), np.float32), verbose=0)  # warm up
    start = time.perf_counter()
    for p in paths:
        img = cv2.imread(str(p), cv2.IMREAD_GRAYSCALE)
        img = 1.0 - cv2.resize(img, (28, 28)).astype(np.float32) / 255.0
        model.predict(img[None, ..., None], verbose=0)
    return len(paths) / (time.perf_counter() - start)


class Tail(threading.Thread):
    """Stamps each results line with the moment it became readable."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.seen: dict[str, float] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        buf, pos = b"", 0
        while not self.stop.is_set():
            try:
                with self.path.open("rb") as fh:
                    fh.seek(pos)
                    chunk = fh.read()
            except FileNotFoundError:
                chunk = b""
            now = time.perf_counter()
            if chunk:
                pos += len(chunk)
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    if line.strip():
                        self.seen[json.loads(line)["file"]] = now
            time.sleep(0.002)


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process and its live children (the daemon and its workers)."""
    total = 0.0
    for p in [pid, *_children(pid)]:
        with contextlib.suppress(OSError):
            total += _task_cpu(p)
    return total


def tree_rss_peak_mb(pid: int) -> float:
    """Peak RSS of a process plus its live children's peaks: an upper bound,
    pages shared between them (libraries) are counted in each."""
    total = 0.0
    for p in [pid, *_children(pid)]:
        with contextlib.suppress(OSError):
            total += rss_peak_mb(p)
    return total


def tree_pss_mb(pid: int) -> float:
    """PSS now of a process and its live children: shared pages (libraries,
    the page cache of the models) split between the processes that map them."""
    total = 0.0
    for p in [pid, *_children(pid)]:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) / 1024
    return total


def rss_peak_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def daemon_run(base: Path, staged: list[Path], rate: float | None, workers: int | None = None) -> dict:
    """Drop staged files into a running daemon's inbox by rename; time each line."""
    extra = ["--workers", str(workers)] if workers else []
    d = DaemonProc(base, "--batch-size", "32", "--batch-wait-ms", "20", *extra, settle=0.5).start()
    tail = Tail(d.results)
    tail.start()
    dropped: dict[str, float] = {}
    cpu0, own0 = tree_cpu(d.proc.pid), _task_cpu(d.proc.pid)
    start = time.perf_counter()
    for i, src in enumerate(staged):
        if rate is not None:
            due = start + i / rate
            while (delay := due - time.perf_counter()) > 0:
                time.sleep(delay)
        os.rename(src, d.inbox / src.name)
        dropped[src.name] = time.perf_counter()
    deadline = time.monotonic() + 300
    while len(tail.seen) < len(staged) and time.monotonic() < deadline:
        time.sleep(0.01)
    # The line is synced before the file is released; wait until all are moved too.
    while time.monotonic() < deadline:
        moved = sum(1 for p in d.processed.rglob("*.png")) + sum(1 for p in d.failed.rglob("*.png"))
        if moved >= len(staged) and not any((d.inbox / ".digitwatch").rglob("*.png")):
            break
        time.sleep(0.01)
    end = time.perf_counter()
    cpu, own = tree_cpu(d.proc.pid) - cpu0, _task_cpu(d.proc.pid) - own0
    tail.stop.set()
    peak = rss_peak_mb(d.proc.pid)
    peak_tree = tree_rss_peak_mb(d.proc.pid)
    pss_tree = tree_pss_mb(d.proc.pid)
    d.terminate()
    lat = np.array([(tail.seen[n] - t) * 1000 for n, t in dropped.items() if n in tail.seen])
    rows = d.lines()
    return {
        "files": len(staged),
        "lines": len(rows),
        "errors": sum(r["status"] == "error" for r in rows),
        "seconds": end - start,
        "files_per_s": len(staged) / (end - start),
        "latency_ms_p50": float(np.percentile(lat, 50)),
        "latency_ms_p99": float(np.percentile(lat, 99)),
        "latency_ms_max": float(lat.max()),
        "peak_rss_mb": peak,
        "peak_rss_with_workers_mb": peak_tree,
        "pss_with_workers_mb_after": pss_tree,
        "cores_used": cpu / (end - start),
        "cpu_ms_per_file": cpu * 1000 / len(staged),
        "loop_process_cpu_ms_per_file": own * 1000 / len(staged),
    }


def small_report(work: Path, small_pool: list, args: argparse.Namespace) -> dict:
    """Small scans dropped at once (the case where the loop process used to be
    the bottleneck) against a 2-thread decode-only loop over the same files,
    and, with --daemon-scaling, the same burst with 1, 2, 4 ... workers."""
    n = args.small_files or 3000
    small = stage(work / "stage-small", small_pool, n, prefix="burst")
    decode = decode_only(small)
    burst = daemon_run(work / "small-burst", small, rate=None)
    rows = [
        ("small scans: decode-only loop, 2 threads", f"{decode:.0f} files/s", f"{n} files"),
        ("small scans: daemon end to end (burst)", f"{burst['files_per_s']:.0f} files/s",
         f"{burst['lines']} lines, {burst['errors']} errors"),
        ("  vs decode-only", f"{burst['files_per_s'] / decode:.2f}x", "bar: >= 0.30"),
        ("  cores used", f"{burst['cores_used']:.2f}", "bar: >= 1.8"),
        ("  CPU per file (daemon + workers)", f"{burst['cpu_ms_per_file']:.2f} ms",
         f"of which the loop process {burst['loop_process_cpu_ms_per_file']:.2f} ms"),
        ("  peak RSS, daemon; with workers",
         f"{burst['peak_rss_mb']:.0f} MB; {burst['peak_rss_with_workers_mb']:.0f} MB", "bar: <= 300"),
        ("  PSS after the burst, daemon + workers", f"{burst['pss_with_workers_mb_after']:.0f} MB", ""),
    ]
    scaling_rows = []
    for k in [int(x) for x in args.daemon_scaling.split(",") if x.strip()]:
        again = stage(work / f"stage-small-{k}", small_pool, n, prefix=f"w{k}")
        r = daemon_run(work / f"small-w{k}", again, rate=None, workers=k)
        scaling_rows.append({"workers": k, **r})
        rows.append((f"  {k} worker(s): files/s, cores, p50/p99", f"{r['files_per_s']:.0f}",
                     f"{r['cores_used']:.2f} cores; {r['latency_ms_p50']:.0f}/{r['latency_ms_p99']:.0f} ms; "
                     f"loop {r['loop_process_cpu_ms_per_file']:.2f} ms/file"))
    return {"files": n, "decode_only_files_per_s": decode, "burst": burst,
            "ratio_vs_decode_only": burst["files_per_s"] / decode, "scaling": scaling_rows, "rows": rows}


def _scaling_rows(label: str, rows: list[dict]) -> list[tuple[str, str, str]]:
    out = []
    one = rows[0]["processes"]["files_per_s"]
    for r in rows:
        p, t = r["processes"], r["threads"]
        out.append((f"{label}: {r['n']} worker process(es)", f"{p['files_per_s']:.0f} files/s",
                    f"{p['files_per_s'] / one:.2f}x of 1; CPU/file: loop {p['parent_cpu_ms_per_file']:.2f} ms"
                    f" + workers {p['worker_cpu_ms_per_file']:.2f} ms; errors {p['errors']}"))
        out.append((f"{label}: {r['n']} thread(s) (today)", f"{t['files_per_s']:.0f} files/s",
                    f"CPU/file {t['cpu_ms_per_file']:.2f} ms; processes/threads "
                    f"{p['files_per_s'] / t['files_per_s']:.2f}x"))
    return out


def _stage_rows(label: str, c: dict) -> list[tuple[str, str, str]]:
    rows = [(f"{label} ({c['kb_mean']:.0f} KB): {name}", f"{c[name]:.3f} ms/file", "CPU")
            for name in ("read", "hash", "decode", "normalize")]
    rows.append((f"{label} ({c['kb_mean']:.0f} KB): IPC round trip", f"{c['ipc_round_trip']:.3f} ms/file",
                 f"wall; CPU: loop {c['ipc_parent_cpu']:.3f} ms, worker {c['ipc_worker_cpu']:.3f} ms"))
    return rows


def _worker_rows(costs: dict, scale: dict) -> list[tuple[str, str, str]]:
    rows = []
    for label in ("small", "page"):
        rows += _stage_rows(label, costs[label])
    for label in ("small", "page"):
        rows += _scaling_rows(label, scale[label])
    mem = scale["page"][-1]["processes"]["worker_memory"]
    rows.append(("one worker's memory (page scans)", f"{np.mean([m['rss_mb'] for m in mem]):.0f} MB RSS",
                 f"PSS {np.mean([m['pss_mb'] for m in mem]):.0f} MB, "
                 f"anonymous {np.mean([m['anonymous_mb'] for m in mem]):.0f} MB"))
    rows.append(("worker pool start", f"{scale['page'][-1]['processes']['start_s']:.2f} s",
                 f"{scale['page'][-1]['n']} workers, warm"))
    return rows


def _print(rows: list[tuple[str, str, str]]) -> None:
    width = max(len(r[0]) for r in rows)
    for name, value, note in rows:
        print(f"{name.ljust(width)}  {value:>16}  {note}")


def reading_cost_table(count: int, base: Path | None) -> str:
    """What reading costs: CPU per file for single digits (MNIST, strokes,
    fonts) and 5-digit numbers, the 5-digit / 1-digit ratio (bar 3x), cold
    `classify` of one file (bar 1.0 s); with `base`, the same for that tree
    (bar: single digits at most 1.25x its CPU). Its own process, as measured."""
    cmd = [sys.executable, "-m", "tests.bench.reading_cost", "--count", str(count)]
    if base is not None:
        cmd += ["--base", str(base)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, check=False)
    if r.returncode:
        return f"reading cost: failed ({r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode})"
    return "reading cost (tests/bench/reading_cost.py):\n" + r.stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("bench-results"))
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--paced-seconds", type=float, default=20.0)
    ap.add_argument("--accuracy", type=int, default=300, help="scans per variation; 0 skips")
    ap.add_argument("--scaling-files", type=int, default=1000, help="files per workers=N run")
    ap.add_argument("--quick", action="store_true",
                    help="a small run for a busy machine: 300 files, 5 s paced, 200 per scaling run, no accuracy")
    ap.add_argument("--workers-only", action="store_true",
                    help="only the per-stage table and the processes-against-threads scaling")
    ap.add_argument("--cost", type=int, default=100,
                    help="scans per kind for the reading-cost table (tests/bench/reading_cost.py); 0 skips")
    ap.add_argument("--cost-only", action="store_true", help="only the reading-cost table")
    ap.add_argument("--base", type=Path, help="a checkout to compare the reading cost with (its default model)")
    ap.add_argument("--small-files", type=int, default=3000,
                    help="small scans (12-30 KB) dropped at once: the loop-bound case; 0 skips")
    ap.add_argument("--daemon-scaling", default="",
                    help="comma-separated worker counts for the end-to-end scaling table on small scans (1,2,4)")
    ap.add_argument("--small-only", action="store_true", help="only the small-scan burst and the scaling table")
    args = ap.parse_args()
    if args.quick:
        args.files, args.paced_seconds, args.accuracy, args.scaling_files = 300, 5.0, 0, 200
        args.cost = min(args.cost, 30)
    if args.cost_only:
        print(reading_cost_table(args.cost, args.base))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="digitwatch-bench-"))
    try:
        distinct = 12 if args.quick else 40  # page-sized scans take ~6 s each to make here
        small_pool = make_pool(distinct, seed=1, kb=(12, 30), height=(28, 70))
        if args.small_only:
            report = small_report(work, small_pool, args)
            _print(report.pop("rows"))
            (args.out / "bench-small.json").write_text(json.dumps(report, indent=2))
            print(f"\nwrote {args.out / 'bench-small.json'}")
            return
        pool = make_pool(distinct)
        sizes = [len(d) for d, _ in pool]
        files = stage(work / "stage-a", pool, args.files)
        small = stage(work / "stage-s", small_pool, args.scaling_files, prefix="small")
        costs = {"small": stage_costs(small[:200]), "page": stage_costs(files[:200])}
        scale = {"small": scaling(small), "page": scaling(files[: args.scaling_files])}
        if args.workers_only:
            _print(_worker_rows(costs, scale))
            (args.out / "bench-workers.json").write_text(json.dumps({"stage_costs": costs, "scaling": scale},
                                                                    indent=2))
            print(f"\nwrote {args.out / 'bench-workers.json'}")
            return
        decode = decode_only(files)
        original = original_loop(files[:200])
        burst = daemon_run(work / "burst", files, rate=None)
        paced_files = stage(work / "stage-b", pool, int(50 * args.paced_seconds))
        paced = daemon_run(work / "paced", paced_files, rate=50.0)
        small_burst = small_report(work, small_pool, args) if args.small_files else None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = {
        "machine": f"{os.cpu_count()} CPUs, {len(os.sched_getaffinity(0))} usable",
        "png_kb_mean": float(np.mean(sizes)) / 1000,
        "decode_only_files_per_s": decode,
        "original_loop_files_per_s": original,
        "burst": burst,
        "paced_50_per_s": paced,
        "stage_costs": costs,
        "scaling": scale,
        "ratio_vs_decode_only": burst["files_per_s"] / decode,
        "ratio_vs_original": burst["files_per_s"] / original,
    }
    rows = [
        ("scan PNG size (mean)", f"{report['png_kb_mean']:.0f} KB", ""),
        ("decode-only loop, 2 threads", f"{decode:.0f} files/s", ""),
        ("original per-file predict loop", f"{original:.1f} files/s", ""),
        ("daemon end to end (burst)", f"{burst['files_per_s']:.0f} files/s",
         f"{burst['files']} files, {burst['lines']} lines"),
        ("  vs decode-only", f"{report['ratio_vs_decode_only']:.2f}x", "bar: >= 0.30"),
        ("  vs original loop", f"{report['ratio_vs_original']:.0f}x", "bar: >= 50"),
        ("latency at 50 files/s, p50", f"{paced['latency_ms_p50']:.1f} ms", ""),
        ("latency at 50 files/s, p99", f"{paced['latency_ms_p99']:.1f} ms", "bar: <= 100"),
        ("  cores used in the burst", f"{burst['cores_used']:.2f}", "bar: >= 1.8"),
        ("  CPU per file (daemon + workers)", f"{burst['cpu_ms_per_file']:.2f} ms",
         f"of which the loop process {burst['loop_process_cpu_ms_per_file']:.2f} ms"),
        ("daemon peak RSS (burst)", f"{burst['peak_rss_mb']:.0f} MB", ""),
        ("  with its workers (sum of peaks)", f"{burst['peak_rss_with_workers_mb']:.0f} MB", "bar: <= 300"),
        ("daemon peak RSS (paced)", f"{paced['peak_rss_mb']:.0f} MB", ""),
    ]
    if small_burst is not None:
        rows += small_burst.pop("rows")
        report["small"] = small_burst
    rows += _worker_rows(costs, scale)
    if args.accuracy:
        from tests.bench import accuracy

        acc = accuracy.run(args.accuracy, None)
        report["accuracy"] = acc
        rows.append(("accuracy, MNIST scans", f"{acc['summary']['mnist_scans']:.2%}", "bar: >= 99%"))
        rows.append(("accuracy, other writers", f"{acc['summary']['other_writers']:.2%}", "bar: >= 95%"))
    _print(rows)
    if "accuracy" in report:
        print()
        print(accuracy.format_rows(report["accuracy"]))
    if args.cost:
        report["reading_cost"] = reading_cost_table(args.cost, args.base)
        print()
        print(report["reading_cost"])
    (args.out / "bench.json").write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out / 'bench.json'}")


if __name__ == "__main__":
    main()
