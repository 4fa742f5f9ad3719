"""A scripted operator clearing the review queue in headless Chromium.

    python -m tests.bench.review_operator [--items 500] [--screenshots docs/images]

The queue is filled by the real daemon (`watch --once`, review threshold 1:
every file goes to review/); half the files the operator finds read right,
half it corrects (a different digit). It works by keys alone, screen by
screen (one group of the same proposed reading), and the bench reports keys
and seconds of UI time per item, those for items read right apart (each
group's Enter shared by its items), and the server's decision latency
(p50/p99, from the browser's own request timing). Nothing may be lost: every
file ends with one reviewed line and one placed copy."""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import zlib
from pathlib import Path

from tests.conftest import label_of
from tests.test_review import CHROMIUM, CHROMIUM_ARGS, FIXTURES, Site


def truth_for(name: str) -> str:
    """Half the files read right (their label), half 'read wrong' (the next digit)."""
    label = label_of(Path(name))
    return str(label if zlib.crc32(name.encode()) % 2 == 0 else (label + 1) % 10)


def run(items: int, screenshots: Path | None) -> dict:
    from playwright.sync_api import expect, sync_playwright

    base = Path(tempfile.mkdtemp(prefix="digitwatch-review-bench-"))
    site = Site(base)
    site.fill({f"{i:04d}-{FIXTURES[i % len(FIXTURES)].name}": FIXTURES[i % len(FIXTURES)].read_bytes()
               for i in range(items)})
    site.start()
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            if screenshots is not None:
                screenshots.mkdir(parents=True, exist_ok=True)
                for size, name in (((1366, 768), "review-desktop.png"), ((390, 844), "review-phone.png")):
                    shot = browser.new_page(viewport={"width": size[0], "height": size[1]})
                    shot.goto(f"http://127.0.0.1:{site.port}/")
                    shot.wait_for_selector(".item")
                    expect(shot.locator(".item .conf").first).to_contain_text(":", timeout=30000)
                    shot.keyboard.press("ArrowRight")
                    shot.keyboard.press("4")
                    for _ in range(300):  # the crops are drawn by the server: wait for the first rows
                        loaded = shot.evaluate("[...document.querySelectorAll('.item img')].slice(0, 12)"
                                               ".every(i => i.complete && i.naturalWidth > 0)")
                        if loaded:
                            break
                        shot.wait_for_timeout(100)
                    shot.screenshot(path=str(screenshots / name))
                    shot.close()
            page = browser.new_page(viewport={"width": 1366, "height": 768})
            page.goto(f"http://127.0.0.1:{site.port}/")
            page.wait_for_selector(".item")
            keys = enters = 0
            right_share = 0.0  # Enter presses apportioned to items read right
            right_items = 0
            started = time.perf_counter()
            right_seconds = 0.0  # each screen's time apportioned like its Enter
            while page.locator(".item").count():
                screen_started = time.perf_counter()
                left = int(page.locator("#left").inner_text())
                current = page.locator(".item.current").all()
                at = 0
                right_here = 0
                for k, el in enumerate(current):
                    name = el.locator(".meta").inner_text().split(" · ")[0]
                    want = truth_for(name)
                    if el.locator(".answer").inner_text() == want:
                        right_here += 1
                        continue
                    for _ in range(k - at):
                        page.keyboard.press("ArrowRight")
                        keys += 1
                    at = k
                    for ch in want:
                        page.keyboard.press(ch)
                        keys += 1
                page.keyboard.press("Enter")
                keys += 1
                enters += 1
                right_share += right_here / len(current)
                right_items += right_here
                # The page shows at most 300 files; the count of what is left is the whole queue.
                expect(page.locator("#left")).to_have_text(str(left - len(current)), timeout=120000)
                right_seconds += (time.perf_counter() - screen_started) * right_here / len(current)
            ui_seconds = time.perf_counter() - started
            browser.close()
        import urllib.request

        text = urllib.request.urlopen(f"http://127.0.0.1:{site.port}/metrics").read().decode()
        quantiles = {line.split('"')[1]: float(line.split()[-1]) * 1000 for line in text.splitlines()
                     if line.startswith("digitwatch_review_decision_seconds{")}
        reviewed = site.reviewed()
        lost = items - len({r["file"] for r in reviewed})
        wrong = sum(r["text"] != truth_for(r["file"]) for r in reviewed)
        return {
            "items": items, "reviewed_lines": len(reviewed), "lost": lost, "wrong_answers": wrong,
            "left_in_review": len(site.waiting()), "keys": keys, "screens": enters,
            "keys_per_item": keys / items, "seconds_per_item": ui_seconds / items,
            "items_read_right": right_items,
            "keys_per_item_read_right": right_share / max(right_items, 1),
            "seconds_per_item_read_right": right_seconds / max(right_items, 1),
            "server_decision_ms_p50": quantiles.get("0.5"),
            "server_decision_ms_p99": quantiles.get("0.99"),
        }
    finally:
        site.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=500)
    ap.add_argument("--screenshots", type=Path, help="also write the page's screenshots here")
    args = ap.parse_args()
    print(json.dumps(run(args.items, args.screenshots), indent=2))


if __name__ == "__main__":
    main()
