"""The review station's HTTP side: one page, its static files and a small
JSON API (Starlette, served by uvicorn; the `review` extra).

Safety: items are addressed by an opaque id (a keyed hash of the path and
inode), never by a path; only regular files of the review queue are ever
read; every state-changing request carries this server's CSRF token; a
server bound beyond loopback requires a bearer token (header, or the cookie
that `/login?token=` sets); the page loads nothing from other hosts (a
Content-Security-Policy of 'self' says so to the browser)."""

from __future__ import annotations

import hmac
import importlib.resources
import ipaddress
import secrets
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import structlog
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

from digitwatch.config import Settings
from digitwatch.errors import ConfigError, ImageError
from digitwatch.files import read_file
from digitwatch.reader.imaging import decode_gray
from digitwatch.reader.model import Classifier, load_classifier
from digitwatch.reader.prepare import classify_batch, prepare_bytes, side_by_side
from digitwatch.review.decide import Decider, DecisionError, clean_answer, clean_reviewer
from digitwatch.review.queue import Item, Queue, summary

log = structlog.get_logger("digitwatch")

CROP_SCALE = 4  # 28 px candidates shown 112 px tall: large enough to judge
PAGE_SIDE = 1600  # the whole page, on demand, at most this many pixels on its longer side
IMAGE_CACHE = 256  # rendered images kept in memory (the page asks for each item's crop once)
TOKEN_COOKIE = "digitwatch_review"
LATENCY_WINDOW = 1000  # decisions the latency quantiles of /metrics are taken over
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self'; style-src 'self'; script-src 'self'; "
                               "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
STATIC = {"review.js": "text/javascript", "review.css": "text/css"}


def is_loopback(bind: str) -> bool:
    """127.0.0.0/8, ::1 and 'localhost' are loopback; every other address is not."""
    if bind == "localhost":
        return True
    try:
        return ipaddress.ip_address(bind).is_loopback
    except ValueError:
        return False


def check_exposure(bind: str, token: str | None) -> None:
    """A server reachable from other hosts must require a token (exit 78 without)."""
    if not is_loopback(bind) and not token:
        raise ConfigError(f"review_bind {bind} is not loopback: set review_token_file or DIGITWATCH_REVIEW_TOKEN")


class Station:
    """The state one review server holds: the queue, the decider, its secrets, an image cache."""

    def __init__(self, settings: Settings, *, token: str | None, corrections: Path | None) -> None:
        assert settings.review is not None
        self.s = settings
        self.token = token
        self.csrf = secrets.token_urlsafe(32)
        self.queue = Queue(settings.review, settings.results, settings.format, secrets.token_bytes(32))
        self.decider = Decider(settings, corrections)
        self._images: OrderedDict[tuple[str, str], bytes] = OrderedDict()
        self._readings: OrderedDict[str, dict] = OrderedDict()
        self._classifier: Classifier | None = None  # loaded on the first reading asked for
        self.latency_ms: list[float] = []

    # ---------------------------------------------------------------- auth

    def authorized(self, request: Request) -> bool:
        if not self.token:
            return True
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else request.cookies.get(TOKEN_COOKIE, "")
        return hmac.compare_digest(given.encode(), self.token.encode())

    # ---------------------------------------------------------------- images

    def image(self, item: Item, kind: str) -> bytes:
        key = (item.id, kind)
        if key in self._images:
            self._images.move_to_end(key)
            return self._images[key]
        data = read_file(Path(self.queue.path_of(item).decode("utf-8", "surrogateescape")), self.s.max_pixels * 8,
                         follow_links=False)
        png = self._crop(item, data) if kind == "crop" else self._page(data)
        self._images[key] = png
        while len(self._images) > IMAGE_CACHE:
            self._images.popitem(last=False)
        return png

    def reading(self, item: Item) -> dict:
        """The per-digit confidences, read again here when the results line has
        none (CSV carries no `digits`): the same reader and model as the daemon."""
        if item.id in self._readings:
            return self._readings[item.id]
        data = read_file(Path(self.queue.path_of(item).decode("utf-8", "surrogateescape")), self.s.max_pixels * 8,
                         follow_links=False)
        prepared = prepare_bytes(item.name, data, time.perf_counter(), max_pixels=self.s.max_pixels)
        if self._classifier is None:
            self._classifier = load_classifier(self.s.model)
        [result] = classify_batch(self._classifier, [prepared], low_confidence=self.s.review_threshold,
                                  expect=self.s.expect, length=self.s.length)
        out = {"text": result.text, "digits": [{"digit": int(d), "confidence": round(float(c), 4)}
                                               for d, c in result.digits], "error": result.error}
        self._readings[item.id] = out
        while len(self._readings) > IMAGE_CACHE:
            self._readings.popitem(last=False)
        return out

    def _crop(self, item: Item, data: bytes) -> bytes:
        prepared = prepare_bytes(item.name, data, time.perf_counter(), max_pixels=self.s.max_pixels)
        if prepared.candidates is None or not len(prepared.candidates.crops):
            raise ImageError(prepared.error or "nothing to show")
        ink = side_by_side(prepared.candidates.crops)  # high = ink, 0..1
        big = cv2.resize(1.0 - ink, None, fx=CROP_SCALE, fy=CROP_SCALE, interpolation=cv2.INTER_NEAREST)
        return _png((np.clip(big, 0, 1) * 255).astype(np.uint8))

    def _page(self, data: bytes) -> bytes:
        gray = decode_gray(data, max_pixels=self.s.max_pixels)  # refuses a page over the pixel limit unread
        h, w = gray.shape[:2]
        scale = min(1.0, PAGE_SIDE / max(h, w))
        if scale < 1.0:
            gray = cv2.resize(gray, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
        if gray.dtype != np.uint8:  # float32 in [0, 1] (16-bit or with alpha)
            gray = (np.clip(gray, 0, 1) * 255).astype(np.uint8)
        return _png(gray)


def _png(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", image)
    if not ok:
        raise ImageError("could not encode the image")
    return buf.tobytes()


def _json(data: Any, status: int = 200) -> JSONResponse:
    return JSONResponse(data, status_code=status, headers=SECURITY_HEADERS)


def create_app(station: Station) -> Starlette:
    """The application: routes over one Station."""

    def guard(request: Request) -> Response | None:
        if not station.authorized(request):
            return _json({"error": "a token is required (/login?token=...)"}, 401)
        return None

    def page(request: Request) -> Response:
        if (denied := guard(request)) is not None:
            return denied
        html = importlib.resources.files("digitwatch.review").joinpath("static/review.html").read_text()
        html = html.replace("{{csrf}}", station.csrf)
        return Response(html, media_type="text/html; charset=utf-8", headers=SECURITY_HEADERS)

    def static(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in STATIC:  # a fixed list: no path is ever built from a request
            return PlainTextResponse("not found", 404, headers=SECURITY_HEADERS)
        body = importlib.resources.files("digitwatch.review").joinpath(f"static/{name}").read_bytes()
        return Response(body, media_type=STATIC[name], headers=SECURITY_HEADERS)

    def login(request: Request) -> Response:
        given = request.query_params.get("token", "")
        if not station.token or not hmac.compare_digest(given.encode(), station.token.encode()):
            return _json({"error": "wrong token"}, 401)
        response = RedirectResponse("/", 303, headers=SECURITY_HEADERS)
        response.set_cookie(TOKEN_COOKIE, given, httponly=True, samesite="strict")
        return response

    def queue(request: Request) -> Response:
        if (denied := guard(request)) is not None:
            return denied
        items = station.queue.items()
        now = time.time()
        return _json({"items": [i.public(now) for i in items], **summary(items, now)})

    def image(request: Request) -> Response:
        if (denied := guard(request)) is not None:
            return denied
        kind = request.path_params["kind"]
        item = station.queue.find(request.path_params["id"]) if kind in ("crop", "page") else None
        if item is None:
            return _json({"error": "no such item in the queue"}, 404)
        try:
            png = station.image(item, kind)
        except (ImageError, OSError) as exc:
            return _json({"error": str(exc).splitlines()[0][:200]}, 422)
        return Response(png, media_type="image/png", headers=SECURITY_HEADERS)

    def reading(request: Request) -> Response:
        if (denied := guard(request)) is not None:
            return denied
        item = station.queue.find(request.path_params["id"])
        if item is None:
            return _json({"error": "no such item in the queue"}, 404)
        try:
            return _json(station.reading(item))
        except (ImageError, OSError) as exc:
            return _json({"error": str(exc).splitlines()[0][:200]}, 422)

    async def decision(request: Request) -> Response:
        if (denied := guard(request)) is not None:
            return denied
        if not hmac.compare_digest(request.headers.get("x-csrf-token", "").encode(), station.csrf.encode()):
            return _json({"error": "missing or wrong CSRF token"}, 403)
        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise ValueError("not an object")
        except ValueError:
            return _json({"error": "the body must be a JSON object"}, 400)
        started = time.perf_counter()
        try:
            answer = None if body.get("unreadable") is True else clean_answer(str(body.get("text", "")))
            reviewer = clean_reviewer(body.get("reviewer") if isinstance(body.get("reviewer"), str) else None)
        except DecisionError as exc:
            return _json({"error": str(exc)}, 400)
        item = station.queue.find(request.path_params["id"])
        if item is None:
            return _json({"status": "already decided", "error": "this file is no longer in the queue"}, 409)
        import anyio.to_thread  # starlette's own dependency: the commit syncs files, off the event loop

        try:
            outcome = await anyio.to_thread.run_sync(station.decider.decide, item, answer, reviewer)
        except OSError as exc:
            return _json({"error": f"not committed yet: {exc}"}, 503)
        station.latency_ms.append((time.perf_counter() - started) * 1000)
        if outcome.outcome == "already":
            return _json({"status": "already decided", "error": "someone decided this file first"}, 409)
        return _json({"status": "decided", "text": answer or "", "unreadable": answer is None})

    def metrics(request: Request) -> Response:
        if (denied := guard(request)) is not None:
            return denied
        items = station.queue.items()
        s = summary(items)
        lines = [
            "# HELP digitwatch_review_queue_length Files waiting in review/",
            "# TYPE digitwatch_review_queue_length gauge",
            f"digitwatch_review_queue_length {s['left']}",
            "# HELP digitwatch_review_oldest_age_seconds Age of the oldest file waiting",
            "# TYPE digitwatch_review_oldest_age_seconds gauge",
            f"digitwatch_review_oldest_age_seconds {s['oldest_age_s']}",
            "# HELP digitwatch_review_decisions_total Decisions committed by this server, by kind",
            "# TYPE digitwatch_review_decisions_total counter",
        ]
        lines += [f'digitwatch_review_decisions_total{{kind="{k}"}} {v}' for k, v in station.decider.counts.items()]
        recent = sorted(station.latency_ms[-LATENCY_WINDOW:])
        if recent:
            lines += ["# HELP digitwatch_review_decision_seconds Time to commit a decision (the last "
                      f"{LATENCY_WINDOW})", "# TYPE digitwatch_review_decision_seconds summary"]
            for q in (0.5, 0.99):
                value = recent[min(len(recent) - 1, int(q * len(recent)))] / 1000
                lines.append(f'digitwatch_review_decision_seconds{{quantile="{q}"}} {value:.6f}')
            lines.append(f"digitwatch_review_decision_seconds_count {len(station.latency_ms)}")
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4",
                                 headers=SECURITY_HEADERS)

    routes = [
        Route("/", page), Route("/login", login), Route("/static/{name}", static), Route("/metrics", metrics),
        Route("/api/queue", queue), Route("/api/items/{id}/{kind}.png", image),
        Route("/api/items/{id}/reading.json", reading),
        Route("/api/items/{id}/decision", decision, methods=["POST"]),
    ]
    return Starlette(routes=routes)
