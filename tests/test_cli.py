"""`digitwatch classify`, `evaluate` and `check-config` through the real entry point."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import pytest
import typer.main
from typer.testing import CliRunner

from digitwatch import __version__
from digitwatch.cli import app
from digitwatch.config import KEYS
from tests.conftest import ROOT, SCAN_FIXTURES, label_of, run_cli
from tests.daemon_harness import MODEL, DaemonProc

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

    @pytest.mark.system
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

    def test_shows_the_worker_limits(self, tmp_path):
        (tmp_path / "in").mkdir()
        toml = tmp_path / "c.toml"
        toml.write_text(f'[digitwatch]\ninbox = "{tmp_path / "in"}"\nworker_timeout_s = 2.5\n')
        r = run_cli("check-config", "--config", str(toml), env={"DIGITWATCH_WORKER_MEMORY_MB": "512",
                                                                "PATH": "/usr/bin"})
        assert r.returncode == 0, r.stderr
        shown = {key: value.strip() for key, _, value in (line.partition(" ") for line in r.stdout.splitlines())}
        assert shown["worker_timeout_s"] == "2.5" and shown["worker_memory_mb"] == "512"

    @pytest.mark.parametrize(("line", "message"), [
        ("worker_timeout_s = nan", "{toml}: worker_timeout_s: expected a finite number, got nan"),
        ("worker_timeout_s = 0", "worker_timeout_s must be positive"),
        ("worker_memory_mb = 0", "worker_memory_mb must be at least 1"),
    ])
    def test_nonsense_worker_limits_exit_78_from_watch(self, tmp_path, line, message):
        (tmp_path / "in").mkdir()
        toml = tmp_path / "c.toml"
        toml.write_text(f'[digitwatch]\ninbox = "{tmp_path / "in"}"\n{line}\n')
        r = run_cli("watch", "--config", str(toml), env={"PATH": "/usr/bin"}, timeout=60)
        assert r.returncode == 78, (r.stdout, r.stderr)
        assert r.stderr.strip().splitlines() == ["digitwatch: error: " + message.format(toml=toml)]
        assert "daemon_started" not in r.stdout

    def test_missing_inbox_is_config_error(self, tmp_path):
        r = run_cli("check-config", env={"DIGITWATCH_INBOX": str(tmp_path / "nope"), "PATH": "/usr/bin"})
        assert r.returncode == 78
        assert r.stderr.strip().splitlines()[-1].startswith("digitwatch: error: inbox")


def command(name: str):
    return typer.main.get_command(app).commands[name]


class TestConventions:
    """What a user expects of any command-line tool."""

    def test_version(self):
        r = run_cli("--version")
        assert r.returncode == 0 and r.stdout == f"digitwatch {__version__}\n"

    def test_python_m_digitwatch(self):
        r = subprocess.run([sys.executable, "-m", "digitwatch", "--help"], capture_output=True, text=True,
                           cwd=ROOT, timeout=60)
        assert r.returncode == 0, r.stderr
        assert "Usage: digitwatch [OPTIONS] COMMAND" in r.stdout
        for name in ("watch", "classify", "check-config", "train", "evaluate"):
            assert name in r.stdout

    @pytest.mark.parametrize("flag", ["-h", "--help"])
    def test_help_on_every_command(self, flag):
        runner = CliRunner()
        names = [None, *typer.main.get_command(app).commands]
        assert {"watch", "classify", "check-config", "train", "evaluate"} <= set(names[1:])
        for name in names:
            r = runner.invoke(app, [name, flag] if name else [flag], prog_name="digitwatch")
            assert r.exit_code == 0, (name, r.output)
            assert "Usage: digitwatch" in r.output

    def test_every_option_of_every_command_has_help(self):
        group = typer.main.get_command(app)
        for name, cmd in [("", group), *group.commands.items()]:
            for param in cmd.params:
                assert getattr(param, "help", None), f"{name} {param.name}"

    def test_show_completion_bash(self):
        r = run_cli("--show-completion", "bash", env={**os.environ, "SHELL": "/bin/bash"})
        assert r.returncode == 0, r.stderr
        assert "_DIGITWATCH_COMPLETE=complete_bash" in r.stdout
        assert "complete -o default -F _digitwatch_completion digitwatch" in r.stdout

    def test_completion_completes(self):
        """What bash runs on <TAB>, through the script the line above installs."""
        env = {**os.environ, "_DIGITWATCH_COMPLETE": "complete_bash", "COMP_WORDS": "digitwatch watch --settle",
               "COMP_CWORD": "2"}
        r = subprocess.run([sys.executable, "-m", "digitwatch"], capture_output=True, text=True, cwd=ROOT,
                           env=env, timeout=60)
        assert r.returncode == 0 and r.stdout.split() == ["--settle-seconds"], r.stdout + r.stderr

    def test_every_watch_option_has_help_and_shows_its_default(self):
        options = [p for p in command("watch").params if p.name != "help"]
        assert {p.name for p in options} >= set(KEYS)  # every setting is a flag
        for p in options:
            assert p.help, p.name
            assert p.show_default, p.name
        # And the real --help shows them (wide, so rich does not wrap).
        r = run_cli("watch", "--help", env={**os.environ, "COLUMNS": "400"})
        assert r.returncode == 0
        for p in options:
            line = next(x for x in r.stdout.splitlines() if f" {p.opts[0]} " in x)
            assert "[default: " in line and p.help.split()[0] in line, line

    @pytest.mark.parametrize("args", [
        ("watch", "--format", "xml"),
        ("classify", "--format", "xml", "x.png"),
        ("watch", "--log-format", "text"),
        ("watch", "--settle-seconds", "nan"),
        ("watch", "--poll-interval", "inf"),
        ("watch", "--stop-timeout", "0"),
        ("watch", "--batch-wait-ms", "-1"),
        ("watch", "--review-threshold", "nan"),
        ("watch", "--batch-size", "abc"),
        ("watch", "--worker-timeout-s", "nan"),
        ("watch", "--worker-timeout-s", "0"),
        ("watch", "--worker-memory-mb", "0"),
    ])
    def test_bad_flag_values_are_usage_errors(self, args):
        r = CliRunner().invoke(app, list(args), prog_name="digitwatch")
        assert r.exit_code == 2, r.output
        assert "Invalid value" in r.output and "Traceback" not in r.output

    def test_bad_format_through_the_entry_point(self):
        for args in (("watch", "--format", "xml"), ("classify", "--format", "xml", "x.png")):
            r = run_cli(*args)
            assert r.returncode == 2 and "Invalid value for '--format'" in r.stderr, r.stderr

    def test_config_errors_in_words(self, tmp_path):
        r = run_cli("check-config", env={"DIGITWATCH_BATCH_SIZE": "abc", "PATH": "/usr/bin"})
        assert r.returncode == 78
        assert r.stderr.strip() == ("digitwatch: error: DIGITWATCH_BATCH_SIZE: batch_size: "
                                    "expected a whole number, got 'abc'")

    def test_error_line_has_error_priority_under_journald(self, tmp_path):
        """The exit-78 line is why a unit failed: `journalctl -p err` must show it."""
        r, w = os.pipe()
        st = os.fstat(w)
        env = {"PATH": "/usr/bin", "PYTHONPATH": str(ROOT), "DIGITWATCH_INBOX": str(tmp_path / "nope"),
               "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        try:
            rc = subprocess.run([sys.executable, "-m", "digitwatch", "check-config"], stdout=subprocess.DEVNULL,
                                stderr=w, env=env, cwd=ROOT, timeout=60).returncode
        finally:
            os.close(w)
        with os.fdopen(r) as fh:
            err = fh.read()
        assert rc == 78
        assert err == f"<3>digitwatch: error: inbox {tmp_path / 'nope'} does not exist\n"
        plain = run_cli("check-config", env={**env, "JOURNAL_STREAM": "1:1"})
        assert plain.stderr == f"digitwatch: error: inbox {tmp_path / 'nope'} does not exist\n"

    def test_unreadable_working_directory_is_one_line(self, tmp_path):
        """`sudo -u digitwatch digitwatch check-config` from a folder that user
        cannot enter; here the folder is gone, which fails getcwd() the same way."""
        gone = tmp_path / "gone"
        gone.mkdir()
        script = f'cd {gone} && rmdir {gone} && exec {sys.executable} -m digitwatch check-config'
        r = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=60,
                           env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
        assert r.returncode == 78
        assert r.stderr.startswith("digitwatch: error: inbox var/inbox is relative, but the working directory "
                                   "cannot be read (No such file or directory)"), r.stderr
        assert len(r.stderr.splitlines()) == 1

    def test_data_error_exit_65(self, tmp_path):
        """65 (EX_DATAERR): a dataset that is missing or not what it claims."""
        r = run_cli("evaluate", "--data", str(tmp_path / "nope"))
        assert r.returncode == 65
        assert r.stderr.strip() == f"digitwatch: error: {tmp_path / 'nope'}: no such MNIST folder or .npz file"


@contextlib.contextmanager
def immutable(path: Path):
    """chattr +i: no new names in the folder, even for root (the tests run as root in CI)."""
    if os.geteuid() != 0:
        pytest.skip("needs root for chattr +i")
    r = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"chattr +i not supported here: {r.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def folders(tmp_path: Path) -> dict[str, str]:
    for name in ("in", "p", "f", "r"):
        (tmp_path / name).mkdir(exist_ok=True)
    return {"PATH": "/usr/bin", "DIGITWATCH_INBOX": str(tmp_path / "in"), "DIGITWATCH_PROCESSED": str(tmp_path / "p"),
            "DIGITWATCH_FAILED": str(tmp_path / "f"), "DIGITWATCH_RESULTS": str(tmp_path / "r" / "results.csv"),
            "DIGITWATCH_MODEL": str(MODEL), "DIGITWATCH_LOG_FORMAT": "json"}


class TestStartupChecks:
    """Misconfiguration that would look healthy is exit 78 with one line naming the path."""

    @pytest.mark.parametrize(("folder", "what"), [
        ("in", "inbox"), ("in/.digitwatch", "claim folder"), ("p", "processed"), ("f", "failed"),
        ("r", "results folder"),
    ])
    def test_unwritable_folder_exit_78(self, tmp_path, folder, what):
        env = folders(tmp_path)
        (tmp_path / folder).mkdir(exist_ok=True)
        with immutable(tmp_path / folder):
            for args in (("watch", "--once"), ("check-config",)):
                r = run_cli(*args, env=env)
                assert r.returncode == 78, (args, r.stdout, r.stderr)
                errors = r.stderr.strip().splitlines()
                assert errors == [f"digitwatch: error: {what} {tmp_path / folder} is not writable "
                                  "(Operation not permitted)"], (args, r.stderr)
                assert "daemon_started" not in r.stdout

    def test_watch_as_a_service_exits_78(self, tmp_path):
        """`watch` without --once, as systemd runs it (RestartPreventExitStatus=78):
        a missing inbox (found by the settings check) and an untrusted claim
        folder (found by the daemon itself, after the model is loaded) each end
        the process with 78 and one line, never a daemon that starts or hangs."""
        env = folders(tmp_path)
        missing = run_cli("watch", env={**env, "DIGITWATCH_INBOX": str(tmp_path / "nope")}, timeout=60)
        assert missing.returncode == 78, (missing.stdout, missing.stderr)
        assert missing.stderr == f"digitwatch: error: inbox {tmp_path / 'nope'} does not exist\n"
        (tmp_path / "in" / ".digitwatch").write_text("planted by an inbox writer")
        planted = run_cli("watch", env=env, timeout=60)
        assert planted.returncode == 78, (planted.stdout, planted.stderr)
        errors = planted.stderr.strip().splitlines()
        assert len(errors) == 1 and errors[0].startswith("digitwatch: error: ") and ".digitwatch" in errors[0]
        assert "daemon_started" not in planted.stdout and "Traceback" not in planted.stderr

    def test_read_only_mount_inbox_exit_78(self, tmp_path):
        """What ProtectSystem=strict does to an inbox outside ReadWritePaths."""
        env = folders(tmp_path)
        inbox = tmp_path / "in"
        if os.geteuid() != 0:
            pytest.skip("needs root to bind-mount")
        r = subprocess.run(["mount", "--bind", "-o", "ro", str(inbox), str(inbox)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot bind-mount read-only here: {r.stderr.strip()}")
        try:
            r = run_cli("watch", "--once", env=env)
        finally:
            subprocess.run(["umount", str(inbox)], check=True)
        assert r.returncode == 78
        assert r.stderr.strip() == f"digitwatch: error: inbox {inbox} is not writable (Read-only file system)"

    def test_unwritable_results_file_exit_78(self, tmp_path):
        env = folders(tmp_path)
        (tmp_path / "r" / "results.csv").write_text("")
        with immutable(tmp_path / "r" / "results.csv"):
            r = run_cli("check-config", env=env)
        assert r.returncode == 78
        assert r.stderr.strip() == (f"digitwatch: error: results {tmp_path / 'r' / 'results.csv'} cannot be "
                                    "appended to (Operation not permitted)")

    def test_outputs_made_at_start(self, tmp_path):
        env = folders(tmp_path)
        env["DIGITWATCH_PROCESSED"] = str(tmp_path / "new" / "processed")
        assert run_cli("check-config", env=env).returncode == 0
        assert not (tmp_path / "new").exists()  # check-config changes nothing
        r = run_cli("watch", "--once", env=env)
        assert r.returncode == 0, r.stderr
        assert (tmp_path / "new" / "processed").is_dir()

    @pytest.mark.system
    def test_results_file_with_header_before_the_first_result(self, tmp_path):
        d = DaemonProc(tmp_path, fmt="csv").start()
        try:
            assert d.results.read_text() == d.results.read_text().splitlines()[0] + "\n"
            assert d.results.read_text().startswith("ts,file,digit,confidence,status,")
        finally:
            assert d.terminate() == 0

    def test_check_config_and_watch_resolve_relative_paths_alike(self, tmp_path):
        """Relative paths (file, environment, flags) resolve against the working
        directory, for check-config as for the service."""
        work = tmp_path / "work"
        (work / "var" / "inbox").mkdir(parents=True)
        toml = tmp_path / "etc" / "d.toml"
        toml.parent.mkdir()
        toml.write_text('[digitwatch]\ninbox = "var/inbox"\nresults = "var/r.jsonl"\nformat = "jsonl"\n'
                        f'model = "{MODEL}"\nlog_format = "json"\n')
        env = {"PATH": "/usr/bin", "DIGITWATCH_FAILED": "var/failed", "PYTHONPATH": str(ROOT)}
        checked = run_cli("check-config", "--config", str(toml), "--format", "json", cwd=work, env=env)
        assert checked.returncode == 0, checked.stderr
        assert f"relative paths resolved against {work}" in checked.stderr
        ran = run_cli("watch", "--once", "--config", str(toml), "--processed", "var/done", cwd=work,
                      env=env)
        assert ran.returncode == 0, ran.stderr
        started = next(e for e in map(json.loads, ran.stdout.splitlines()) if e["event"] == "daemon_started")
        expected = json.loads(checked.stdout)
        expected["processed"] = str(work / "var" / "done")
        assert started["settings"] == expected
        assert expected["inbox"] == str(work / "var" / "inbox")
