"""The Prometheus endpoint, scraped over HTTP from a running daemon."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from digitwatch.daemon.metrics import STATUSES
from digitwatch.results import STATUS_ERROR, STATUS_LOW, STATUS_OK
from tests.daemon_harness import PNG_GOOD, DaemonProc, drop

pytestmark = pytest.mark.system


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def value(text: str, prefix: str) -> float:
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{prefix} not in metrics")


def scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


def labels(text: str) -> set[str]:
    """Every label name on every series."""
    names = set()
    for line in text.splitlines():
        if not line.startswith("#") and "{" in line:
            names |= set(re.findall(r'([A-Za-z_][A-Za-z0-9_]*)="', line.split("{", 1)[1].rsplit("}", 1)[0]))
    return names


def promtool_check(text: str) -> None:
    """`promtool check metrics` reads the exposition on stdin; exit 0 is clean
    (it prints lint findings, such as a counter without _total, and fails)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian: apt-get install prometheus); .ci/run installs it")
    r = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_statuses_come_from_results():
    assert set(STATUSES) >= {STATUS_OK, STATUS_LOW, STATUS_ERROR}


def test_series_from_the_start_no_instance_label_promtool_clean(tmp_path):
    port = free_port()
    d = DaemonProc(tmp_path, "--metrics-port", str(port)).start()
    try:
        text = scrape(port)  # before any file
    finally:
        assert d.terminate() == 0
    for status in STATUSES:
        assert value(text, f'digitwatch_files_total{{status="{status}"}}') == 0
    assert "instance" not in labels(text)
    assert 'daemon_instance="d"' in text
    assert "_created" not in text
    assert value(text, "process_resident_memory_bytes") > 10e6
    assert value(text, "process_open_fds") > 0
    assert "python_info{" in text
    promtool_check(text)


def test_scrape_counts_files_batches_and_model(tmp_path):
    port = free_port()
    d = DaemonProc(tmp_path, "--metrics-port", str(port)).start()
    for i in range(3):
        drop(d.inbox, f"good{i}.png", PNG_GOOD)
    drop(d.inbox, "bad.png", b"nope")
    d.wait_lines(4)
    # Lines are synced before the batch's metrics are updated: poll, do not race.
    deadline = time.monotonic() + 30
    while value(text := scrape(port), "digitwatch_batch_size_sum") < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert d.terminate() == 0
    assert value(text, 'digitwatch_files_total{status="ok"}') == 3
    assert value(text, 'digitwatch_files_total{status="error"}') == 1
    assert value(text, "digitwatch_file_latency_seconds_count") == 4
    assert value(text, "digitwatch_batch_size_sum") == 4
    assert value(text, "digitwatch_queue_depth") == 0
    assert value(text, f'digitwatch_files_total{{status="{STATUS_LOW}"}}') == 0
    assert 'digitwatch_model_info{daemon_instance="d",model="digits.tflite@' in text
    assert "instance" not in labels(text)
    promtool_check(text)


def test_bound_to_localhost_only(tmp_path):
    port = free_port()
    d = DaemonProc(tmp_path, "--metrics-port", str(port)).start()
    with socket.socket() as s:
        s.settimeout(1)
        assert s.connect_ex(("127.0.0.1", port)) == 0
    listening = Path("/proc/net/tcp").read_text()
    assert f"0100007F:{port:04X}" in listening
    assert f"00000000:{port:04X}" not in listening
    assert d.terminate() == 0
