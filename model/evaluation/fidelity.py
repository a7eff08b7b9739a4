"""What the tokenizer keeps of real MIDI: round-trip fidelity per file and per folder.

Used by ``python -m model.tokenizer roundtrip`` and ``python -m model.tokenizer stats``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, fields
from fractions import Fraction
from pathlib import Path

from tqdm import tqdm

from model.midi.read import find_midi_files, read_midi
from model.midi.score import MidiReadError, Score
from model.midi.write import write_midi
from model.timebase import TICKS_PER_BEAT, grid_from_ticks
from model.tokenizer.tokenizer import Tokenizer
from model.tokenizer.vocabulary import TokenizerError


@dataclass
class Fidelity:
    """Note counts of one file or a sum of files."""

    files: int = 0
    notes: int = 0
    kept: int = 0  # same onset (on the grid), pitch and voice after decode(encode(file))
    kept_with_duration: int = 0  # ... and the same snapped duration
    onset_on_grid: int = 0  # original onset lies exactly on the grid
    duration_on_grid: int = 0  # original duration is exactly one of the grid's durations
    both_on_grid: int = 0
    unknown: int = 0  # notes outside the vocabulary (UNK)

    def __add__(self, other: "Fidelity") -> "Fidelity":
        return Fidelity(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))


def measure(score: Score, tokenizer: Tokenizer) -> Fidelity:
    """Encode and decode ``score`` and count what came back."""
    cfg = tokenizer.config
    grid, tpb = cfg.grid_per_beat, score.ticks_per_beat
    sequence = tokenizer.encode(score)
    decoded = tokenizer.decode(sequence, ticks_per_beat=TICKS_PER_BEAT)
    scale = tokenizer.timebase.ticks_per_step(TICKS_PER_BEAT)
    durations = set(cfg.duration_beats)

    expected_onset: Counter = Counter()
    expected_full: Counter = Counter()
    on_grid = dur_on_grid = both = 0
    for n in score.notes:
        onset = tokenizer.timebase.steps_from_grid(grid_from_ticks(n.onset_tick, tpb, grid))
        snapped = tokenizer.duration_steps(tokenizer.snap_duration(n.duration_beat))
        expected_onset[(onset, n.pitch, n.voice)] += 1
        expected_full[(onset, n.pitch, n.voice, snapped)] += 1
        exact_onset = (n.onset_tick * grid) % tpb == 0
        exact_duration = Fraction(n.duration_tick, tpb) in durations
        on_grid += exact_onset
        dur_on_grid += exact_duration
        both += exact_onset and exact_duration
    got_onset: Counter = Counter()
    got_full: Counter = Counter()
    for n in decoded.notes:
        onset, duration = n.onset_tick // scale, n.duration_tick // scale
        got_onset[(onset, n.pitch, n.voice)] += 1
        got_full[(onset, n.pitch, n.voice, duration)] += 1
    return Fidelity(
        files=1, notes=len(score.notes),
        kept=sum((expected_onset & got_onset).values()),
        kept_with_duration=sum((expected_full & got_full).values()),
        onset_on_grid=on_grid, duration_on_grid=dur_on_grid, both_on_grid=both,
        unknown=sequence.unknown)


def _tokenizer_for(scores: list[Score], tokenizer_path: str | None) -> Tokenizer:
    if tokenizer_path:
        return Tokenizer.load(tokenizer_path)
    tokenizer = Tokenizer()
    return tokenizer.fit(tokenizer.events(s) for s in scores)


def roundtrip_file(input_path: str, output_path: str, tokenizer_path: str | None = None) -> str:
    """Write the MIDI file that the tokens of ``input_path`` decode to; return a summary line."""
    score = read_midi(input_path)
    tokenizer = _tokenizer_for([score], tokenizer_path)
    sequence = tokenizer.encode(score)
    decoded = tokenizer.decode(sequence, ticks_per_beat=TICKS_PER_BEAT,
                               tempos=score.tempos_at(TICKS_PER_BEAT))
    write_midi(decoded, output_path)
    f = measure(score, tokenizer)
    return (f"{input_path}: {f.notes} notes, {len(sequence)} tokens -> {output_path}: "
            f"{len(decoded.notes)} notes; onset+pitch+voice kept {_pct(f.kept, f.notes)}, "
            f"with duration {_pct(f.kept_with_duration, f.notes)}"
            + (f"; recovered: {'; '.join(score.problems)}" if score.recovered else ""))


def folder_table(midi_dir: str, tokenizer_path: str | None = None,
                 cache_dir: str | None = None) -> str:
    """The fidelity table of every MIDI file under ``midi_dir``, one row per top-level folder."""
    del cache_dir  # fidelity needs the original notes, so every file is read
    root = Path(midi_dir)
    scores: list[tuple[str, Score]] = []
    skipped: list[tuple[str, str]] = []
    for path in tqdm(find_midi_files(root), desc="reading MIDI", unit="file", leave=False, disable=None):
        rel = path.relative_to(root)
        try:
            scores.append((str(rel), read_midi(path, name=str(rel))))
        except MidiReadError as exc:
            skipped.append((str(rel), str(exc).removeprefix(f"{rel}: ")))
    tokenizer = _tokenizer_for([s for _, s in scores], tokenizer_path)
    by_folder: dict[str, Fidelity] = {}
    for rel, score in tqdm(scores, desc="round trip", unit="file", leave=False, disable=None):
        folder = Path(rel).parts[0] if len(Path(rel).parts) > 1 else "."
        try:
            by_folder[folder] = by_folder.get(folder, Fidelity()) + measure(score, tokenizer)
        except TokenizerError as exc:
            skipped.append((rel, str(exc).removeprefix(f"{rel}: ")))
    total = sum(by_folder.values(), Fidelity())
    header = (f"{'folder':<12}{'files':>6}{'notes':>9}{'kept':>9}{'+dur':>9}"
              f"{'onset@grid':>12}{'dur@grid':>10}{'both@grid':>11}{'unk':>6}")
    rows = [header, "-" * len(header)]
    for name, f in sorted(by_folder.items()) + [("TOTAL", total)]:
        if name == "TOTAL":
            rows.append("-" * len(header))
        rows.append(
            f"{name:<12}{f.files:>6}{f.notes:>9}{_pct(f.kept, f.notes):>9}"
            f"{_pct(f.kept_with_duration, f.notes):>9}{_pct(f.onset_on_grid, f.notes):>12}"
            f"{_pct(f.duration_on_grid, f.notes):>10}{_pct(f.both_on_grid, f.notes):>11}{f.unknown:>6}")
    cfg = tokenizer.config
    rows += [
        "",
        "kept: notes whose onset (on the grid), pitch and voice survive decode(encode(file));",
        "+dur: ... and whose snapped duration survives too; @grid: original onset / duration",
        "exactly on the grid before quantization; unk: notes outside the vocabulary.",
        f"grid {cfg.grid_per_beat} steps per quarter note; durations {', '.join(cfg.durations)}; "
        f"vocabulary {tokenizer.vocab_size} tokens",
        f"files read {len(scores)} ({sum(s.recovered for _, s in scores)} recovered), "
        f"skipped {len(skipped)}",
    ]
    rows += [f"  skipped {rel}: {reason}" for rel, reason in skipped]
    return "\n".join(rows)


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.2f}%" if whole else "-"
