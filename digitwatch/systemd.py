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
