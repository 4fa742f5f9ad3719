"""sd_notify over the datagram socket systemd names in NOTIFY_SOCKET; no
libsystemd needed. Without NOTIFY_SOCKET every call is a no-op."""

from __future__ import annotations

import os
import socket
import time


def notify(*messages: str) -> bool:
    """Send KEY=VALUE lines to systemd; returns whether anything was sent."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(messages).encode())
    except OSError:
        return False
    return True


class Watchdog:
    """WATCHDOG=1 at half of WATCHDOG_USEC, sent from the loop that does the work,
    so a hung loop stops pinging and systemd restarts it."""

    def __init__(self) -> None:
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        enabled = usec is not None and (pid is None or pid == str(os.getpid()))
        self.interval = int(usec) / 2e6 if enabled and usec else None
        self._next = 0.0

    def ping(self, status: str = "") -> None:
        if self.interval is None:
            return
        now = time.monotonic()
        if now >= self._next:
            self._next = now + self.interval
            notify("WATCHDOG=1", *([f"STATUS={status}"] if status else []))


def status_text(*, ok: int, low_confidence: int, error: int, in_flight: int, waiting: int,
                blocked: int = 0, blocked_reason: str = "") -> str:
    """The STATUS= line: counters, and a blocked commit first, where
    `systemctl status` shows it before anything else."""
    counts = (f"ok={ok} low_confidence={low_confidence} error={error} "
              f"in_flight={in_flight} waiting={waiting}")
    if blocked:
        return f"commit blocked: {blocked_reason or 'unknown error'}, {blocked} files waiting; {counts}"
    return counts


class StatusNotifier:
    """STATUS= when the text changes, at most every `min_interval` seconds (a
    burst changes the counters per file). `ready()` sends READY=1 with its own
    text and takes the counters as they stand as already shown, so that text
    stays until something really changes. A change held back by the rate
    limit goes out on a later call: the loop calls `update` every turn."""

    def __init__(self, min_interval: float = 0.5, clock=time.monotonic, send=notify) -> None:
        self.min_interval = min_interval
        self._clock = clock
        self._send = send
        self._last_source = ""
        self._sent_at = float("-inf")
        self.shown = ""  # the text systemd shows now; watchdog pings repeat it

    def ready(self, text: str, source: str) -> None:
        self._send("READY=1", f"STATUS={text}")
        self.shown, self._last_source, self._sent_at = text, source, self._clock()

    def update(self, text: str) -> bool:
        """Send `text` if it changed and the interval allows; whether it was sent."""
        if text == self._last_source:
            return False
        now = self._clock()
        if now - self._sent_at < self.min_interval:
            return False
        self._send(f"STATUS={text}")
        self.shown, self._last_source, self._sent_at = text, text, now
        return True
