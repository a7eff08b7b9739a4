"""python -m model.evaluate: held-out NLL next to the baselines, as a table and as JSON."""

from __future__ import annotations

import json

from tests.conftest import run_module


def test_evaluate_json_on_the_validation_split(tiny_run):
    stats = json.loads((tiny_run / "run_stats.json").read_text())
    midi_dir = json.loads((tiny_run / "latest" / "config.json").read_text())["train"]["midi_dir"]
    result = run_module("model.evaluate", "--checkpoint", str(tiny_run / "best"), "--midi_dir", midi_dir,
                        "--split", "val", "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert {"model_nll", "unigram_nll", "bigram_nll", "tokens", "files", "skipped"} <= set(report)
    assert report["files"] == len(stats["val_files"])
    assert report["tokens"] > 0 and report["skipped"] == []
    # These pieces repeat patterns: the FM must beat the unigram baseline on them.
    assert report["model_nll"] < report["unigram_nll"]


def test_evaluate_table(tiny_run):
    midi_dir = json.loads((tiny_run / "latest" / "config.json").read_text())["train"]["midi_dir"]
    result = run_module("model.evaluate", "--checkpoint", str(tiny_run / "best"), "--midi_dir", midi_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "FM" in result.stdout and "bigram" in result.stdout and "nats/token" in result.stdout
