"""Settings: precedence defaults < TOML < environment < flags, and validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from digitwatch.config import HELP, KEYS, Settings, load_settings, read_toml
from digitwatch.daemon.startup import check_paths
from digitwatch.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


class TestPrecedence:
    """Each layer overrides the one below it."""

    def test_layers(self, tmp_path):
        toml = tmp_path / "d.toml"
        toml.write_text('[digitwatch]\nbatch_size = 8\nformat = "jsonl"\nsettle_seconds = 5\n')
        env = {"DIGITWATCH_BATCH_SIZE": "16", "DIGITWATCH_SETTLE_SECONDS": "3"}
        s = load_settings(toml, env, {"batch_size": 4})
        assert s.batch_size == 4  # flag beats env and file
        assert s.settle_seconds == 3.0  # env beats file
        assert s.format == "jsonl"  # file beats default
        assert s.batch_wait_ms == Settings().batch_wait_ms  # default

    def test_env_types(self):
        env = {"DIGITWATCH_RECURSIVE": "yes", "DIGITWATCH_PATTERNS": "*.png, *.PNG2",
               "DIGITWATCH_REVIEW": "/srv/review"}
        s = load_settings(None, env, {})
        assert s.recursive is True
        assert s.patterns == ("*.png", "*.PNG2")
        assert s.review == Path("/srv/review")

    def test_paths_become_absolute(self, tmp_path, monkeypatch):
        monkeypatch.chdir(tmp_path)
        s = load_settings(None, {}, {"inbox": "in"})
        assert s.inbox == tmp_path / "in"

    def test_every_key_has_help(self):
        assert set(HELP) == set(KEYS) and all(HELP.values())

    def test_shipped_file_documents_every_key_at_its_default(self):
        values = read_toml(ROOT / "config" / "digitwatch.toml")
        assert set(values) == set(KEYS)
        defaults = Settings()
        for key, value in values.items():
            default = getattr(defaults, key)
            assert value == default, key


class TestValidation:
    """Bad or looping settings are refused with a ConfigError."""

    @pytest.mark.parametrize(
        ("flags", "match"),
        [
            ({"format": "xml"}, "format"),
            ({"batch_size": 0}, "batch_size"),
            ({"review_threshold": 1.5}, "review_threshold"),
            ({"settle_seconds": -1}, "settle_seconds"),
            ({"patterns": ""}, "patterns"),
        ],
    )
    def test_bad_values(self, flags, match):
        with pytest.raises(ConfigError, match=match):
            load_settings(None, {}, flags)

    def test_bad_env_value_names_variable(self):
        with pytest.raises(ConfigError, match="DIGITWATCH_BATCH_SIZE"):
            load_settings(None, {"DIGITWATCH_BATCH_SIZE": "many"}, {})

    def test_unknown_toml_key_suggests_the_close_one(self, tmp_path):
        toml = tmp_path / "d.toml"
        toml.write_text("[digitwatch]\nbatchsize = 3\n")
        with pytest.raises(ConfigError, match=r"unknown key batchsize \(did you mean batch_size\?\)"):
            load_settings(toml, {}, {})

    def test_unknown_key_far_from_any_gets_no_guess(self, tmp_path):
        toml = tmp_path / "d.toml"
        toml.write_text("[digitwatch]\nzzz = 3\n")
        with pytest.raises(ConfigError, match=r"unknown key zzz$"):
            load_settings(toml, {}, {})

    def test_key_above_the_table_is_refused(self, tmp_path):
        toml = tmp_path / "d.toml"
        toml.write_text('inbox = "/srv/in"\n[digitwatch]\nbatch_size = 3\n')
        with pytest.raises(ConfigError, match="inbox must go under \\[digitwatch\\]"):
            load_settings(toml, {}, {})

    def test_file_of_bare_keys_still_works(self, tmp_path):
        toml = tmp_path / "d.toml"
        toml.write_text("batch_size = 3\n")
        assert load_settings(toml, {}, {}).batch_size == 3

    @pytest.mark.parametrize(
        ("line", "message"),
        [
            ("settle_seconds = nan", "settle_seconds: expected a finite number, got nan"),
            ("poll_interval = inf", "poll_interval: expected a finite number, got inf"),
            ("rescan_seconds = -inf", "rescan_seconds: expected a finite number, got -inf"),
            ("settle_seconds = -1.0", "settle_seconds must not be negative"),
            ("stop_timeout = 0", "stop_timeout must be positive"),
            ('batch_size = "abc"', "batch_size: expected a whole number, got 'abc'"),
            ("batch_size = 2.5", "batch_size: expected a whole number, got 2.5"),
            ("batch_size = true", "batch_size: expected a whole number, got true"),
            ('recursive = "maybe"', "recursive: expected true or false, got 'maybe'"),
            ("inbox = 5", "inbox: expected a string, got 5"),
            ('format = "xml"', "format = 'xml': use csv or jsonl"),
            ("worker_timeout_s = 0", "worker_timeout_s must be positive"),
            ("worker_timeout_s = -2.5", "worker_timeout_s must be positive"),
            ("worker_timeout_s = nan", "worker_timeout_s: expected a finite number, got nan"),
            ("worker_memory_mb = 0", "worker_memory_mb must be at least 1"),
            ("worker_memory_mb = 1.5", "worker_memory_mb: expected a whole number, got 1.5"),
        ],
    )
    def test_bad_file_values_in_words(self, tmp_path, line, message):
        toml = tmp_path / "d.toml"
        toml.write_text(f"[digitwatch]\n{line}\n")
        with pytest.raises(ConfigError) as info:
            load_settings(toml, {}, {})
        assert message in str(info.value)
        assert "invalid literal" not in str(info.value) and "Errno" not in str(info.value)

    @pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf", "1e999"])
    def test_non_finite_seconds_from_env_refused(self, value):
        with pytest.raises(ConfigError, match="DIGITWATCH_SETTLE_SECONDS: settle_seconds: expected a finite"):
            load_settings(None, {"DIGITWATCH_SETTLE_SECONDS": value}, {})

    def test_env_int_message_has_no_python_internals(self):
        with pytest.raises(ConfigError) as info:
            load_settings(None, {"DIGITWATCH_BATCH_SIZE": "abc"}, {})
        assert str(info.value) == "DIGITWATCH_BATCH_SIZE: batch_size: expected a whole number, got 'abc'"

    def test_outputs_inside_recursive_inbox_refused(self, tmp_path):
        flags = {"inbox": tmp_path, "processed": tmp_path / "done", "recursive": True}
        with pytest.raises(ConfigError, match="inside the recursive inbox"):
            load_settings(None, {}, flags)

    def test_results_inside_recursive_inbox_refused(self, tmp_path):
        flags = {"inbox": tmp_path, "results": tmp_path / "sub" / "r.csv", "recursive": True,
                 "processed": tmp_path.parent / "p", "failed": tmp_path.parent / "f"}
        with pytest.raises(ConfigError, match="results"):
            load_settings(None, {}, flags)

    def test_missing_inbox_refused(self, tmp_path):
        s = load_settings(None, {}, {"inbox": tmp_path / "nope"})
        with pytest.raises(ConfigError, match="does not exist"):
            check_paths(s)


class TestDiskChecks:
    """check_paths: every folder must take a new file, as this process; one
    ConfigError naming the path. (Unwritable folders as root: test_cli.)"""

    def _settings(self, tmp_path, **flags):
        (tmp_path / "in").mkdir(exist_ok=True)
        base = {"inbox": tmp_path / "in", "processed": tmp_path / "p", "failed": tmp_path / "f",
                "results": tmp_path / "r" / "results.csv"}
        return load_settings(None, {}, {**base, **flags})

    def test_missing_outputs_are_made_by_watch_not_by_check_config(self, tmp_path):
        s = self._settings(tmp_path, review=tmp_path / "rev")
        check_paths(s, create=False)
        assert not (tmp_path / "p").exists() and not (tmp_path / "r").exists()
        check_paths(s)
        assert all((tmp_path / d).is_dir() for d in ("p", "f", "r", "rev"))
        assert [p.name for p in tmp_path.rglob(".digitwatch-probe-*")] == []  # probes cleaned up

    @pytest.mark.parametrize("create", [True, False])
    def test_uncreatable_results_folder(self, tmp_path, create):
        # /proc takes no new folders, for root too.
        s = self._settings(tmp_path, results=Path("/proc/digitwatch-test/results.csv"))
        with pytest.raises(ConfigError, match="^results folder /proc/digitwatch-test: cannot create it"):
            check_paths(s, create=create)

    def test_results_that_is_a_folder(self, tmp_path):
        (tmp_path / "r" / "results.csv").mkdir(parents=True)
        s = self._settings(tmp_path)
        with pytest.raises(ConfigError, match="results .*results.csv cannot be appended to \\(Is a directory\\)"):
            check_paths(s)

    def test_output_that_is_a_file(self, tmp_path):
        (tmp_path / "p").write_text("")
        with pytest.raises(ConfigError, match="processed .* is not a folder"):
            check_paths(self._settings(tmp_path))


class TestNfsCaveats:
    """On NFS the daemon says what does not hold; elsewhere it says nothing."""

    def test_local_folders_have_no_caveats(self, tmp_path):
        from digitwatch.daemon.fsinfo import nfs_warnings

        assert nfs_warnings({"inbox": tmp_path, "results": tmp_path}, polling=False) == []

    def test_inbox_on_nfs_without_polling(self, tmp_path, monkeypatch):
        from digitwatch.daemon import fsinfo

        # statfs cannot be made to say NFS here; the lookup is faked, the rules are real.
        monkeypatch.setattr(fsinfo, "network_fs", lambda p: "nfs" if p == tmp_path else None)
        lines = fsinfo.nfs_warnings({"inbox": tmp_path, "results": None}, polling=False)
        assert any("set polling = true" in line for line in lines)
        assert not any("polling" in line for line in fsinfo.nfs_warnings({"inbox": tmp_path}, polling=True))
