"""`make bench`: throughput, latency and memory of the daemon, measured against
a plain decode-only loop and the original per-file model.predict loop, all in
the same run on the same files. Prints a table and writes JSON.

    python -m tests.bench.run [--out DIR] [--files N] [--accuracy N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np

from digitwatch.data import load_mnist
from tests import pngwrite, scans
from tests.conftest import MNIST_DIR
from tests.daemon_harness import DaemonProc


def make_pool(count: int, seed: int = 0) -> list[tuple[bytes, int]]:
    """Distinct scan-sized PNGs (70-140 KB) of MNIST test digits."""
    mnist = load_mnist(MNIST_DIR)
    rng = np.random.default_rng(seed)
    pool = []
    i = 0
    while len(pool) < count:
        k = int(rng.integers(len(mnist.x_test)))
        ink = scans.ink_from_mnist(mnist.x_test[k], int(rng.integers(90, 200)))
        rgb, _ = scans.render_page(ink, "realistic", rng)
        data = pngwrite.encode_flavour(rgb, None, "gray8" if i % 2 else "rgb8")
        i += 1
        if 70_000 <= len(data) <= 140_000:
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


def stage_costs(paths: list[Path]) -> dict:
    """What one file costs, stage by stage, on one thread and on two: where the
    daemon's time goes, and which stages two threads can run side by side
    (OpenCV releases the GIL; the many small numpy steps of normalize do not)."""
    from digitwatch import imaging
    from digitwatch.classify import prepare_file

    cv2.setNumThreads(1)  # as in the daemon
    datas = [p.read_bytes() for p in paths]
    grays = [imaging.decode_gray(d) for d in datas]
    stages = {
        "decode": (_decode, datas),
        "normalize": (imaging.normalize, grays),
        "prepare_file": (lambda p: prepare_file(p, p.name, follow_links=False,
                                                max_pixels=imaging.DEFAULT_MAX_PIXELS), paths),
    }
    out = {}
    for name, (fn, items) in stages.items():
        one, two = _rate(fn, items, 1), _rate(fn, items, 2)
        out[name] = {"ms_per_file_1_thread": 1000 / one, "speedup_2_threads": two / one}
    return out


def original_loop(paths: list[Path]) -> float:
    """files/s of the student script: imread, resize, invert, model.predict per file."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from digitwatch.training import build_mlp

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


def rss_peak_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def daemon_run(base: Path, staged: list[Path], rate: float | None) -> dict:
    """Drop staged files into a running daemon's inbox by rename; time each line."""
    d = DaemonProc(base, "--batch-size", "32", "--batch-wait-ms", "20", settle=0.5).start()
    tail = Tail(d.results)
    tail.start()
    dropped: dict[str, float] = {}
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
    tail.stop.set()
    peak = rss_peak_mb(d.proc.pid)
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
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("bench-results"))
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--paced-seconds", type=float, default=20.0)
    ap.add_argument("--accuracy", type=int, default=300, help="scans per variation; 0 skips")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="digitwatch-bench-"))
    try:
        pool = make_pool(40)
        sizes = [len(d) for d, _ in pool]
        files = stage(work / "stage-a", pool, args.files)
        decode = decode_only(files)
        costs = stage_costs(files[:400])
        original = original_loop(files[:200])
        burst = daemon_run(work / "burst", files, rate=None)
        paced_files = stage(work / "stage-b", pool, int(50 * args.paced_seconds))
        paced = daemon_run(work / "paced", paced_files, rate=50.0)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = {
        "machine": f"{os.cpu_count()} CPUs",
        "png_kb_mean": float(np.mean(sizes)) / 1000,
        "decode_only_files_per_s": decode,
        "original_loop_files_per_s": original,
        "burst": burst,
        "paced_50_per_s": paced,
        "stage_costs": costs,
        "ratio_vs_decode_only": burst["files_per_s"] / decode,
        "ratio_vs_original": burst["files_per_s"] / original,
    }
    rows = [
        ("scan PNG size (mean)", f"{report['png_kb_mean']:.0f} KB", ""),
        ("decode-only loop, 2 threads", f"{decode:.0f} files/s", ""),
        ("original per-file predict loop", f"{original:.1f} files/s", ""),
        ("daemon end to end (burst)", f"{burst['files_per_s']:.0f} files/s",
         f"{burst['files']} files, {burst['lines']} lines"),
        ("  vs decode-only", f"{report['ratio_vs_decode_only']:.2f}x", "bar: >= 0.70"),
        ("  vs original loop", f"{report['ratio_vs_original']:.0f}x", "bar: >= 50"),
        ("latency at 50 files/s, p50", f"{paced['latency_ms_p50']:.1f} ms", ""),
        ("latency at 50 files/s, p99", f"{paced['latency_ms_p99']:.1f} ms", "bar: <= 100"),
        ("daemon peak RSS (burst)", f"{burst['peak_rss_mb']:.0f} MB", "bar: <= 250"),
        ("daemon peak RSS (paced)", f"{paced['peak_rss_mb']:.0f} MB", ""),
    ]
    for name, c in costs.items():
        rows.append((f"{name}, one thread", f"{c['ms_per_file_1_thread']:.2f} ms/file",
                     f"2 threads: {c['speedup_2_threads']:.2f}x"))
    if args.accuracy:
        from tests.bench import accuracy

        acc = accuracy.run(args.accuracy, None)
        report["accuracy"] = acc
        rows.append(("accuracy, MNIST scans", f"{acc['summary']['mnist_scans']:.2%}", "bar: >= 99%"))
        rows.append(("accuracy, other writers", f"{acc['summary']['other_writers']:.2%}", "bar: >= 95%"))
    width = max(len(r[0]) for r in rows)
    for name, value, note in rows:
        print(f"{name.ljust(width)}  {value:>14}  {note}")
    if "accuracy" in report:
        print()
        print(accuracy.format_rows(report["accuracy"]))
    (args.out / "bench.json").write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out / 'bench.json'}")


if __name__ == "__main__":
    main()
