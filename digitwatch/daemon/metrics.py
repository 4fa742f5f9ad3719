"""Optional Prometheus endpoint (`metrics_port`; off at 0). Bound to 127.0.0.1
by default: scraping is for a local agent or an SSH tunnel, not the world.

No label is called `instance`: Prometheus sets that one on every series from
the target's address, and renames ours to exported_instance. Every status
series exists from the start at 0, so rate() and alerts see them before the
first file of that kind; no `_created` series.
"""

from __future__ import annotations

import socketserver
import threading
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from digitwatch import results
from digitwatch.errors import ConfigError

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
# A scraper storm costs bounded memory: at most this many connections are
# served at once (one thread each); the rest wait in the kernel's listen queue.
MAX_CONNECTIONS = 4
IDLE_TIMEOUT_S = 2.0  # a connection that sends nothing this long is closed
# Every result status results.py defines (STATUS_OK, STATUS_LOW, ...): a new one
# gets its series without a change here.
STATUSES = tuple(sorted(v for k, v in vars(results).items() if k.startswith("STATUS_") and isinstance(v, str)))


class Metrics:
    """Counters the daemon updates; a no-op object when the endpoint is off."""

    def __init__(self, port: int, bind: str, *, model_id: str, instance: str) -> None:
        self.enabled = port > 0
        if not self.enabled:
            return
        try:
            import prometheus_client as prom
        except ImportError as exc:
            raise ConfigError("metrics_port is set but prometheus_client is not installed "
                              "(pip install 'digitwatch[metrics]')") from exc
        # A process-wide switch in prometheus_client; this daemon is the process.
        prom.disable_created_metrics()
        self.registry = prom.CollectorRegistry()
        # process_* (memory, CPU, fds) and python_info: the default registry has
        # them, our own registry only if asked.
        prom.ProcessCollector(registry=self.registry)
        prom.PlatformCollector(registry=self.registry)
        prom.GCCollector(registry=self.registry)
        self.files = prom.Counter("digitwatch_files", "Files handled, by result status",
                                  ["status"], registry=self.registry)
        for status in STATUSES:
            self.files.labels(status=status)
        self.latency = prom.Histogram("digitwatch_file_latency_seconds",
                                      "From starting work on a file to its result",
                                      buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch = prom.Histogram("digitwatch_batch_size", "Files per model call",
                                    buckets=BATCH_BUCKETS, registry=self.registry)
        self.queue = prom.Gauge("digitwatch_queue_depth", "Files claimed or ready, not yet reported",
                                registry=self.registry)
        self.backlog = prom.Gauge("digitwatch_inbox_backlog", "Files waiting in the inbox at the last scan",
                                  registry=self.registry)
        info = prom.Info("digitwatch_model", "The model in use", registry=self.registry)
        info.info({"model": model_id, "daemon_instance": instance})
        try:
            self.server = make_server(bind, port, prom.make_wsgi_app(self.registry),
                                      server_class=_BoundedServer, handler_class=_QuietHandler)
        except OSError as exc:
            raise ConfigError(f"metrics_port {port} on {bind}: {exc.strerror or exc}") from exc
        self.thread = threading.Thread(target=self.server.serve_forever, name="metrics", daemon=True)
        self.thread.start()

    def file_done(self, status: str, latency_ms: float) -> None:
        if self.enabled:
            self.files.labels(status=status).inc()
            self.latency.observe(latency_ms / 1000.0)

    def batch_done(self, size: int) -> None:
        if self.enabled:
            self.batch.observe(size)

    def depth(self, queued: int, backlog: int | None = None) -> None:
        if self.enabled:
            self.queue.set(queued)
            if backlog is not None:
                self.backlog.set(backlog)

    def close(self) -> None:
        if self.enabled:
            self.server.shutdown()
            self.server.server_close()


class _QuietHandler(WSGIRequestHandler):
    """No access log on stderr (the journal is for the daemon's events); idle connections time out."""

    timeout = IDLE_TIMEOUT_S

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _BoundedServer(socketserver.ThreadingMixIn, WSGIServer):
    """A thread per connection, at most MAX_CONNECTIONS at once: the accepting
    thread waits for a free slot, so further connections queue in the kernel."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        self._slots.acquire()
        try:
            threading.Thread(target=self._serve, args=(request, client_address), daemon=True).start()
        except RuntimeError:
            self._slots.release()
            self.shutdown_request(request)

    def _serve(self, request: Any, client_address: Any) -> None:
        try:
            self.process_request_thread(request, client_address)
        finally:
            self._slots.release()
