"""Generate a MIDI file: ``python -m model.generate --checkpoint DIR --output out.mid``.

With ``--prompt_midi`` the model continues the prompt (the output holds the prompt, then the
continuation, in the prompt's tempo); without, it starts from nothing at 120 bpm. The time
signature comes from the BAR tokens.
"""

from __future__ import annotations

import argparse
import logging
import sys

import numpy as np
import torch

from model import checkpoint as ckpt
from model.device import resolve_device
from model.cli import add_dataclass_arguments, dataclass_from_args
from model.generation import BatchGenerator
from model.midi_io import MidiReadError, Note, Score, TempoChange, TimeSignature, read_midi, write_midi
from model.sampling import SamplingConfig
from model.tokenizer import TokenizerError, TokenSequence

logger = logging.getLogger(__name__)
OUTPUT_TICKS_PER_BEAT = 480


def generate(checkpoint: str, output: str, *, prompt_midi: str | None, tokens: int,
             sampling: SamplingConfig, device: str = "auto", prompt_tokens: int = 0) -> dict:
    """Write the MIDI file and return a summary (notes, seconds, tokens)."""
    dev = resolve_device(device)
    model, tokenizer, _ = ckpt.load_model(checkpoint, device=dev)
    generator = BatchGenerator(model, tokenizer)
    prompt, tempos = None, [TempoChange(0, 500_000)]
    if prompt_midi:
        score = read_midi(prompt_midi)
        prompt = tokenizer.encode(score)
        if prompt_tokens:
            prompt = TokenSequence(prompt.ids[:prompt_tokens], prompt.velocity[:prompt_tokens],
                                   prompt.voice[:prompt_tokens])
        tempos = score.tempos_at(OUTPUT_TICKS_PER_BEAT)
    state, out, decoder = generator.prime(prompt)
    heard = torch.from_numpy(generator.heard(prompt.ids if prompt else np.zeros(0, np.int64)))[None]
    # The prompt's own notes as the model heard them (on the grid), then the continuation.
    decoded = tokenizer.decode(prompt, ticks_per_beat=OUTPUT_TICKS_PER_BEAT) if prompt else None
    notes = []
    for step in range(tokens):
        results, state, out = generator.advance(state, out, [decoder], [sampling], [step], heard)
        if results[0].note is not None:
            notes.append(results[0].note)
    scale = OUTPUT_TICKS_PER_BEAT // tokenizer.config.resolution
    score = tokenizer.decode([], ticks_per_beat=OUTPUT_TICKS_PER_BEAT, tempos=tempos)
    score.notes = (decoded.notes if decoded else []) + [
        Note(pitch=n.pitch, velocity=n.velocity, onset_tick=n.onset * scale,
             duration_tick=n.duration * scale, onset_beat=n.onset / tokenizer.config.resolution,
             duration_beat=n.duration / tokenizer.config.resolution, channel=0, track=0, voice=n.voice)
        for n in notes]
    score.time_signatures = [TimeSignature(start * scale, num, den)
                             for start, num, den in decoder.signatures] or [TimeSignature(0, 4, 4)]
    write_midi(score, output)
    seconds = _seconds(score)
    return {"output": output, "notes": len(notes), "prompt_notes": len(decoded.notes) if decoded else 0,
            "tokens": tokens,
            "seconds": round(seconds, 2)}


def _seconds(score: Score) -> float:
    """Length in seconds through the tempo map."""
    end = score.end_tick
    seconds, last_tick, tempo = 0.0, 0, 500_000
    for change in score.tempos:
        if change.tick >= end:
            break
        seconds += (change.tick - last_tick) * tempo / 1e6 / score.ticks_per_beat
        last_tick, tempo = change.tick, change.microseconds_per_beat
    return seconds + (end - last_tick) * tempo / 1e6 / score.ticks_per_beat


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.generate", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory (e.g. runs/fm/best)")
    parser.add_argument("--output", required=True, help="MIDI file to write")
    parser.add_argument("--prompt_midi", default=None, help="MIDI file to continue")
    parser.add_argument("--prompt_tokens", type=int, default=0,
                        help="keep only the first N tokens of the prompt (0 = all of it)")
    parser.add_argument("--tokens", type=int, default=512, help="tokens to generate")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where to run")
    add_dataclass_arguments(parser, SamplingConfig)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    if args.tokens < 1:
        parser.error("--tokens must be at least 1")
    try:
        sampling = dataclass_from_args(SamplingConfig, args)
        summary = generate(args.checkpoint, args.output, prompt_midi=args.prompt_midi,
                           tokens=args.tokens, sampling=sampling, device=args.device,
                           prompt_tokens=args.prompt_tokens)
    except (ckpt.CheckpointError, MidiReadError, TokenizerError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {summary['output']}: {summary['notes']} generated notes"
          + (f" after {summary['prompt_notes']} prompt notes" if args.prompt_midi else "")
          + f", {summary['seconds']} s, from {summary['tokens']} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
