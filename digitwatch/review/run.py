"""Start a review station: check the settings and the folders, finish what a
killed server left half done, then serve until SIGTERM or SIGINT."""

from __future__ import annotations

from pathlib import Path

import structlog

from digitwatch.config import Settings
from digitwatch.daemon import systemd
from digitwatch.daemon.startup import check_paths
from digitwatch.errors import ConfigError, reason

log = structlog.get_logger("digitwatch")

MAX_TOKEN_BYTES = 4096


def read_token(settings: Settings, env_token: str | None) -> str | None:
    """DIGITWATCH_REVIEW_TOKEN, else the first line of review_token_file; None if neither."""
    if env_token:
        return env_token.strip() or None
    if settings.review_token_file is None:
        return None
    try:
        with open(settings.review_token_file, "rb") as fh:
            text = fh.read(MAX_TOKEN_BYTES).decode("utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        why = reason(exc) if isinstance(exc, OSError) else "not UTF-8"
        raise ConfigError(f"review_token_file {settings.review_token_file}: {why}") from None
    token = text.splitlines()[0].strip() if text else ""
    if len(token) < 16:
        raise ConfigError(f"review_token_file {settings.review_token_file}: the token must be 16 characters or more")
    return token


def _notifying_server_class():  # uvicorn is an optional extra: imported only when serving
    import uvicorn

    class NotifyingServer(uvicorn.Server):
        """READY=1 to systemd once the socket listens; STOPPING=1 on the way out."""

        async def startup(self, sockets=None):
            await super().startup(sockets=sockets)
            if self.started:
                systemd.notify("READY=1")

        async def shutdown(self, sockets=None):
            systemd.notify("STOPPING=1")
            await super().shutdown(sockets=sockets)

    return NotifyingServer


def serve(settings: Settings, env_token: str | None) -> int:
    """Serve the station; returns the exit code (0 after a clean stop)."""
    try:
        import uvicorn
    except ImportError:
        raise ConfigError("the review station needs the [review] extra: pip install 'digitwatch[review]'") from None
    from digitwatch.review.server import Station, check_exposure, create_app

    if settings.review is None:
        raise ConfigError("review is not set: the review station serves the review folder (set review = \"...\")")
    token = read_token(settings, env_token)
    check_exposure(settings.review_bind, token)
    check_paths(settings)
    corrections = settings.corrections or settings.results.parent / "corrections"
    station = Station(settings, token=token, corrections=Path(corrections))
    try:
        finished = station.decider.recover()
        log.info("review_started", bind=settings.review_bind, port=settings.review_port,
                 review=str(settings.review), token=bool(token), recovered=finished)
        config = uvicorn.Config(create_app(station), host=settings.review_bind, port=settings.review_port,
                                log_level="warning", access_log=False, lifespan="off")
        server = _notifying_server_class()(config)
        server.run()
        if not server.started:
            raise ConfigError(f"review_port {settings.review_port} on {settings.review_bind}: cannot listen")
    finally:
        station.decider.close()
    log.info("review_stopped")
    return 0
