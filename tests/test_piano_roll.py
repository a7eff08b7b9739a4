"""Piano rolls: a readable PNG per prompt, the generated continuation drawn above the real one."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.colors import to_rgb
from PIL import Image

from model.evaluation.continuation import ContinuedPiece, Continuations
from model.evaluation.piano_roll import DPI, FIGURE_SIZE, c_label, draw_piano_roll, write_piano_rolls
from model.sampling.config import SamplingConfig
from model.tokenizer.sequences import TokenSequence
from model.tokenizer.stream import DecodedNote

BEAT = 24


def notes(voice: int, pitches: list[int], first_beat: int) -> list[DecodedNote]:
    return [DecodedNote((first_beat + i) * BEAT, BEAT, p, 80, voice, 0, 0) for i, p in enumerate(pitches)]


def pixels_of(image: np.ndarray, colour: str) -> np.ndarray:
    """Mask of the pixels painted exactly in ``colour``."""
    rgb = np.round(np.array(to_rgb(colour)) * 255)
    return np.all(np.abs(image.astype(int) - rgb) <= 2, axis=-1)


def test_generated_is_drawn_above_real(tmp_path):
    prompt = notes(2, [60, 64, 67, 72], 0)
    generated = notes(0, [72, 71, 69, 67, 65, 64, 62, 60], 4)  # voice 0: blue
    real = notes(1, [48, 50, 52, 53, 55, 57, 59, 60], 4)  # voice 1: orange
    path = draw_piano_roll(tmp_path / "roll.png", prompt, generated, real, title="piece", steps_per_beat=BEAT)
    image = np.asarray(Image.open(path).convert("RGB"))
    assert image.shape[:2] == (FIGURE_SIZE[1] * DPI, FIGURE_SIZE[0] * DPI)
    panels = image[:, : int(0.8 * image.shape[1])]  # left of the legend
    top, bottom = panels[: len(panels) // 2], panels[len(panels) // 2:]
    blue, orange = "C0", "C1"
    assert pixels_of(top, blue).sum() > 100 and pixels_of(bottom, blue).sum() == 0
    assert pixels_of(bottom, orange).sum() > 100 and pixels_of(top, orange).sum() == 0


def test_octaves_are_labelled_by_their_c():
    assert c_label(60) == "C4 60" and c_label(48) == "C3 48"


def piece(index: int) -> ContinuedPiece:
    empty = TokenSequence(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64))
    return ContinuedPiece(index, empty, empty, empty, empty, notes(0, [60, 62], 0), notes(0, [64], 2), [])


def test_one_readable_png_per_prompt_named_by_position_and_file(tmp_path):
    run = Continuations(16, 24, SamplingConfig(), [piece(3), piece(7)])
    paths = write_piano_rolls(run, ["bwv001", "bwv002"], tmp_path / "plots", BEAT)
    assert [p.name for p in paths] == ["00_bwv001.png", "01_bwv002.png"]
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["00_bwv001.png", "01_bwv002.png"]
    for path in paths:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width > 0
    with pytest.raises(ValueError, match="names"):
        write_piano_rolls(run, ["bwv001"], tmp_path, BEAT)
