"""Speed and memory of the Field Machine: ``python -m model.benchmark``.

Prints training tokens/s, generation tokens/s for several numbers of concurrent streams, the time
of one step at several positions (flat: the FM's promise), the parallel forward time for several
sequence lengths, and peak memory. The model is randomly initialised at the given size (weights
do not change the cost), or loaded with ``--checkpoint``.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from dataclasses import asdict

import torch

from model.checkpoint.format import load_model
from model.fm.config import ModelConfig
from model.fm.machine import FieldMachine
from model.fm.state import FieldState
from model.runtime.device import resolve_device, resolve_precision
from model.tokenizer.dna import DNA_FLOATS
from model.tokenizer.tokenizer import Tokenizer


def timed(fn, *, repeat: int, device: torch.device) -> float:
    """Median seconds of ``fn()`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def random_inputs(batch: int, length: int, config: ModelConfig, device: torch.device):
    dna = torch.rand(batch, length, DNA_FLOATS, device=device)
    slots = torch.randint(0, config.voice_slots, (batch, length), device=device)
    return dna, slots


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.benchmark", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="measure this checkpoint's model instead")
    parser.add_argument("--dim", type=int, default=4096, help="field width (random model)")
    parser.add_argument("--field_layers", type=int, default=ModelConfig.__dataclass_fields__["field_layers"].default,
                        help="field layers (random model; 0 = one field and an MLP decoder)")
    parser.add_argument("--width", type=int, default=ModelConfig.__dataclass_fields__["width"].default,
                        help="residual width between field layers (random model)")
    parser.add_argument("--decoder_hidden", type=int, default=2048, help="decoder width, or each field layer's MLP width (random model)")
    parser.add_argument("--vocab_size", type=int, default=16667, help="vocabulary (random model)")
    parser.add_argument("--readout", default="demod", choices=("field", "demod"), help="readout (random model)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where to run")
    parser.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                        help="weights' dtype (auto: bf16 where fast)")
    parser.add_argument("--streams", default="1,16,256,1024", help="concurrent streams to time")
    parser.add_argument("--positions", default="100,10000,30000", help="positions to time one step at")
    parser.add_argument("--lengths", default="1024,2048,4096,8192,16384,32768",
                        help="sequence lengths for the parallel forward")
    parser.add_argument("--train_length", type=int, default=2048, help="tokens per training sequence")
    parser.add_argument("--train_batch", type=int, default=4, help="sequences per training step")
    parser.add_argument("--repeat", type=int, default=5, help="timed repetitions (median reported)")
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    dtype = resolve_precision(args.precision, device)
    if args.checkpoint:
        model, _, _ = load_model(args.checkpoint, device=device)
        config = model.config
    else:
        shape = asdict(Tokenizer().shape) | {"vocab_size": args.vocab_size}  # the default tokenizer's tables
        config = ModelConfig(**shape, dim=args.dim, field_layers=args.field_layers, width=args.width,
                             decoder_hidden=args.decoder_hidden, readout=args.readout, dropout=0.0)
        model = FieldMachine(config).to(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"CPU ({torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()})")
    print(f"device {name}; weights/autocast {str(dtype).removeprefix('torch.')}; "
          f"dim {config.dim}, " + (f"{config.field_layers} field layers of {config.field_floats} floats, "
                                   f"width {config.width}, MLPs {config.decoder_hidden}, "
                                   if config.field_layers else
                                   f"decoder {config.decoder_layers}x{config.decoder_hidden}, ") +
          f"vocab {config.vocab_size}, readout {config.readout}{'+direct' if config.direct else ''}; "
          f"{model.parameter_count() / 1e6:.2f} M parameters; state {config.state_floats} floats "
          f"({config.state_floats * 4 + 8} bytes) per stream")
    autocast = lambda: torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    # Training throughput.
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    dna, slots = random_inputs(args.train_batch, args.train_length, config, device)
    targets = torch.randint(0, config.vocab_size, (args.train_batch, args.train_length), device=device)

    def train_step():
        with autocast():
            out = model(dna, slots)
        loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1).float(), targets.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    seconds = timed(train_step, repeat=max(2, args.repeat // 2), device=device)
    print(f"\ntraining     {args.train_batch * args.train_length / seconds:>12,.0f} tokens/s "
          f"(batch {args.train_batch} x {args.train_length}, {seconds * 1000:.1f} ms/step)")
    model.eval()
    served = model.to(dtype) if dtype != torch.float32 else model

    print("\ngeneration (one batched step, all streams)")
    print(f"{'streams':>10}{'ms/step':>12}{'tokens/s':>14}")
    for b in [int(x) for x in args.streams.split(",")]:
        state = FieldState(torch.zeros(b, config.state_floats, device=device),
                           torch.full((b,), 100, dtype=torch.int64, device=device))
        d, s = random_inputs(b, 1, config, device)
        sec = timed(lambda: served.step(state, d[:, 0], s[:, 0]), repeat=args.repeat, device=device)
        print(f"{b:>10}{sec * 1000:>12.2f}{b / sec:>14,.0f}")

    print("\none step at position (1 stream; flat = O(1))")
    d, s = random_inputs(1, 1, config, device)
    for p in [int(x) for x in args.positions.split(",")]:
        state = FieldState(torch.zeros(1, config.state_floats, device=device),
                           torch.full((1,), p, dtype=torch.int64, device=device))
        sec = timed(lambda: served.step(state, d[:, 0], s[:, 0]), repeat=args.repeat * 4, device=device)
        print(f"{p:>10}{sec * 1000:>12.3f} ms")

    print("\nparallel forward (1 sequence)")
    for n in [int(x) for x in args.lengths.split(",")]:
        d, s = random_inputs(1, n, config, device)
        try:
            with torch.no_grad():
                sec = timed(lambda: served(d, s), repeat=max(1, args.repeat // 2), device=device)
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            print(f"{n:>10}  failed: {str(exc).splitlines()[0]}")
            continue
        print(f"{n:>10}{sec * 1000:>12.1f} ms{n / sec:>14,.0f} tokens/s")
    print(f"\npeak memory {peak_memory_mb(device):,.0f} MiB ({'GPU allocated' if device.type == 'cuda' else 'process RSS'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
