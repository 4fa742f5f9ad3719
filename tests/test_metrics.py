"""The Prometheus endpoint, scraped from a running daemon."""

from __future__ import annotations

import socket
import urllib.request
from pathlib import Path

import pytest

from tests.daemon_harness import PNG_GOOD, DaemonProc, drop

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def value(text: str, prefix: str) -> float:
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{prefix} not in metrics")


def test_scrape_counts_files_batches_and_model(tmp_path):
    port = free_port()
    d = DaemonProc(tmp_path, "--metrics-port", str(port)).start()
    for i in range(3):
        drop(d.inbox, f"good{i}.png", PNG_GOOD)
    drop(d.inbox, "bad.png", b"nope")
    d.wait_lines(4)
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert d.terminate() == 0
    assert value(text, 'digitwatch_files_total{status="ok"}') == 3
    assert value(text, 'digitwatch_files_total{status="error"}') == 1
    assert value(text, "digitwatch_file_latency_seconds_count") == 4
    assert value(text, "digitwatch_batch_size_sum") == 4
    assert value(text, "digitwatch_queue_depth") == 0
    assert 'digitwatch_model_info{instance="d",model="digits.tflite@' in text


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
