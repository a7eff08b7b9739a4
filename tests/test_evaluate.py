"""python -m model.evaluate: held-out NLL next to the baselines, as a table and as JSON; piano rolls."""

from __future__ import annotations

import json

from PIL import Image

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


def test_plots_writes_one_readable_piano_roll_per_prompt(tiny_run, tmp_path):
    midi_dir = json.loads((tiny_run / "latest" / "config.json").read_text())["train"]["midi_dir"]
    plots = tmp_path / "plots"
    result = run_module("model.evaluate", "--checkpoint", str(tiny_run / "best"), "--midi_dir", midi_dir,
                        "--continuations", "3", "--prompt_tokens", "16", "--continuation_tokens", "24",
                        "--plots", str(plots), "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    written = sorted(plots.iterdir())
    # the first three files long enough, in path order: piece00, piece01, piece02
    assert [p.name for p in written] == ["00_piece00.png", "01_piece01.png", "02_piece02.png"]
    assert report["plots"] == [str(p) for p in written]
    for path in written:
        with Image.open(path) as image:
            image.verify()
            assert image.format == "PNG" and image.width > 0 and path.stat().st_size > 0


def test_plots_needs_continuations(tiny_run, tmp_path):
    midi_dir = json.loads((tiny_run / "latest" / "config.json").read_text())["train"]["midi_dir"]
    result = run_module("model.evaluate", "--checkpoint", str(tiny_run / "best"), "--midi_dir", midi_dir,
                        "--plots", str(tmp_path / "plots"))
    assert result.returncode == 2 and "--continuations" in result.stderr
    assert not (tmp_path / "plots").exists()
