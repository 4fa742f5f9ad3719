"""Settings: precedence defaults < TOML < environment < flags, and validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from digitwatch.config import KEYS, Settings, check_paths, load_settings, read_toml
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

    def test_unknown_toml_key(self, tmp_path):
        toml = tmp_path / "d.toml"
        toml.write_text("[digitwatch]\nbatchsize = 3\n")
        with pytest.raises(ConfigError, match="unknown key"):
            load_settings(toml, {}, {})

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
