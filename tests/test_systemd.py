"""systemd integration: the unit files verify, and the notify protocol is spoken
in order over a real datagram socket by the real daemon."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT
from tests.daemon_harness import PNG_GOOD, DaemonProc, drop

UNITS = ["digitwatch.service", "digitwatch@.service", "digitwatch-review.service"]


@pytest.mark.parametrize("unit", UNITS)
def test_units_verify(unit, tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed")
    shipped = (ROOT / "systemd" / unit).read_text()
    # This checkout stands for /opt/digitwatch, and this interpreter's venv for its .venv.
    text = shipped.replace("/opt/digitwatch/.venv", sys.prefix).replace("/opt/digitwatch", str(ROOT))
    name = unit.replace("@.", "@test.")
    (tmp_path / name).write_text(text)
    r = subprocess.run(["systemd-analyze", "verify", str(tmp_path / name)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "Type=notify" in text and "RestartPreventExitStatus=78" in text
    assert "network-online" not in text  # a local-disk daemon needs no network


@pytest.mark.system
def test_notify_ready_watchdog_stopping_in_order(tmp_path):
    sock_path = tmp_path / "notify.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(sock_path))
    server.settimeout(0.2)
    d = DaemonProc(tmp_path, env={"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "400000"})
    d.start()
    drop(d.inbox, "a.png", PNG_GOOD)
    d.wait_lines(1)
    messages: list[str] = []
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        with contextlib.suppress(TimeoutError):
            messages.append(server.recv(4096).decode())
    assert d.terminate() == 0
    while True:
        try:
            messages.append(server.recv(4096).decode())
        except TimeoutError:
            break
    server.close()
    firsts = [m.splitlines()[0] for m in messages]
    assert firsts[0] == "READY=1"
    assert firsts[-1] == "STOPPING=1"
    pings = [m for m in messages if m.startswith("WATCHDOG=1")]
    assert len(pings) >= 5  # every 0.2 s for 3 s, from the working loop
    assert any("STATUS=ok=1" in m for m in pings)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.system
def test_promtool_checks_a_scrape_of_the_real_endpoint(tmp_path):
    """`promtool check metrics` (Prometheus' own linter) on what the running
    daemon serves after a file; installed by .ci/run (apt `prometheus`)."""
    import urllib.request

    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (apt-get install prometheus; .ci/run does)")
    port = _free_port()
    d = DaemonProc(tmp_path, "--metrics-port", str(port))
    d.start()
    try:
        drop(d.inbox, "a.png", PNG_GOOD)
        d.wait_lines(1)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            scrape = resp.read()
    finally:
        assert d.terminate() == 0
    assert b"digitwatch_" in scrape
    r = subprocess.run([promtool, "check", "metrics"], input=scrape, capture_output=True, timeout=60)
    assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), \
        (r.returncode, r.stdout.decode()[-2000:], r.stderr.decode()[-2000:])
