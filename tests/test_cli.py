"""`digitwatch classify`, `evaluate` and `check-config` through the real entry point."""

from __future__ import annotations

import csv
import io
import json
import sys

import cv2

from tests.conftest import ROOT, SCAN_FIXTURES, label_of, run_cli

MNIST_SCANS = sorted(SCAN_FIXTURES.glob("mnist-*.png"))


class TestClassify:
    """Records, formats and exit codes."""

    def test_jsonl_on_a_folder(self):
        r = run_cli("classify", str(SCAN_FIXTURES), "--format", "jsonl")
        assert r.returncode == 0, r.stderr
        rows = [json.loads(line) for line in r.stdout.splitlines()]
        assert len(rows) == len(list(SCAN_FIXTURES.glob("*.png")))
        for row in rows:
            assert set(row) == {"file", "digit", "confidence", "status", "error", "sha256",
                                "width", "height", "model", "latency_ms", "text", "reason", "digits"}
            assert row["status"] in ("ok", "low_confidence")

    def test_csv_single_file(self):
        f = MNIST_SCANS[0]
        r = run_cli("classify", str(f), "--format", "csv")
        assert r.returncode == 0, r.stderr
        rows = list(csv.DictReader(io.StringIO(r.stdout)))
        assert len(rows) == 1 and int(rows[0]["digit"]) == label_of(f)
        assert rows[0]["model"].startswith("digits.tflite@")

    def test_table_is_default(self):
        r = run_cli("classify", str(MNIST_SCANS[0]))
        assert r.returncode == 0
        assert r.stdout.splitlines()[0].split()[:4] == ["file", "digit", "conf", "status"]

    def test_bad_files_exit_1_with_one_line_each(self, tmp_path):
        (tmp_path / "empty.png").write_bytes(b"")
        (tmp_path / "text.png").write_text("hello")
        r = run_cli("classify", str(tmp_path / "empty.png"), str(tmp_path / "text.png"),
                    str(MNIST_SCANS[0]), str(tmp_path / "missing.png"), "--format", "jsonl")
        assert r.returncode == 1
        rows = [json.loads(line) for line in r.stdout.splitlines()]
        assert [x["status"] for x in rows] == ["error", "error", "ok", "error"]
        errors = r.stderr.strip().splitlines()
        assert len(errors) == 3 and all(e.startswith("digitwatch: ") for e in errors)

    def test_usage_error_exit_2(self):
        assert run_cli("classify", "--format", "xml", "x.png").returncode == 2
        assert run_cli("classify").returncode == 2

    def test_missing_model_exit_2(self, tmp_path):
        r = run_cli("classify", str(MNIST_SCANS[0]), "--model", str(tmp_path / "none.tflite"))
        assert r.returncode == 2 and "model file not found" in r.stderr

    def test_debug_dir_writes_what_the_model_saw(self, tmp_path):
        r = run_cli("classify", *map(str, MNIST_SCANS[:3]), "--debug-dir", str(tmp_path / "dbg"))
        assert r.returncode == 0
        written = sorted((tmp_path / "dbg").glob("*.png"))
        assert len(written) == 3
        assert cv2.imread(str(written[0]), cv2.IMREAD_UNCHANGED).shape == (28, 28)

    def test_never_imports_tensorflow(self):
        code = (
            "import sys, runpy\n"
            f"sys.argv = ['digitwatch', 'classify', {str(MNIST_SCANS[0])!r}]\n"
            "try:\n    runpy.run_module('digitwatch.cli', run_name='__main__')\n"
            "except SystemExit as e:\n    assert e.code == 0, e.code\n"
            "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'\n"
            "assert 'keras' not in sys.modules\nprint('clean')\n"
        )
        import subprocess

        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                           timeout=60)
        assert r.returncode == 0 and "clean" in r.stdout, r.stderr

    def test_keras_model_still_works(self):
        r = run_cli("classify", str(MNIST_SCANS[0]), "--model", str(ROOT / "models" / "digits.keras"),
                    "--format", "jsonl", timeout=180)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["digit"] == label_of(MNIST_SCANS[0])


class TestEvaluate:
    """The shipped model on MNIST's test set."""

    def test_json_report(self, mnist_dir, tmp_path):
        r = run_cli("evaluate", "--data", str(mnist_dir), "--format", "json",
                    "--report", str(tmp_path / "rep"), "--numbers", "0", "--non-digits", "0")
        assert r.returncode == 0, r.stderr
        report = json.loads(r.stdout)
        assert report["count"] == 10000
        assert report["accuracy"] >= 0.996
        assert len(report["confusion"]) == 10 and sum(map(sum, report["confusion"])) == 10000
        assert {c["digit"] for c in report["per_class"]} == set(range(10))
        assert (tmp_path / "rep" / "confusion.png").stat().st_size > 1000
        assert cv2.imread(str(tmp_path / "rep" / "worst_errors.png")) is not None


class TestCheckConfig:
    """Validation and effective settings."""

    def test_prints_effective_settings(self, tmp_path):
        (tmp_path / "in").mkdir()
        toml = tmp_path / "c.toml"
        toml.write_text(f'[digitwatch]\ninbox = "{tmp_path / "in"}"\nbatch_size = 5\n')
        r = run_cli("check-config", "--config", str(toml), "--format", "json",
                    env={"DIGITWATCH_BATCH_WAIT_MS": "7", "PATH": "/usr/bin"})
        assert r.returncode == 0, r.stderr
        values = json.loads(r.stdout)
        assert values["batch_size"] == 5 and values["batch_wait_ms"] == 7.0

    def test_missing_inbox_is_config_error(self, tmp_path):
        r = run_cli("check-config", env={"DIGITWATCH_INBOX": str(tmp_path / "nope"), "PATH": "/usr/bin"})
        assert r.returncode == 78
        assert r.stderr.strip().splitlines()[-1].startswith("digitwatch: error: inbox")
