"""python -m model.generate: a playable file with the notes asked for, reproducible by seed."""

from __future__ import annotations

import itertools

import mido

from tests.conftest import run_module
from tests.midi_builders import build_midi


def generate(run, out, *args):
    result = run_module("model.generate", "--checkpoint", str(run / "best"), "--output", str(out), *args)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def note_ons(path):
    return [(m.note, m.time) for t in mido.MidiFile(path).tracks for m in t
            if m.type == "note_on" and m.velocity > 0]


def test_generate_writes_playable_midi_with_the_notes_asked_for(tiny_run, tmp_path):
    out = tmp_path / "out.mid"
    stdout = generate(tiny_run, out, "--tokens", "120", "--seed", "1")
    notes = note_ons(out)
    # Every token is a note, a rest or a bar line: most of them are notes.
    assert 60 <= len(notes) <= 120
    assert f"{len(notes)} generated notes" in stdout


def test_same_seed_reproduces_and_other_seeds_differ(tiny_run, tmp_path):
    a, b, c = (tmp_path / f"{n}.mid" for n in "abc")
    generate(tiny_run, a, "--tokens", "60", "--seed", "7")
    generate(tiny_run, b, "--tokens", "60", "--seed", "7")
    generate(tiny_run, c, "--tokens", "60", "--seed", "8")
    assert note_ons(a) == note_ons(b)
    assert note_ons(a) != note_ons(c)


def test_prompt_is_kept_and_continued(tiny_run, tmp_path):
    prompt = tmp_path / "prompt.mid"
    pitches = [55 + (0, 4, 7, 12)[i % 4] for i in range(16)]  # notes the tiny corpus has
    prompt.write_bytes(build_midi([(i * 0.5, 0.5, p) for i, p in enumerate(pitches)], tempo_bpm=90))
    out = tmp_path / "out.mid"
    stdout = generate(tiny_run, out, "--prompt_midi", str(prompt), "--tokens", "40")
    assert "after 16 prompt notes" in stdout
    assert [p for p, _ in note_ons(out)][:16] == pitches
    tempo = next(m for t in mido.MidiFile(out).tracks for m in t if m.type == "set_tempo")
    assert tempo.tempo == mido.bpm2tempo(90)


def test_bad_prompt_and_checkpoint_are_clear_errors(tiny_run, tmp_path):
    bad = tmp_path / "bad.mid"
    bad.write_text("no")
    result = run_module("model.generate", "--checkpoint", str(tiny_run / "best"),
                        "--output", str(tmp_path / "o.mid"), "--prompt_midi", str(bad))
    assert result.returncode == 2 and "bad.mid" in result.stderr and "Traceback" not in result.stderr
    result = run_module("model.generate", "--checkpoint", str(tmp_path / "missing"),
                        "--output", str(tmp_path / "o.mid"))
    assert result.returncode == 2 and "missing" in result.stderr
    result = run_module("model.generate", "--checkpoint", str(tiny_run / "best"),
                        "--output", str(tmp_path / "o.mid"), "--temperature", "0")
    assert result.returncode == 2 and "temperature" in result.stderr


def test_prompt_tokens_keeps_only_the_start_of_the_prompt(tiny_run, tmp_path):
    prompt = tmp_path / "prompt.mid"
    pitches = [55 + (0, 4, 7, 12)[i % 4] for i in range(16)]
    prompt.write_bytes(build_midi([(i * 0.5, 0.5, p) for i, p in enumerate(pitches)]))
    out = tmp_path / "out.mid"
    stdout = generate(tiny_run, out, "--prompt_midi", str(prompt), "--prompt_tokens", "6", "--tokens", "20")
    assert "after 4 prompt notes" in stdout  # <BOS> BAR and four notes
    midi = mido.MidiFile(out)
    onsets = [(round(tick / midi.ticks_per_beat, 3), m.note) for track in midi.tracks
              for tick, m in zip(itertools.accumulate(m.time for m in track), track)
              if m.type == "note_on" and m.velocity > 0]
    # The four kept prompt notes are written at their own beats (an untrained model's continuation
    # may land anywhere after them in its bar).
    assert sorted(onsets)[:3] == [(0.0, 55), (0.5, 59), (1.0, 62)]
    assert (1.5, 67) in onsets
