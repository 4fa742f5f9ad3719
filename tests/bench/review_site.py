"""A simulated site whose writing the models do not know, reviewed and learnt from.

    python -m tests.bench.review_site --data DIR --work runs/site [--font FILE] [--reviewed 300] [--next 1000]

The site writes its digits in a font no model here was trained on: a
handwriting font from a registry package (`--font`, a .ttf/.woff file, e.g.
`npm pack @fontsource/patrick-hand`: files/patrick-hand-latin-400-normal.woff;
never one of the nine families reserved for evaluation), or by default
OpenCV's held-out Hershey face (synth.HELD_OUT_FACE), on realistic pages. Its scans are
read with the shipped models until `--reviewed` of them were not ok (what a
review queue would hold); a person's answers (the true digits) go into a
corrections folder exactly as the review station writes them. The digit model
is fine-tuned on them mixed with MNIST (`digitwatch train --init ...
--corrections ...`), the answer map refitted (`--step answers`), and the
site's next `--next` scans are read before and after: how many are ok, and
how many of the ok ones are right. MNIST test is reported before and after
(nothing forgotten)."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from digitwatch.reader.model import load_classifier
from digitwatch.reader.prepare import classify_batch, prepare_bytes
from digitwatch.training import evaluation, synth
from tests.conftest import MODELS, ROOT

BATCH = 64


FONT_PX = 96  # glyphs drawn this tall, then scaled onto the page like every other source


def font_ink(digit: str, font_path: Path) -> np.ndarray:
    """A digit in a TrueType/WOFF font, as ink (high = ink), cropped to its box."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(str(font_path), FONT_PX)
    canvas = Image.new("L", (FONT_PX * 2, FONT_PX * 2), 0)
    ImageDraw.Draw(canvas).text((FONT_PX // 3, FONT_PX // 8), digit, font=font, fill=255)
    ink = np.asarray(canvas, np.float32) / 255.0
    ys, xs = np.nonzero(ink > 0.05)
    return ink[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]


def site_scans(count: int, rng: np.random.Generator, start: int, font: Path | None) -> list[tuple[bytes, str]]:
    out = []
    for i in range(count):
        d = str(int(rng.integers(10)))
        ink = font_ink(d, font) if font is not None else synth.glyph_ink(d, synth.HELD_OUT_FACE, rng)
        out.append((evaluation.page_png(ink, rng, start + i, "site"), d))
    return out


def read(card: Path, scans: list[tuple[bytes, str]]) -> list:
    classifier = load_classifier(card)
    prepared = [prepare_bytes(f"s{i}.png", png, time.perf_counter(), max_pixels=40_000_000)
                for i, (png, _) in enumerate(scans)]
    results = []
    for i in range(0, len(prepared), BATCH):
        results += classify_batch(classifier, prepared[i : i + BATCH], low_confidence=None)
    return list(zip(prepared, results, [t for _, t in scans], strict=True))


def score(rows: list) -> dict:
    n = len(rows)
    ok = [(r, t) for _, r, t in rows if r.status == "ok"]
    return {"scans": n, "read_right": sum(r.text == t for _, r, t in rows) / n, "marked_ok": len(ok) / n,
            "ok_right": sum(r.text == t for r, t in ok) / len(ok) if ok else 1.0}


def keep_corrections(rows: list, folder: Path) -> int:
    """What the review station writes for each decision: the inputs and a card."""
    folder.mkdir(parents=True, exist_ok=True)
    kept = 0
    for prepared, result, truth in rows:
        if prepared.candidates is None:
            continue
        stem = folder / prepared.sha256[:32]
        np.save(stem.with_suffix(".npy"), prepared.candidates.crops.astype(np.float32), allow_pickle=False)
        stem.with_suffix(".json").write_text(json.dumps({
            "sha256": prepared.sha256, "label": truth, "unreadable": False,
            "machine": {"text": result.text, "status": result.status, "reason": result.reason},
            "inputs": stem.with_suffix(".npy").name, "reviewer": "simulated"}) + "\n")
        kept += 1
    return kept


def run(args: argparse.Namespace) -> dict:
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    shipped = MODELS / "digits-reject.json"
    rng = np.random.default_rng(args.seed)
    reviewed: list = []
    made = 0
    while len(reviewed) < args.reviewed and made < args.max_scans:
        rows = read(shipped, site_scans(500, rng, made, args.font))
        made += 500
        reviewed += [row for row in rows if row[1].status != "ok"]
    reviewed = reviewed[: args.reviewed]
    nxt = site_scans(args.next, np.random.default_rng(args.seed + 1), 10_000_000, args.font)
    before = score(read(shipped, nxt))
    kept = keep_corrections(reviewed, work / "corrections")
    models = work / "models"
    if models.exists():
        shutil.rmtree(models)
    models.mkdir()
    for f in MODELS.iterdir():
        if f.suffix in (".json", ".tflite") and not f.name.startswith("digits."):
            shutil.copy(f, models / f.name)
    train = [sys.executable, "-m", "digitwatch", "train", "--data", str(args.data), "--arch", "cnn",
             "--epochs", str(args.epochs), "--members", "4", "--width", "24", "--low-res", "30000",
             "--init", str(MODELS / "digits.keras"), "--corrections", str(work / "corrections"),
             "--corrections-repeat", str(args.repeat), "--fine-tune-rate", str(args.rate),
             "--out", str(models / "digits.keras")]
    t0 = time.monotonic()
    subprocess.run(train, check=True, cwd=ROOT)
    answers = [sys.executable, "-m", "digitwatch", "train", "--step", "answers", "--data", str(args.data),
               "--model", str(models / "digits-reject.json"), "--singles", "1200", "--numbers", "500",
               "--non-digits", "500", "--wrong-number-ok", "0.01", "--non-digit-ok", "0.02", "--write"]
    subprocess.run(answers, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    seconds = time.monotonic() - t0
    after = score(read(models / "digits-reject.json", nxt))
    card = json.loads((models / "digits.json").read_text())
    shipped_card = json.loads((MODELS / "digits.json").read_text())
    site = f"font {args.font.name}" if args.font else "held-out Hershey face (script complex)"
    return {"site": f"{site}, realistic pages", "scans_read_to_fill_review": made,
            "reviewed": len(reviewed), "corrections_kept": kept, "next": before | {"when": "before"},
            "next_after": after, "mnist_test_tflite": {"before": shipped_card["test_accuracy"]["tflite"],
                                                        "after": card["test_accuracy"]["tflite"]},
            "fine_tune_and_refit_seconds": round(seconds), "commands": [" ".join(train), " ".join(answers)]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("runs/site"))
    ap.add_argument("--reviewed", type=int, default=300)
    ap.add_argument("--next", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=20, help="how many times over the corrections are seen")
    ap.add_argument("--rate", type=float, default=0.25, help="the fine-tune's share of the peak learning rate")
    ap.add_argument("--seed", type=int, default=77)
    ap.add_argument("--font", type=Path, help="a .ttf/.woff handwriting font the site writes in")
    ap.add_argument("--max-scans", type=int, default=20_000)
    print(json.dumps(run(ap.parse_args()), indent=2))


if __name__ == "__main__":
    main()
