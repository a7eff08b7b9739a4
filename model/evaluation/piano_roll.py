"""Piano rolls of continuations, for a person to look at: generated above, real below.

:func:`write_piano_rolls` writes one PNG per continued prompt, ``<position>_<file stem>.png``
(position: 00, 01, ... in the order the prompts were continued). Each has two panels with the same
pitch and time axes, the generated continuation on top and the real one below. In both, the
prompt is drawn faded on a grey background at the left, up to a dashed line where the
continuation starts. Each voice has its own colour (legend at the right), pitch is the MIDI note
number with every C labelled (C4 = 60), time is in beats from the prompt's start, and the title
names the file and the sampling settings. Drawn on matplotlib's Agg canvas (no display, no
pyplot state).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from model.evaluation.continuation import Continuations, describe_sampling, sampling_settings
from model.tokenizer.stream import DecodedNote

PROMPT_ALPHA = 0.35  # prompt notes are drawn faded
FIGURE_SIZE = (14, 8)  # inches
DPI = 100


def piano_roll_name(position: int, name: str) -> str:
    """The file name of the ``position``-th prompt's piano roll: ``03_chorale012.png``."""
    return f"{position:02d}_{name}.png"


def voice_colours(voices: Sequence[int]) -> dict[int, str]:
    """A distinct colour per voice (matplotlib's ``tab10`` cycle, by voice number)."""
    return {voice: to_hex(f"C{voice % 10}") for voice in voices}


def c_label(pitch: int) -> str:
    """``C4 60`` for MIDI pitch 60: the octave's name and the note number."""
    return f"C{pitch // 12 - 1} {pitch}"


def draw_notes(ax: Axes, notes: Sequence[DecodedNote], colours: dict[int, str], steps_per_beat: int,
               alpha: float = 1.0) -> None:
    """Each note as a bar from its onset to its end (beats) at its pitch, in its voice's colour."""
    for voice in sorted({n.voice for n in notes}):
        mine = [n for n in notes if n.voice == voice]
        ax.barh([n.pitch for n in mine], [n.duration / steps_per_beat for n in mine],
                left=[n.onset / steps_per_beat for n in mine], height=0.8, color=colours[voice],
                alpha=alpha, edgecolor="black", linewidth=0.3)


def continuation_start(prompt: Sequence[DecodedNote], continuations: Sequence[Sequence[DecodedNote]]) -> float:
    """Internal step where the continuations start: their first onset, else the prompt's end."""
    onsets = [n.onset for notes in continuations for n in notes]
    if onsets:
        return min(onsets)
    return max((n.onset + n.duration for n in prompt), default=0)


def draw_piano_roll(path: Path, prompt: Sequence[DecodedNote], generated: Sequence[DecodedNote],
                    real: Sequence[DecodedNote], *, title: str, steps_per_beat: int) -> Path:
    """Write one PNG to ``path``: ``generated`` above ``real``, each after the faded ``prompt``."""
    everything = [*prompt, *generated, *real]
    colours = voice_colours(sorted({n.voice for n in everything}))
    low = min((n.pitch for n in everything), default=60) - 1
    high = max((n.pitch for n in everything), default=60) + 1
    start = continuation_start(prompt, [generated, real]) / steps_per_beat
    end = max((n.onset + n.duration for n in everything), default=0) / steps_per_beat
    fig = Figure(figsize=FIGURE_SIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 1, sharex=True, sharey=True)
    for ax, notes, label in zip(axes, (generated, real), ("generated", "real")):
        ax.axvspan(0, start, color="0.92", zorder=0)
        ax.axvline(start, color="0.3", linestyle="--", linewidth=1)
        draw_notes(ax, prompt, colours, steps_per_beat, alpha=PROMPT_ALPHA)
        draw_notes(ax, notes, colours, steps_per_beat)
        ax.set_title(f"{label} continuation (prompt shaded at the left)", loc="left", fontsize=10)
        ax.set_ylabel("pitch (MIDI)")
        ax.set_yticks([p for p in range(low, high + 1) if p % 12 == 0])
        ax.set_yticklabels([c_label(p) for p in range(low, high + 1) if p % 12 == 0])
        ax.grid(axis="y", color="0.85", linewidth=0.5)
        ax.set_axisbelow(True)
    axes[0].set_ylim(low - 0.5, high + 0.5)
    axes[0].set_xlim(0, max(end, start + 1))
    axes[1].set_xlabel("time (beats)")
    fig.legend(handles=[Patch(color=c, label=f"voice {v}") for v, c in colours.items()],
               loc="outside right upper")
    fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def write_piano_rolls(run: Continuations, names: Sequence[str], out_dir: str | Path,
                      steps_per_beat: int) -> list[Path]:
    """One piano roll per piece of ``run`` in ``out_dir`` (:func:`piano_roll_name`); ``names``:
    each piece's file stem, in the order of ``run.pieces``. Returns the paths written."""
    if len(names) != len(run.pieces):
        raise ValueError(f"{len(names)} names for {len(run.pieces)} continued pieces")
    settings = describe_sampling(sampling_settings(run.sampling))
    return [draw_piano_roll(Path(out_dir) / piano_roll_name(i, name), piece.prompt_notes,
                            piece.generated_notes, piece.real_notes, steps_per_beat=steps_per_beat,
                            title=f"{name}: {run.prompt_tokens} prompt tokens continued by "
                                  f"{run.tokens}\n{settings}")
            for i, (name, piece) in enumerate(zip(names, run.pieces))]
