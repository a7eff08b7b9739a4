"""The corpus command: every file counted, broken files reported, a cache that makes rerunning fast."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from model.training.corpus import load_corpus
from model.tokenizer.tokenizer import Tokenizer
from tests.midi_builders import build_midi


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "midi"
    (root / "set").mkdir(parents=True)
    (root / "a.mid").write_bytes(build_midi([(0, 1, 60), (1, 1, 62), (2, 2, 64)]))
    (root / "set" / "b.MID").write_bytes(build_midi([(0, 3, 55), (0, 1, 67)], time_signatures=[(0, 3, 4)]))
    (root / "set" / "silent.mid").write_bytes(build_midi([]))
    (root / "set" / "readme.mid").write_text("not a midi file")
    (root / "notes.txt").write_text("ignored: not a MIDI suffix")
    return root


def run_data(*args: str) -> dict:
    result = subprocess.run([sys.executable, "-m", "model.corpus", *args, "--json"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_corpus_command_counts_and_reports_every_file(folder, tmp_path):
    cache = tmp_path / "cache"
    first = run_data("--midi_dir", str(folder), "--cache_dir", str(cache))
    assert (first["files"], first["read"], first["notes"]) == (4, 2, 5)
    assert first["tokens"] == 5 + 2 * 2 + 2  # notes, BOS/EOS per file, one bar each (no silence)
    reasons = {s["path"]: s["reason"] for s in first["skipped"]}
    assert sorted(reasons) == ["set/readme.mid", "set/silent.mid"]
    assert reasons["set/readme.mid"].startswith("not a readable MIDI file: ")
    assert "MThd" in reasons["set/readme.mid"]
    assert reasons["set/silent.mid"] == "the file holds no notes"
    assert first["cache_hits"] == 0
    second = run_data("--midi_dir", str(folder), "--cache_dir", str(cache))
    assert second["cache_hits"] == 4
    assert {k: v for k, v in second.items() if k not in ("cache_hits", "seconds")} == {
        k: v for k, v in first.items() if k not in ("cache_hits", "seconds")}
    again = run_data("--midi_dir", str(folder), "--cache_dir", str(cache), "--retokenize")
    assert again["cache_hits"] == 0


def test_corpus_command_table_and_tokenizer_file(folder, tmp_path):
    out = tmp_path / "tokenizer.json"
    result = subprocess.run(
        [sys.executable, "-m", "model.corpus", "--midi_dir", str(folder),
         "--cache_dir", str(tmp_path / "c"), "--save_tokenizer", str(out)],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "4 found, 2 read (2 strictly, 0 recovered), 2 skipped" in result.stdout
    assert "set/silent.mid: the file holds no notes" in result.stdout
    assert Tokenizer.load(out).vocab_size > 4


def test_missing_folder_is_a_clear_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "model.corpus", "--midi_dir", str(tmp_path / "nope")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "no such folder" in result.stderr


def test_cache_is_keyed_by_content(folder, tmp_path):
    cache = tmp_path / "cache"
    load_corpus(folder, cache_dir=cache, progress=False)
    (folder / "a.mid").write_bytes(build_midi([(0, 1, 72)]))
    corpus = load_corpus(folder, cache_dir=cache, progress=False)
    assert corpus.cache_hits == 3
    assert next(f for f in corpus.files if f.path == "a.mid").events.note_count == 1


def test_validation_split_is_deterministic_and_disjoint(tmp_path):
    for i in range(20):
        (tmp_path / f"{i:02d}.mid").write_bytes(build_midi([(0, 1, 60 + i)]))
    corpus = load_corpus(tmp_path, cache_dir=tmp_path / "cache", progress=False)
    train, val = corpus.split(0.1)
    assert len(val) == 2 and len(train) == 18
    assert not {f.path for f in train} & {f.path for f in val}
    assert [f.path for f in corpus.split(0.1)[1]] == [f.path for f in val]


def test_bach_corpus_reads_and_recovers(bach_dir, tmp_path):
    corpus = load_corpus(bach_dir, cache_dir=tmp_path / "cache", progress=False)
    strict = [f for f in corpus.files if not f.recovered]
    assert len(strict) == 190
    assert len(corpus.files) >= 198, corpus.skipped
    for f in corpus.recovered:
        assert f.events.note_count > 0 and f.problems, f.path
    assert all(reason for _, reason in corpus.skipped)
