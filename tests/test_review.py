"""The review station for real: a queue filled by `digitwatch watch --once`,
the server as a subprocess, its page in headless Chromium (Debian's package,
driven by Playwright), decisions checked in the results file and the folders."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import ROOT, SCAN_FIXTURES, label_of

pytestmark = pytest.mark.system

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
FIXTURES = sorted(SCAN_FIXTURES.glob("*.png"))


def expect(locator):
    from playwright.sync_api import expect as _expect

    return _expect(locator)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Site:
    """A queue and its folders, and the review servers started on them."""

    def __init__(self, base: Path) -> None:
        self.base = base
        for d in ("inbox", "processed", "failed", "review"):
            (base / d).mkdir(parents=True, exist_ok=True)
        self.results = base / "results.csv"
        self.port = _free_port()
        self.config = base / "digitwatch.toml"
        self.config.write_text(
            "[digitwatch]\n" + "".join(f'{k} = "{base / k}"\n' for k in ("inbox", "processed", "failed", "review"))
            + f'results = "{self.results}"\nreview_port = {self.port}\n')
        self.servers: list[subprocess.Popen] = []

    def fill(self, files: dict[str, bytes]) -> None:
        """Drop files and let the real daemon route every one to review/ (threshold 1)."""
        for name, data in files.items():
            with open(os.path.join(os.fsencode(self.base / "inbox"), os.fsencode(name)), "wb") as fh:
                fh.write(data)
        r = subprocess.run([sys.executable, "-m", "digitwatch", "watch", "--once", "--config", str(self.config),
                            "--review-threshold", "1.0", "--log-format", "json"],
                           capture_output=True, text=True, timeout=600, cwd=ROOT)
        assert r.returncode == 0, r.stderr[-2000:]

    def start(self, env: dict | None = None, port: int | None = None) -> subprocess.Popen:
        log = (self.base / f"server-{len(self.servers)}.log").open("wb")
        p = subprocess.Popen([sys.executable, "-m", "digitwatch", "review", "--config", str(self.config),
                              "--port", str(port or self.port)], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                             env={**os.environ, **(env or {})})
        self.servers.append(p)
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port or self.port}/api/queue", timeout=2).read()
                return p
            except OSError:
                assert p.poll() is None, (self.base / f"server-{len(self.servers) - 1}.log").read_text()[-2000:]
                assert time.monotonic() < deadline, "the review server did not start"
                time.sleep(0.1)

    def stop(self) -> None:
        for p in self.servers:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(20)
            if p.poll() is None:
                p.kill()
                p.wait()

    def queue(self, port: int | None = None) -> dict:
        return json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port or self.port}/api/queue").read())

    def lines(self) -> list[dict]:
        if not self.results.exists():
            return []
        with open(self.results, newline="") as fh:
            return list(csv.DictReader(fh))

    def reviewed(self) -> list[dict]:
        return [r for r in self.lines() if r["status"] == "reviewed"]

    def waiting(self) -> list[Path]:
        return [p for p in (self.base / "review").rglob("*") if p.is_file() and ".digitwatch" not in p.parts]


@pytest.fixture
def site(tmp_path):
    s = Site(tmp_path)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (apt-get install chromium; .ci/run does)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


def _open(browser, site: Site, port: int | None = None, size=(1366, 768)):
    page = browser.new_page(viewport={"width": size[0], "height": size[1]})
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    external: list[str] = []
    page.on("request", lambda r: None if r.url.startswith(f"http://127.0.0.1:{port or site.port}/")
            else external.append(r.url))
    page.goto(f"http://127.0.0.1:{port or site.port}/")
    page.wait_for_selector(".item, #empty:not([hidden])")
    page.dialogs, page.external = dialogs, external
    return page


def _labelled(n: int) -> dict[str, bytes]:
    """n scans with their digit in the name (fixture-<label>.png)."""
    return {f"{i:03d}-{FIXTURES[i % len(FIXTURES)].name}": FIXTURES[i % len(FIXTURES)].read_bytes() for i in range(n)}


def _operate(page, site: Site, truth) -> dict:
    """A scripted operator: on each screen (the focused group), correct what is
    wrong by keys alone, then Enter. Returns keys pressed and items decided."""
    keys = 0
    decided = 0
    for _ in range(200):
        items = page.locator(".item").all()
        if not items:
            break
        current = page.locator(".item.current").all()
        n = len(current)
        at = 0  # the focus starts on the group's first item
        for k, el in enumerate(current):
            name = el.locator(".meta").inner_text().split(" · ")[0]
            want = truth(name)
            shown = el.locator(".answer").inner_text()
            if shown != want:
                for _ in range(k - at):
                    page.keyboard.press("ArrowRight")
                    keys += 1
                at = k
                for ch in want:
                    page.keyboard.press(ch)
                    keys += 1
                assert el.locator(".answer").inner_text() == want
        page.keyboard.press("Enter")
        keys += 1
        decided += n
        # The page's CSP forbids eval, so waits go through locators, not wait_for_function.
        expect(page.locator(".item")).to_have_count(len(items) - n, timeout=60000)
    return {"keys": keys, "decided": decided}


def test_two_hundred_items_reviewed_by_keys_alone(site, browser):
    files = _labelled(200)
    site.fill(files)
    assert len(site.waiting()) == 200
    site.start()
    page = _open(browser, site)
    shown = set(page.locator(".item .meta").all_inner_texts())
    assert all(any(t.startswith(name) for t in shown) for name in files)  # every queued file's name
    assert page.locator("#left").inner_text() == "200"
    stats = _operate(page, site, lambda name: str(label_of(Path(name))))
    assert stats["decided"] == 200
    reviewed = site.reviewed()
    assert len(reviewed) == 200 and len({r["file"] for r in reviewed}) == 200
    assert all(r["text"] == str(label_of(Path(r["file"]))) for r in reviewed)
    machine = {r["sha256"]: r for r in site.lines() if r["status"] != "reviewed"}
    assert all(r["sha256"] in machine for r in reviewed)  # each reviewed line links to the machine's
    assert site.waiting() == []
    assert len([p for p in (site.base / "processed").rglob("*.png")]) == 200
    assert not page.dialogs and not page.external
    from digitwatch.training import corrections

    kept = corrections.load(site.base / "corrections")  # what the model saw, with the answers
    assert kept.decisions == 200  # one card per decision, even for files of the same content
    # Usable as examples: a decision whose candidates match its answer's digits
    # (182 of these 200 here; the rest were cut into another count of pieces).
    assert kept.unusable <= 40 and len(kept.x_train) + len(kept.x_held) >= 160


def test_two_browsers_race_for_one_item_and_one_wins(site, browser):
    site.fill(_labelled(1))
    site.start()
    a, b = _open(browser, site), _open(browser, site)
    a.keyboard.press("7")
    b.keyboard.press("3")
    a.keyboard.press("Enter")
    b.keyboard.press("Enter")
    expect(b.locator("#message")).to_contain_text("decided", timeout=60000)
    expect(a.locator("#message")).to_contain_text("decided", timeout=60000)
    messages = a.locator("#message").inner_text() + " | " + b.locator("#message").inner_text()
    assert "already decided by someone else" in messages, messages
    [line] = site.reviewed()
    assert line["text"] in ("7", "3")


def test_two_servers_on_one_queue_never_both_decide(site):
    site.fill(_labelled(1))
    site.start()
    other = _free_port()
    site.start(port=other)
    [item] = site.queue()["items"]
    [same] = site.queue(other)["items"]
    outcomes = []
    for port, q in ((site.port, item), (other, same)):
        html = urllib.request.urlopen(f"http://127.0.0.1:{port}/").read().decode()
        csrf = html.split('name="csrf-token" content="')[1].split('"')[0]
        req = urllib.request.Request(f"http://127.0.0.1:{port}/api/items/{q['id']}/decision", method="POST",
                                     data=json.dumps({"text": "5", "reviewer": f"r{port}"}).encode(),
                                     headers={"Content-Type": "application/json", "X-CSRF-Token": csrf})
        try:
            outcomes.append(json.loads(urllib.request.urlopen(req).read())["status"])
        except urllib.error.HTTPError as exc:
            outcomes.append(json.loads(exc.read())["status"])
    assert sorted(outcomes) == ["already decided", "decided"]
    assert len(site.reviewed()) == 1


@pytest.mark.parametrize("step", ["claimed", "journaled", "placed", "reported", "released"])
def test_a_server_killed_mid_decision_is_finished_by_the_next(site, browser, step):
    site.fill(_labelled(1))
    killed = site.start(env={"DIGITWATCH_CRASH_AT": f"{step}:1"})
    page = _open(browser, site)
    page.keyboard.press("8")
    page.keyboard.press("Enter")
    killed.wait(30)
    assert killed.returncode == -signal.SIGKILL
    site.start()  # recovery at start
    deadline = time.monotonic() + 30
    while site.waiting() and step != "claimed" and time.monotonic() < deadline:
        time.sleep(0.1)
    reviewed = site.reviewed()
    if step == "claimed":
        # Taken but not journaled: back in the queue, decided by nobody.
        assert reviewed == [] and len(site.waiting()) == 1 and len(site.queue()["items"]) == 1
    else:
        assert [r["text"] for r in reviewed] == ["8"]
        assert site.waiting() == [] and len(list((site.base / "processed").rglob("*.png"))) == 1


def test_a_hostile_queue_is_shown_safely(site, browser):
    site.fill(_labelled(2))
    day = next(p for p in (site.base / "review").iterdir() if not p.name.startswith("."))
    # A name cannot hold "/": the closing tag is written as a file name can hold it.
    hostile = ["<script>alert(1)<\\script>.png", "<img src=x onerror=alert(2)>.png"]
    for name in hostile:
        (day / name).write_bytes(FIXTURES[0].read_bytes())
    (day / "link.png").symlink_to(site.base / "results.csv")
    raw = os.path.join(os.fsencode(day), b"bad-\xff\xfe.png")
    with open(raw, "wb") as fh:
        fh.write(FIXTURES[1].read_bytes())
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    huge = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 9000, 9000, 8, 0, 0, 0, 0)) \
        + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b"")
    (day / "huge-81mpx.png").write_bytes(huge)
    site.start()
    page = _open(browser, site)
    names = " ".join(page.locator(".item .meta").all_inner_texts())
    assert all(name in names for name in hostile)  # shown as text, never run
    assert "bad-\\xff\\xfe.png" in names
    assert "link.png" not in names
    assert page.dialogs == [] and not page.external
    q = site.queue()
    huge_id = next(i["id"] for i in q["items"] if i["name"] == "huge-81mpx.png")
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(f"http://127.0.0.1:{site.port}/api/items/{huge_id}/page.png", timeout=10)
    assert exc.value.code == 422  # refused from the header, never decoded
    page.keyboard.press("x")  # the first item unreadable, then the rest of its group confirmed
    page.keyboard.press("Enter")
    expect(page.locator("#message")).to_contain_text("decided", timeout=60000)
    assert site.reviewed()
    assert (site.base / "results.csv").is_file() and not (site.base / "results.csv").is_symlink()
    assert (day / "link.png").is_symlink()  # never served, never moved


def test_binding_beyond_loopback_needs_a_token(site):
    r = subprocess.run([sys.executable, "-m", "digitwatch", "review", "--config", str(site.config),
                        "--bind", "0.0.0.0"], capture_output=True, text=True, timeout=60, cwd=ROOT,
                       env={k: v for k, v in os.environ.items() if k != "DIGITWATCH_REVIEW_TOKEN"})
    assert r.returncode == 78
    assert len(r.stderr.strip().splitlines()) == 1 and "token" in r.stderr


def test_with_a_token_every_request_needs_it(site):
    site.fill(_labelled(1))
    token = "t" * 32
    p = subprocess.Popen([sys.executable, "-m", "digitwatch", "review", "--config", str(site.config)],
                         cwd=ROOT, env={**os.environ, "DIGITWATCH_REVIEW_TOKEN": token},
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    site.servers.append(p)
    url = f"http://127.0.0.1:{site.port}/api/queue"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            raise AssertionError("served without the token")
        except urllib.error.HTTPError as exc:
            assert exc.code == 401
            break
        except OSError:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    assert json.loads(urllib.request.urlopen(req).read())["left"] == 1


def test_the_page_fits_a_phone(site, browser):
    site.fill(_labelled(4))
    site.start()
    page = _open(browser, site, size=(390, 844))
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, width
    assert page.locator("#pageview").is_hidden()  # the whole page only on demand
    page.keyboard.press("p")
    expect(page.locator("#pageview")).to_be_visible()
    page.keyboard.press("Escape")
    expect(page.locator("#pageview")).to_be_hidden()
    assert page.locator(".item img").first.evaluate("img => img.complete && img.naturalWidth > 0")
    # The results file is CSV (no per-digit confidences): the page asks the server for them.
    expect(page.locator(".item .conf").first).to_contain_text(":", timeout=30000)
    page.screenshot(path=str(site.base / "phone.png"))
