"""python -m server: flags, environment twins and start-up errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from server.__main__ import parse_config
from server.config import DEFAULT_CHECKPOINT, ServerConfig


def test_defaults_come_from_the_config_dataclass(monkeypatch):
    for name in list(os.environ):
        if name.startswith("FM_"):
            monkeypatch.delenv(name)
    config = parse_config([])
    assert config == ServerConfig()
    assert config.checkpoint == DEFAULT_CHECKPOINT and config.port == 8000 and config.lookahead == 0.5


def test_flags_and_environment_twins(monkeypatch):
    monkeypatch.setenv("FM_MAX_SESSIONS", "7")
    monkeypatch.setenv("FM_CHECKPOINT", "/models/mine")
    config = parse_config(["--lookahead", "0.8", "--port", "9000"])
    assert (config.max_sessions, config.checkpoint, config.lookahead, config.port) == (7, "/models/mine", 0.8, 9000)
    assert parse_config(["--max-sessions", "3"]).max_sessions == 3  # the flag wins


@pytest.mark.parametrize("argv,env,words", [
    (["--lookahead", "0"], {}, "lookahead"),
    (["--device", "tpu"], {}, "invalid choice"),
    ([], {"FM_MAX_SESSIONS": "many"}, "FM_MAX_SESSIONS"),
    ([], {"FM_DTYPE": "fp8"}, "FM_DTYPE"),
    (["--threads", "-1"], {}, "threads"),
    (["--recent-states", "-1"], {}, "recent_states"),
], ids=["lookahead", "device", "env-int", "env-choice", "threads", "recent-states"])
def test_bad_settings_are_refused_with_a_message(monkeypatch, capsys, argv, env, words):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exit_:
        parse_config(argv)
    assert exit_.value.code == 2
    assert words in capsys.readouterr().err


def test_a_missing_checkpoint_exits_with_a_clear_message(tmp_path):
    result = subprocess.run([sys.executable, "-m", "server", "--checkpoint", str(tmp_path / "nothing")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "cannot load the checkpoint" in result.stderr and "nothing" in result.stderr


def test_help_lists_every_flag_with_its_environment_twin():
    result = subprocess.run([sys.executable, "-m", "server", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for flag in ("--checkpoint", "--host", "--port", "--device", "--dtype", "--max-sessions", "--lookahead"):
        assert flag in result.stdout
    assert "FM_CHECKPOINT" in result.stdout and "FM_MAX_SESSIONS" in result.stdout
