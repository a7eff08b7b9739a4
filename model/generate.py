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

from model.checkpoint.files import CheckpointError
from model.checkpoint.format import load_model
from model.generation.generator import BatchGenerator, with_bos
from model.midi.read import read_midi
from model.midi.score import DEFAULT_TEMPO, MidiReadError, Score, TempoChange
from model.midi.write import write_midi
from model.runtime.device import resolve_device
from model.runtime.flags import add_dataclass_arguments, dataclass_from_args
from model.sampling.config import SamplingConfig
from model.timebase import TICKS_PER_BEAT
from model.tokenizer.sequences import TokenSequence
from model.tokenizer.vocabulary import TokenizerError

logger = logging.getLogger(__name__)


def generate(checkpoint: str, output: str, *, prompt_midi: str | None, tokens: int,
             sampling: SamplingConfig, device: str = "auto", prompt_tokens: int = 0) -> dict:
    """Write the MIDI file and return a summary (notes, seconds, tokens)."""
    dev = resolve_device(device)
    model, tokenizer, _ = load_model(checkpoint, device=dev)
    generator = BatchGenerator(model, tokenizer)
    prompt, tempos = None, [TempoChange(0, DEFAULT_TEMPO)]
    if prompt_midi:
        score = read_midi(prompt_midi)
        prompt = tokenizer.encode(score)
        if prompt_tokens:
            prompt = TokenSequence(prompt.ids[:prompt_tokens], prompt.velocity[:prompt_tokens],
                                   prompt.voice[:prompt_tokens])
        tempos = score.tempos_at(TICKS_PER_BEAT)
    state, out, decoder = generator.prime(prompt)
    heard = torch.from_numpy(generator.heard(prompt.ids if prompt else np.zeros(0, np.int64)))[None]
    generated = []
    for step in range(tokens):
        results, state, out = generator.advance(state, out, [decoder], [sampling], [step], heard)
        generated.append(results[0])
    # The prompt's own notes as the model heard them (on the grid), then the continuation: the
    # whole stream decoded at once.
    read = with_bos(prompt)
    as_array = lambda values: np.asarray(values, dtype=np.int64)
    stream = TokenSequence(np.concatenate([read.ids, as_array([r.token for r in generated])]),
                           np.concatenate([read.velocity, as_array([r.velocity for r in generated])]),
                           np.concatenate([read.voice, as_array([r.voice for r in generated])]))
    score = tokenizer.decode(stream, ticks_per_beat=TICKS_PER_BEAT, tempos=tempos)
    write_midi(score, output)
    notes = sum(r.note is not None for r in generated)
    return {"output": output, "notes": notes, "prompt_notes": len(score.notes) - notes,
            "tokens": tokens, "seconds": round(_seconds(score), 2)}


def _seconds(score: Score) -> float:
    """Length in seconds through the tempo map."""
    end = score.end_tick
    seconds, last_tick, tempo = 0.0, 0, DEFAULT_TEMPO
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
    except (CheckpointError, MidiReadError, TokenizerError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {summary['output']}: {summary['notes']} generated notes"
          + (f" after {summary['prompt_notes']} prompt notes" if args.prompt_midi else "")
          + f", {summary['seconds']} s, from {summary['tokens']} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
