"""Architecture study: Field Machine variants against a causal transformer, at equal time.

``python -m model.research.study --midi_dir ../shared/data/bach_midi --minutes 4``

Every variant is trained in this one process, one after the other, for the same wall-clock
budget on the same training split, batches and learning-rate schedule (warm-up, then a cosine
decay that follows the clock), then measured on the validation split: next-token NLL (windows of
``--max_seq_len`` tokens, the same context for every variant), the continuation metrics of
:mod:`model.evaluation.continuation` (default sampling with ``key_pull`` 0: the model alone, no nudge
toward the prompt's pitch classes), and the time of one generation step for one stream at
positions 100 and 10,000. Results go to ``<out_dir>/study.json`` and ``<out_dir>/study.md`` (a table).

Variants (``--variants``, comma-separated): ``transformer`` (tied token embedding),
``transformer_factored`` (its token rows built like the FM's factored head), and the FM variants in
:data:`FM_VARIANTS`. FM variants share one size (``--fm_dim``, ``--fm_hidden``); the transformer's
width is ``--tf_dim``; pick them so the parameter counts match (the table shows them).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from model.evaluation.baselines import Baselines
from model.evaluation.continuation import continuation_metrics
from model.fm.config import ModelConfig
from model.fm.machine import FieldMachine
from model.fm.state import FieldState
from model.generation.generator import BatchGenerator
from model.research.transformer import (CausalTransformer, KVCache, TransformerConfig, TransformerGenerator,
                                        with_input_ids)
from model.runtime.device import resolve_device, resolve_precision
from model.sampling.config import SamplingConfig
from model.tokenizer.dna import DNA_FLOATS
from model.tokenizer.tokenizer import Tokenizer
from model.training.batches import Example, collate, make_example, windows
from model.training.corpus import load_corpus
from model.training.trainer import (BatchLoss, TrainConfig, autocast, batch_losses, lr_at, mean_token_loss,
                                    optimizer_step, train_step, validation_loss, validation_spans)

logger = logging.getLogger(__name__)

FM_VARIANTS: dict[str, dict] = {
    "fm_field": dict(readout="field", direct=False),
    "fm_demod": dict(readout="demod", direct=False),
    "fm_field_direct": dict(readout="field", direct=True),
    "fm_demod_direct": dict(readout="demod", direct=True),
    "fm_demod_direct_decays": dict(readout="demod", direct=True, decays="0,512,64,8,2"),
    "fm_demod_direct_decays_fdrop": dict(readout="demod", direct=True, decays="0,512,64,8,2",
                                         field_dropout=0.1),
    "fm_demod_direct_decays_factored": dict(readout="demod", direct=True, decays="0,512,64,8,2",
                                            head="factored"),
    "fm_demod_direct_decays_factored_lookup": dict(readout="demod", direct=True, decays="0,512,64,8,2",
                                                   head="factored", dna_lookup=True),
}
# Deep FMs: ``fm_deep<layers>_<floats of state>``, e.g. ``fm_deep4_1024``: field layers with the
# shipped model's choices (demod, decays, factored head, DNA lookup), their width the largest
# multiple of 32 that keeps the parameters at most ``--deep_parameters``. Suffixes, in any order:
# ``_learned`` (each layer learns its own decays, ``ModelConfig.learn_decays``), ``_gated`` (each
# layer's read gated by its input, ``ModelConfig.gated``) and ``_conv<k>`` (a causal convolution of
# k taps on each layer's writes, ``ModelConfig.conv``): ``fm_deep4_512_gated_conv4``. ``<floats>``
# counts the fields; a convolution keeps k-1 writes per layer beside them (the table's state column).
DEEP_PREFIX = "fm_deep"
DEEP_SUFFIXES = {"learned": "learn_decays", "gated": "gated"}
DEEP_NAMING = f"{DEEP_PREFIX}<layers>_<floats>[_learned][_gated][_conv<k>]"


def deep_option(suffix: str) -> tuple[str, object]:
    """``"gated"`` -> ("gated", True); ``"conv4"`` -> ("conv", 4)."""
    if suffix.startswith("conv") and suffix[4:].isdigit():
        return "conv", int(suffix[4:])
    return DEEP_SUFFIXES[suffix], True


DEEP_CHOICES = dict(readout="demod", head="factored", dna_lookup=True)
DEEP_DECAYS = "0,512,64,8,2"
DEFAULT_VARIANTS = ("transformer_factored,fm_demod_direct_decays_factored_lookup,fm_deep2_2048,"
                    "fm_deep4_1024,fm_deep4_4096,fm_deep8_2048")
TIMED_POSITIONS = (100, 10_000)


def build(name: str, args: argparse.Namespace, tokenizer: Tokenizer) -> torch.nn.Module:
    common = asdict(tokenizer.shape)
    if name in ("transformer", "transformer_factored"):
        return CausalTransformer(TransformerConfig(**common, dim=args.tf_dim, layers=args.tf_layers,
                                                   heads=args.tf_heads, dropout=args.dropout,
                                                   head="factored" if name.endswith("factored") else "tied"))
    if name.startswith(DEEP_PREFIX):
        return deep_fm(name, common, args.deep_parameters, args.dropout, args.deep_decays)
    if name not in FM_VARIANTS:
        raise ValueError(f"unknown variant {name!r}: choose from transformer, transformer_factored, "
                         f"{DEEP_NAMING}, {', '.join(FM_VARIANTS)}")
    return FieldMachine(ModelConfig(**common, dim=args.fm_dim, field_layers=0, decoder_hidden=args.fm_hidden,
                                    decoder_layers=args.fm_layers, dropout=args.dropout,
                                    **FM_VARIANTS[name]))


def deep_fm(name: str, shape: dict, parameters: int, dropout: float, decays: str = DEEP_DECAYS) -> FieldMachine:
    """The ``fm_deep<layers>_<floats>[_learned][_gated][_conv<k>]`` variant at the largest width
    (MLPs 4x wide) within ``parameters``."""
    parts = name.removeprefix(DEEP_PREFIX).split("_")
    try:
        layers, floats = int(parts[0]), int(parts[1])
        options = dict(deep_option(suffix) for suffix in parts[2:])
    except (ValueError, IndexError, KeyError):
        raise ValueError(f"deep variants are named {DEEP_NAMING}, not {name!r}") from None
    config = None
    for width in range(32, 4097, 32):
        candidate = ModelConfig(**shape, dim=floats, field_layers=layers, width=width,
                                decoder_hidden=4 * width, dropout=dropout, decays=decays,
                                **options, **DEEP_CHOICES)
        if FieldMachine(candidate).parameter_count() > parameters:
            break
        config = candidate
    if config is None:
        raise ValueError(f"{name}: even width 32 needs more than --deep_parameters {parameters:,}")
    return FieldMachine(config)


def transformer_step(model: CausalTransformer, optimizer: torch.optim.Optimizer, batch: dict, *, lr: float,
                     grad_clip: float, device: torch.device, dtype: torch.dtype) -> dict:
    """The core's :func:`model.training.trainer.train_step` for the transformer, which reads ids too."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    with autocast(device, dtype):
        out = model(batch["inputs"], batch["dna"], batch["slots"])
    losses = batch_losses(model, out, batch)
    optimizer_step(model, optimizer, losses["total"], grad_clip)
    return losses


@torch.no_grad()
def transformer_validation_loss(model: CausalTransformer, examples: list[Example], cfg: TrainConfig,
                                device: torch.device, dtype: torch.dtype) -> float:
    """The core's :func:`model.training.trainer.validation_loss` (same windows) for the transformer."""

    def scored():  # one batch's outputs at a time
        for spans in validation_spans(examples, cfg):
            batch = with_input_ids(examples, spans, device)
            with autocast(device, dtype):
                yield model(batch["inputs"], batch["dna"], batch["slots"]), batch

    model.eval()
    loss = mean_token_loss(model, scored())
    model.train()
    return loss


def train_for(model, train, cfg: TrainConfig, seconds: float, device, dtype, rng, desc: str) -> dict:
    """Train until ``seconds`` of wall clock have passed; returns steps, tokens and seconds."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss = None if isinstance(model, CausalTransformer) else BatchLoss(model)
    model.train()
    started = time.perf_counter()
    step = tokens = 0
    last = math.nan
    bar = tqdm(total=round(seconds), desc=desc, unit="s", leave=False, disable=None)
    while True:
        spans = windows(train, cfg.max_seq_len, rng)
        order = rng.permutation(len(spans))
        for k in range(0, len(order), cfg.batch_size):
            elapsed = time.perf_counter() - started
            if elapsed >= seconds:
                bar.close()
                return {"steps": step, "tokens": tokens, "seconds": round(elapsed, 1),
                        "final_train_loss": last}
            chosen = [spans[j] for j in order[k:k + cfg.batch_size]]
            lr = lr_at(step, 10**9, cfg, elapsed / seconds)
            if isinstance(model, CausalTransformer):
                batch = with_input_ids(train, chosen, device)
                losses = transformer_step(model, optimizer, batch, lr=lr, grad_clip=cfg.grad_clip,
                                          device=device, dtype=dtype)
            else:
                batch = collate(train, chosen, device)
                losses, _ = train_step(loss, optimizer, batch, lr=lr, grad_clip=cfg.grad_clip,
                                       device=device, dtype=dtype)
            step += 1
            tokens += int(batch["mask"].sum())
            last = losses["token"].item()
            bar.n = min(round(time.perf_counter() - started), round(seconds))
            bar.set_postfix(loss=f"{last:.3f}", tokens=tokens)


@torch.no_grad()
def step_cost_ms(model: torch.nn.Module, position: int, repeat: int = 30) -> float:
    """Median milliseconds of one generation step for one stream that has ``position`` tokens."""
    param = next(model.parameters())
    dna = torch.rand(1, DNA_FLOATS, device=param.device)
    slot = torch.zeros(1, dtype=torch.int64, device=param.device)
    if isinstance(model, CausalTransformer):
        cache = KVCache(model.config, 1, position + repeat + 2, param.device, param.dtype)
        ids = torch.zeros(1, 1, dtype=torch.int64, device=param.device)

        def one():
            cache.length = position  # a filled cache: what is in it does not change the cost
            model(ids, dna[:, None], slot[:, None], cache=cache)
    else:
        state = FieldState(torch.zeros(1, model.config.state_floats, device=param.device),
                           torch.full((1,), position, dtype=torch.int64, device=param.device))

        def one():
            model.step(state, dna, slot)
    one()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        one()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def state_floats(model: torch.nn.Module, position: int) -> int:
    if isinstance(model, CausalTransformer):
        return model.state_floats_at(position)
    return model.config.state_floats


MUSIC_COLUMNS = (("voices", "voices_used", ".1f"), ("busiest voice", "busiest_voice_share", ".2f"),
                 ("melodic move", "mean_melodic_move", ".2f"), ("moves <= 2", "step_share", ".2f"),
                 ("notes / onset", "notes_per_onset", ".2f"), ("key corr.", "key_correlation", ".2f"),
                 ("crossing", "voice_crossing", ".3f"), ("prompt_fidelity", "prompt_fidelity", ".2f"),
                 ("distinctness", "distinctness", ".2f"), ("longest repeat", "longest_repeat", "d"))


def markdown_table(result: dict) -> str:
    """Every variant's NLL, music figures (the model alone) and costs, with Bach's own figures on
    the same prompts as the last row."""
    head = ("| variant | parameters | state floats / stream (at 100; 10,000) | val NLL | × transformer | "
            + " | ".join(name for name, _, _ in MUSIC_COLUMNS)
            + " | train time | tokens seen | ms/token at 100 | ms/token at 10,000 |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    ref = next((r["val_nll"] for r in result["variants"] if r["name"].startswith("transformer")), None)
    for r in result["variants"]:
        c = r["continuation"]
        ratio = f"{r['val_nll'] / ref:.3f}" if ref else "-"
        floats = r["state_floats"]
        music = " | ".join(format(c[key], spec) for _, key, spec in MUSIC_COLUMNS)
        rows.append(
            f"| {r['name']} | {r['parameters']:,} | {floats['100']:,}; {floats['10000']:,} "
            f"| {r['val_nll']:.3f} | {ratio} | {music} | {r['train']['seconds'] / 60:.1f} min "
            f"| {r['train']['tokens']:,} | {r['step_ms']['100']:.2f} | {r['step_ms']['10000']:.2f} |")
    blank = " |" * (len(MUSIC_COLUMNS) + 4)
    if result["variants"]:
        c = result["variants"][0]["continuation"]
        real = " | ".join("" if key == "distinctness" else format(c["real_" + key], spec)
                          for _, key, spec in MUSIC_COLUMNS)
        rows.append(f"| Bach (the real continuations) | | | | | {real} |" + " |" * 4)
    base = result["baselines"]
    rows.append(f"| unigram | | | {base['unigram_nll']:.3f} |{blank}")
    rows.append(f"| bigram | | | {base['bigram_nll']:.3f} |{blank}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.research.study", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--midi_dir", required=True, help="folder of MIDI files (searched recursively)")
    parser.add_argument("--out_dir", default="runs/study", help="where study.json and study.md go")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS,
                        help=f"comma-separated variants, run in order: transformer, transformer_factored, "
                             f"{DEEP_NAMING} (e.g. fm_deep2_512_gated) or one of {', '.join(FM_VARIANTS)}")
    parser.add_argument("--minutes", type=float, default=4.0, help="training wall clock per variant")
    parser.add_argument("--batch_size", type=int, default=8, help="windows per step")
    parser.add_argument("--max_seq_len", type=int, default=512, help="tokens per training and validation window")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (AdamW)")
    parser.add_argument("--warmup_steps", type=int, default=50, help="linear warm-up steps")
    parser.add_argument("--dropout", type=float, default=0.1, help="dropout (decoder / transformer blocks)")
    parser.add_argument("--fm_dim", type=int, default=512, help="FM field width")
    parser.add_argument("--fm_hidden", type=int, default=112, help="FM decoder width")
    parser.add_argument("--fm_layers", type=int, default=3, help="FM decoder hidden layers")
    parser.add_argument("--deep_decays", default=DEEP_DECAYS,
                        help="decay time constants of the deep variants (ModelConfig.decays)")
    parser.add_argument("--deep_parameters", type=int, default=2_450_000,
                        help=f"parameter budget of the {DEEP_PREFIX}<layers>_<floats> variants")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default)")
    parser.add_argument("--tf_dim", type=int, default=96, help="transformer width")
    parser.add_argument("--tf_layers", type=int, default=4, help="transformer blocks")
    parser.add_argument("--tf_heads", type=int, default=4, help="transformer heads")
    parser.add_argument("--continuations", type=int, default=20, help="N for the continuation metrics")
    parser.add_argument("--prompt_tokens", type=int, default=64, help="prompt length for the continuations")
    parser.add_argument("--continuation_tokens", type=int, default=256, help="tokens generated per prompt")
    parser.add_argument("--val_fraction", type=float, default=0.1, help="share of files held out")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same for every variant)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where to run")
    parser.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                        help="autocast dtype (auto: bf16 where fast)")
    parser.add_argument("--cache_dir", default=None, help="token cache folder (default: model.training.corpus's)")
    parser.add_argument("--append", action="store_true",
                        help="add these variants' rows to an existing <out_dir>/study.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = resolve_precision(args.precision, device)
    cfg = TrainConfig(midi_dir=args.midi_dir, batch_size=args.batch_size, max_seq_len=args.max_seq_len,
                      lr=args.lr, warmup_steps=args.warmup_steps, val_fraction=args.val_fraction)
    corpus = load_corpus(args.midi_dir, cache_dir=args.cache_dir)
    train_files, val_files = corpus.split(args.val_fraction)
    tokenizer = Tokenizer().fit(f.events for f in train_files)
    train_seqs = [tokenizer.encode_events(f.events) for f in train_files]
    val_seqs = [tokenizer.encode_events(f.events) for f in val_files]
    train = [make_example(s, tokenizer) for s in train_seqs if len(s) >= cfg.min_seq_len]
    val = [make_example(s, tokenizer) for s in val_seqs]
    baselines = Baselines.fit([s.ids for s in train_seqs], tokenizer.vocab_size)
    uni, bi, count = baselines.nll([s.ids for s in val_seqs])
    hardware = (torch.cuda.get_device_name(device) if device.type == "cuda" else
                f"CPU, {torch.get_num_threads()} threads ({torch.backends.cpu.get_cpu_capability()})")
    result = {"settings": vars(args), "hardware": hardware, "precision": str(dtype).removeprefix("torch."),
              "train_files": len(train), "val_files": len(val), "vocab_size": tokenizer.vocab_size,
              "baselines": {"unigram_nll": uni / count, "bigram_nll": bi / count}, "variants": []}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.append and (out / "study.json").exists():
        earlier = json.loads((out / "study.json").read_text())
        result["variants"] = earlier["variants"]
        result["earlier_settings"] = earlier.get("earlier_settings", []) + [earlier["settings"]]
    logger.info("%d train files, %d validation files, vocabulary %d; unigram %.3f, bigram %.3f nats/token",
                len(train), len(val), tokenizer.vocab_size, uni / count, bi / count)

    for name in args.variants.split(","):
        torch.manual_seed(args.seed)
        model = build(name, args, tokenizer)
        model.set_vocabulary(tokenizer.vocab)
        model = model.to(device)
        logger.info("%s: %d parameters", name, model.parameter_count())
        trained = train_for(model, train, cfg, 60 * args.minutes, device, dtype,
                            np.random.default_rng(args.seed), desc=name)
        score = transformer_validation_loss if isinstance(model, CausalTransformer) else validation_loss
        val_nll = score(model, val, cfg, device, dtype)
        model.eval()
        served = model.to(dtype)
        capacity = args.prompt_tokens + args.continuation_tokens + 1
        generator = (TransformerGenerator(served, tokenizer, capacity=capacity)
                     if isinstance(model, CausalTransformer) else BatchGenerator(served, tokenizer))
        continuation = continuation_metrics(generator, val_seqs, args.continuations,
                                            prompt_tokens=args.prompt_tokens,
                                            tokens=args.continuation_tokens,
                                            sampling=SamplingConfig(key_pull=0.0))  # the model alone
        row = {"name": name, "parameters": model.parameter_count(),
               "config": asdict(model.config), "train": trained, "val_nll": val_nll,
               "continuation": continuation,
               "state_floats": {str(p): state_floats(model, p) for p in TIMED_POSITIONS},
               "step_ms": {str(p): step_cost_ms(served, p) for p in TIMED_POSITIONS}}
        result["variants"].append(row)
        logger.info("%s: val NLL %.4f after %d steps, %d tokens; distinctness %.2f, fidelity %.2f, "
                    "seed spread %.2f", name, val_nll, trained["steps"], trained["tokens"],
                    continuation["distinctness"], continuation["prompt_fidelity"], continuation["seed_spread"])
        (out / "study.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / "study.md").write_text(markdown_table(result) + "\n")
    print(markdown_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
