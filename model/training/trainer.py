"""The trainer: a Field Machine trained on a folder of MIDI files (``python -m model.train``).

Files are split deterministically into training and validation sets (``val_fraction``); the
tokenizer's vocabulary and the unigram/bigram baselines are fitted on the training files only.
Checkpoints go to the run folder (:mod:`model.training.run_folder`): ``latest`` (resume target),
``best`` (lowest validation loss), one per epoch, and timed ones every ``save_minutes``.
Training resumes from ``latest`` unless ``fresh``; Ctrl-C saves ``latest`` and stops.
Under ``torchrun`` the ranks share each step's batch (:mod:`model.training.distributed`).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from model.checkpoint import format as ckpt
from model.checkpoint.atomic import write_json
from model.checkpoint.files import CheckpointError
from model.evaluation.baselines import Baselines
from model.fm.config import ModelConfig
from model.fm.loss import mean_losses, sequence_loss, sequence_loss_sums
from model.fm.machine import FieldMachine
from model.fm.state import FMOutput
from model.runtime.device import resolve_precision
from model.tokenizer.tokenizer import Tokenizer
from model.tokenizer.vocabulary import TokenShape
from model.training.batches import Example, collate, make_example, windows
from model.training.corpus import load_corpus
from model.training.distributed import Ranks, ranks_from_environment
from model.training.key_teacher import KeyTeacher, KeyTeacherSettings
from model.training.run_folder import RUN_STATS_FILE, TRAINER_FILES, append_log_row, checkpoint_dirs

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Every training setting (the model's live in :class:`model.fm.config.ModelConfig`)."""

    midi_dir: str = field(metadata={"help": "folder of MIDI files (searched recursively)"})
    out_dir: str = field(default="runs/fm", metadata={"help": "folder for checkpoints and logs"})
    epochs: int = field(default=100, metadata={"help": "passes over the training files"})
    batch_size: int = field(default=8, metadata={
        "help": "sequences (windows) per step; under torchrun the global batch, shared out among the processes"})
    lr: float = field(default=3e-4, metadata={"help": "peak learning rate (AdamW)"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "gradient norm clip (0 = off)"})
    warmup_steps: int = field(default=200, metadata={"help": "linear warm-up steps (at most a tenth of the run), then cosine decay"})
    min_seq_len: int = field(default=8, metadata={"help": "files with fewer tokens are left out"})
    max_seq_len: int = field(default=2048, metadata={
        "help": "longest training window in tokens; longer files are cut into windows"})
    val_fraction: float = field(default=0.1, metadata={"help": "share of files held out for validation"})
    save_steps: int = field(default=500, metadata={"help": "save latest every N steps"})
    save_minutes: float = field(default=30.0, metadata={"help": "timed checkpoint every N minutes (0 = off)"})
    print_steps: int = field(default=10, metadata={"help": "log a row to training_log.csv every N steps"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda", "choices": ("auto", "cpu", "cuda")})
    precision: str = field(default="auto", metadata={
        "help": "auto (bf16 on CUDA and on CPUs with AVX-512, else fp32), bf16 or fp32",
        "choices": ("auto", "bf16", "fp32")})
    seed: int = field(default=0, metadata={"help": "random seed"})
    retokenize: bool = field(default=False, metadata={"help": "ignore the token cache and re-read every file"})
    fresh: bool = field(default=False, metadata={"help": "ignore an existing checkpoint and start clean"})
    init_from: str = field(default="", metadata={
        "help": "start a new run from this checkpoint's weights and tokenizer (a fresh optimizer and step "
                "count); its model settings hold, except the ones this run may add or change (--voice_register, "
                "--chord_voices, --dropout, --field_dropout, --learn_decays, --conv); weights it lacks start at their initial values"})
    cache_dir: str = field(default="", metadata={"help": "token cache folder (default: model.training.corpus's)"})
    max_minutes: float = field(default=0.0, metadata={"help": "stop after this many minutes (0 = no limit); the cosine decay then follows the clock"})
    transpose: int = field(default=0, metadata={
        "help": "augmentation: every epoch plays each training file transposed by a random shift "
                "in -N..+N semitones (0 = off); the vocabulary is fitted on every shift, validation "
                "files stay as written"})
    trainable: str = field(default="", metadata={
        "help": "train only the parameters whose names start with one of these comma-separated prefixes "
                "(e.g. note_head: fit a head added with --init_from while the rest stays exactly as it was, "
                "which also skips the backward pass through the body); empty = every parameter"})
    learn_key_pull: float = field(default=0.0, metadata={
        "help": "learn the key pull on the model's own continuations (model.training.key_teacher): every step "
                "the model also continues --rollout_streams training prompts alone and is trained toward the "
                "--init_from checkpoint's choices there, pulled toward each prompt's pitch classes with this "
                "strength (0 = off; needs --init_from; one process)"})
    rollout_streams: int = field(default=8, metadata={"help": "--learn_key_pull: prompts continued per step"})
    rollout_prompt_tokens: int = field(default=64, metadata={"help": "--learn_key_pull: tokens per prompt"})
    rollout_tokens: int = field(default=256, metadata={"help": "--learn_key_pull: tokens per continuation"})


# Model settings that come from the tokenizer (its TokenShape), never from flags.
MODEL_FLAGS_FROM_DATA = tuple(f.name for f in fields(TokenShape))
# Model settings a run started --init_from a checkpoint takes from its flags: parts it adds, or
# settings that change no weight's shape.
INIT_FLAGS = ("voice_register", "chord_voices", "dropout", "field_dropout", "learn_decays", "conv")


def lr_at(step: int, total: int, cfg: TrainConfig, time_fraction: float = 0.0) -> float:
    """Linear warm-up (over at most a tenth of the run), then cosine decay to a tenth of ``lr``.

    ``time_fraction`` (elapsed / ``max_minutes``) moves the decay on when the clock, not the
    epochs, will end the run, so a time-limited run still ends at the low learning rate.
    """
    warmup = max(1, min(cfg.warmup_steps, total // 10))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = min(1.0, max((step - warmup) / max(1, total - warmup), time_fraction))
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def trainable_parameters(model: nn.Module, prefixes: str) -> list[nn.Parameter]:
    """The parameters ``--trainable`` names (comma-separated name prefixes; empty: all); the others
    stop requiring gradients. A prefix that names no parameter is a ``ValueError``."""
    wanted = [p.strip() for p in prefixes.split(",") if p.strip()]
    if not wanted:
        return list(model.parameters())
    unknown = [p for p in wanted if not any(name.startswith(p) for name, _ in model.named_parameters())]
    if unknown:
        tops = sorted({name.split(".")[0] for name, _ in model.named_parameters()})
        raise ValueError(f"--trainable {', '.join(unknown)}: no parameter of this model starts so "
                         f"(its parts: {', '.join(tops)})")
    chosen = []
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(any(name.startswith(p) for p in wanted))
        if parameter.requires_grad:
            chosen.append(parameter)
    return chosen


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision for ``dtype`` (off for float32)."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def batch_losses(model: torch.nn.Module, out: FMOutput, batch: dict[str, torch.Tensor]
                 ) -> dict[str, torch.Tensor]:
    """:func:`model.fm.loss.sequence_loss` of a :func:`collate` batch."""
    return sequence_loss(model, out, batch["targets"], batch["velocity"], batch["voice"], batch["mask"],
                         batch["is_note"], batch["dna"], batch["chords"])


def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss: torch.Tensor,
                   grad_clip: float) -> torch.Tensor:
    """Backpropagate ``loss``, clip the gradient norm (``grad_clip`` 0: off), step; the norm."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = (torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
                 if grad_clip > 0 else torch.zeros(()))
    optimizer.step()
    return grad_norm


class BatchLoss(nn.Module):
    """A model and its loss as one module: a :func:`collate` batch -> the loss sums and counts of
    :func:`model.fm.loss.sequence_loss_sums`. Under torchrun this is what DDP wraps, so the note
    head, which the loss runs, is inside the wrapped forward like the rest of the model."""

    def __init__(self, model: FieldMachine) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = self.model(batch["dna"], batch["slots"])
        return sequence_loss_sums(self.model, out, batch["targets"], batch["velocity"], batch["voice"],
                                  batch["mask"], batch["is_note"], batch["dna"], batch["chords"])


LOSS_SUMS = ("token", "velocity", "voice")


def train_step(loss: nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor],
               *, lr: float, grad_clip: float, device: torch.device, dtype: torch.dtype,
               ranks: Ranks | None = None, extra_loss: Callable[[], torch.Tensor] | None = None
               ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One optimizer step at learning rate ``lr`` on ``batch``, this process's share of the step's
    global batch (all of it in one process): the global batch's losses (``token``, ``velocity``,
    ``voice``, ``total``, and its count of targets, ``tokens``) and the gradient norm.

    ``loss`` is a :class:`BatchLoss`, wrapped in DDP under torchrun (:meth:`Ranks.wrap`). Its sums
    are divided by the global batch's counts (all-reduced first, so ranks may hold different
    numbers of tokens) and multiplied by the number of ranks, as DDP averages the ranks'
    gradients: the gradient is that of the mean over all the global batch's tokens, the one a
    single process holding the whole batch computes.

    ``extra_loss`` (one process only): a second loss added before the backward pass (the key
    teacher's, :mod:`model.training.key_teacher`), shown as ``key``.
    """
    ranks = ranks or Ranks.one_process(device)
    for group in optimizer.param_groups:
        group["lr"] = lr
    mask = batch["mask"]
    tokens, notes = ranks.sum(torch.stack((mask.sum(), (mask & batch["is_note"]).sum())))
    with autocast(device, dtype):
        sums = loss(batch)
    losses = mean_losses(sums, tokens, notes)
    extra = extra_loss() if extra_loss is not None else None
    total = losses["total"] * ranks.world_size + (0 if extra is None else extra)
    grad_norm = optimizer_step(loss, optimizer, total, grad_clip)
    totals = ranks.sum(torch.stack([sums[k].detach() for k in LOSS_SUMS]))
    shown = mean_losses(dict(zip(LOSS_SUMS, totals)), tokens, notes) | {"tokens": tokens}
    return shown | ({} if extra is None else {"key": extra.detach()}), grad_norm


@torch.no_grad()
def validation_loss(model: FieldMachine, examples: list[Example], cfg: TrainConfig,
                    device: torch.device, dtype: torch.dtype, ranks: Ranks | None = None) -> float | None:
    """Mean next-token NLL (nats/token) over every validation token, in windows of
    ``cfg.max_seq_len``. Under torchrun each rank scores its share of the batches and the sums are
    all-reduced: every rank gets the figure of all of them."""
    if not examples:
        return None
    ranks = ranks or Ranks.one_process(device)

    def scored():  # one batch's outputs at a time
        for spans in ranks.shard(validation_spans(examples, cfg)):
            batch = collate(examples, spans, device)
            with autocast(device, dtype):
                yield model(batch["dna"], batch["slots"]), batch

    model.eval()
    total, count = ranks.sum_floats(*token_loss_sums(model, scored()))
    model.train()
    return total / count


def validation_spans(examples: list[Example], cfg: TrainConfig) -> list[list[tuple[int, int, int]]]:
    """The validation windows (no random offset), ``cfg.batch_size`` to a batch."""
    spans = windows(examples, cfg.max_seq_len, None)
    return [spans[k:k + cfg.batch_size] for k in range(0, len(spans), cfg.batch_size)]


def mean_token_loss(model: torch.nn.Module, scored: Iterable[tuple[FMOutput, dict[str, torch.Tensor]]]) -> float:
    """Mean next-token NLL (nats/token) over every real target of ``(outputs, batch)`` pairs."""
    total, count = token_loss_sums(model, scored)
    return total / count


def token_loss_sums(model: torch.nn.Module, scored: Iterable[tuple[FMOutput, dict[str, torch.Tensor]]]
                    ) -> tuple[float, int]:
    """Summed next-token NLL (nats) over every real target of ``(outputs, batch)`` pairs, and their count."""
    total, count = 0.0, 0
    for out, batch in scored:
        n = int(batch["mask"].sum())
        if n:
            total += batch_losses(model, out, batch)["token"].item() * n
        count += n
    return total, count


class Trainer:
    """Owns the run: data, model, optimizer, schedule, checkpoints and the progress display.

    ``ranks`` (default: torchrun's environment, else this one process) says which share of each
    step this process trains on and whether it is rank 0, the one that saves, logs and shows
    progress (:mod:`model.training.distributed`).
    """

    def __init__(self, cfg: TrainConfig, model_flags: dict, ranks: Ranks | None = None) -> None:
        self.cfg = cfg
        self.ranks = ranks or ranks_from_environment(cfg.device)
        self.out = Path(cfg.out_dir)
        self.dirs = checkpoint_dirs(self.out)
        self.device = self.ranks.device
        self.dtype = resolve_precision(cfg.precision, self.device)
        torch.manual_seed(cfg.seed)
        self.rng = np.random.default_rng(cfg.seed)  # the same on every rank: the same batches

        corpus = load_corpus(cfg.midi_dir, cache_dir=cfg.cache_dir or None,
                             use_cache=not cfg.retokenize, progress=self.ranks.is_main)
        for path, reason in corpus.skipped:
            logger.warning("skipped %s: %s", path, reason)
        train_files, val_files = corpus.split(cfg.val_fraction)
        resume = None if cfg.fresh else self._resume_point()
        start = ckpt.load_checkpoint(cfg.init_from) if cfg.init_from and resume is None else None
        if resume is not None:
            self.tokenizer = resume.tokenizer
            self.model_config = ModelConfig(**resume.model_config)
        elif start is not None:
            self.tokenizer = start.tokenizer
            self.model_config = ModelConfig(**{**start.model_config, **{k: model_flags[k] for k in INIT_FLAGS}})
        else:
            self.tokenizer = Tokenizer().fit(
                events for f in train_files for events in f.events.transpositions(cfg.transpose))
            self.model_config = ModelConfig(**asdict(self.tokenizer.shape), **model_flags)
        encode = self.tokenizer.encode_events
        train_seqs = [encode(f.events) for f in train_files]
        # Per training file, the example as written first, then its transpositions (--transpose).
        self.variants = [[make_example(s, self.tokenizer)]
                         + [make_example(encode(t), self.tokenizer) for t in f.events.transpositions(cfg.transpose)[1:]]
                         for f, s in zip(train_files, train_seqs) if len(s) >= cfg.min_seq_len]
        self.train = [v[0] for v in self.variants]
        self.val = [make_example(encode(f.events), self.tokenizer) for f in val_files]
        self.val_files = [f.path for f in val_files]
        self.baselines = Baselines.fit([s.ids for s in train_seqs], self.tokenizer.vocab_size)
        logger.info("files: %d train (%d with transpositions), %d validation, %d skipped; vocabulary %d",
                    len(self.train), sum(map(len, self.variants)), len(self.val), len(corpus.skipped),
                    self.tokenizer.vocab_size)

        self.model = FieldMachine(self.model_config).to(self.device)
        self.model.set_vocabulary(self.tokenizer.vocab)  # a resumed state_dict holds the same
        self.optimizer = torch.optim.AdamW(trainable_parameters(self.model, cfg.trainable), lr=cfg.lr,
                                           weight_decay=cfg.weight_decay)
        self.step, self.epoch, self.best = 0, 0, math.inf
        if resume is not None:
            ckpt.check_state_dict(self.model, resume.state_dict, resume.path)
            self.model.load_state_dict(resume.state_dict)
            state = ckpt.load_optimizer_state(resume.path)
            if state is not None:
                self.optimizer.load_state_dict(state)
            self.step, self.epoch = resume.step, resume.epoch
            best = ckpt.load_checkpoint(self.dirs.best) if self.dirs.best.exists() else None
            self.best = best.val_loss if best and best.val_loss is not None else math.inf
            logger.info("resumed from %s at step %d, epoch %d", resume.path, self.step, self.epoch)
        elif start is not None:
            self._init_weights(start)
        if not self.ranks.same(self.step, self.epoch, self.tokenizer.vocab_size):
            raise CheckpointError(f"{self.dirs.latest}: the ranks did not all find the same checkpoint to "
                                  "resume from; every rank reads --out_dir, which on several machines must "
                                  "be one shared folder")
        if self.ranks.distributed:  # the same weights everywhere (DDP checks), dropout of its own
            torch.manual_seed(cfg.seed + self.ranks.rank)
        self.key_teacher = self._key_teacher(train_seqs) if cfg.learn_key_pull else None
        self.batch_loss = self.ranks.wrap(BatchLoss(self.model))
        self.steps_per_epoch = math.ceil(len(windows(self.train, cfg.max_seq_len, None)) / cfg.batch_size)
        self.total_steps = self.steps_per_epoch * cfg.epochs

    def _init_weights(self, start: ckpt.Checkpoint) -> None:
        """The weights of ``start`` (``--init_from``); the model's own new parts keep their initial values."""
        expected = self.model.state_dict()
        kept = {k: v for k, v in start.state_dict.items() if k in expected}
        ckpt.check_state_dict(self.model, {**expected, **start.state_dict}, start.path)  # no stray or reshaped weight
        self.model.load_state_dict({**expected, **kept})
        added = sorted(expected.keys() - start.state_dict.keys())
        logger.info("weights from %s (step %d); new: %s", start.path, start.step, ", ".join(added) or "none")

    def _key_teacher(self, sequences: list) -> KeyTeacher:
        """``--learn_key_pull``: the ``--init_from`` checkpoint, frozen, as the teacher."""
        cfg = self.cfg
        if cfg.learn_key_pull < 0:
            raise ValueError(f"--learn_key_pull must be 0 (off) or above, not {cfg.learn_key_pull}")
        if not cfg.init_from:
            raise ValueError("--learn_key_pull needs --init_from: the checkpoint whose choices, pulled toward "
                             "the prompt's key, the model learns")
        if self.ranks.distributed:
            raise ValueError("--learn_key_pull runs in one process; start it without torchrun")
        teacher, tokenizer, _ = ckpt.load_model(cfg.init_from, device=self.device)
        if tokenizer.vocab != self.tokenizer.vocab:
            raise ValueError(f"--learn_key_pull: {cfg.init_from} has another vocabulary than this run")
        settings = KeyTeacherSettings(cfg.learn_key_pull, cfg.rollout_streams, cfg.rollout_prompt_tokens,
                                      cfg.rollout_tokens)
        return KeyTeacher(self.model, teacher, self.tokenizer, sequences, settings,
                          np.random.default_rng(cfg.seed + 1))

    def _resume_point(self) -> ckpt.Checkpoint | None:
        if not self.dirs.latest.exists():
            return None
        return ckpt.load_checkpoint(self.dirs.latest)

    def save(self, directory: Path, val_loss: float | None) -> None:
        """Save a checkpoint to ``directory`` (rank 0 only)."""
        if not self.ranks.is_main:
            return
        ckpt.save_checkpoint(
            directory, model=self.model, model_config=self.model_config, tokenizer=self.tokenizer,
            step=self.step, epoch=self.epoch, val_loss=val_loss, train_config=self.cfg,
            optimizer=self.optimizer, extras=self.baselines.to_tensors(), keep=TRAINER_FILES)

    def run(self) -> dict:
        cfg = self.cfg
        started = time.perf_counter()
        last_timed = started
        tokens_seen = 0
        val = None
        interrupted = False
        ranks = self.ranks
        bar = tqdm(total=self.total_steps, initial=self.step, unit="step", dynamic_ncols=True,
                   desc="training", disable=None if ranks.is_main else True)
        self.model.train()
        try:
            while self.epoch < cfg.epochs:
                examples = self.epoch_examples()
                spans = windows(examples, cfg.max_seq_len, self.rng)
                order = self.rng.permutation(len(spans))
                for k in range(0, len(order), cfg.batch_size):
                    # this rank's share of the step's global batch (all of it in one process)
                    batch = collate(examples, ranks.shard([spans[j] for j in order[k:k + cfg.batch_size]]),
                                    self.device)
                    time_fraction = (ranks.agree(time.perf_counter() - started) / (60 * cfg.max_minutes)
                                     if cfg.max_minutes else 0.0)
                    losses, grad_norm = train_step(
                        self.batch_loss, self.optimizer, batch,
                        lr=lr_at(self.step, self.total_steps, cfg, time_fraction),
                        grad_clip=cfg.grad_clip, device=self.device, dtype=self.dtype, ranks=ranks,
                        extra_loss=self._key_loss if self.key_teacher else None)
                    self.step += 1
                    tokens_seen += int(losses["tokens"])
                    elapsed = time.perf_counter() - started
                    rate = tokens_seen / max(elapsed, 1e-9)
                    bar.update(1)
                    key = {"key": f"{losses['key'].item():.3f}"} if "key" in losses else {}
                    bar.set_postfix(epoch=self.epoch + 1, loss=f"{losses['token'].item():.3f}", **key,
                                    val="-" if val is None else f"{val:.3f}", tok_s=f"{rate:,.0f}")
                    if self.step % cfg.print_steps == 0 and ranks.is_main:
                        append_log_row(self.out, {
                            "step": self.step, "epoch": self.epoch + 1, "loss": round(losses["token"].item(), 5),
                            "velocity_loss": round(losses["velocity"].item(), 5),
                            "voice_loss": round(losses["voice"].item(), 5),
                            **({"key_loss": round(losses["key"].item(), 5)} if "key" in losses else {}),
                            "val_loss": "" if val is None else round(val, 5),
                            "lr": f"{self.optimizer.param_groups[0]['lr']:.3e}",
                            "grad_norm": round(float(grad_norm), 4), "tokens_per_s": round(rate),
                            "elapsed_s": round(elapsed, 1)})
                    if self.step % cfg.save_steps == 0:
                        self.save(self.dirs.latest, val)
                    if cfg.save_minutes > 0 and time.perf_counter() - last_timed > 60 * cfg.save_minutes:
                        self.save(self.dirs.timed(), val)
                        last_timed = time.perf_counter()
                    # Every rank stops at the same step: on a signal to any (KeyboardInterrupt), or
                    # when rank 0's clock says time is up.
                    shared_elapsed = ranks.agree(elapsed)
                    if cfg.max_minutes and shared_elapsed > 60 * cfg.max_minutes:
                        raise TimeoutError
                self.epoch += 1
                val = validation_loss(self.model, self.val, cfg, self.device, self.dtype, ranks)
                self._end_of_epoch(val)
        except KeyboardInterrupt:
            interrupted = True
            logger.warning("interrupted: saving %s", self.dirs.latest)
        except TimeoutError:
            logger.warning("--max_minutes reached: stopping")
            val = validation_loss(self.model, self.val, cfg, self.device, self.dtype, ranks)
            self._end_of_epoch(val, per_epoch=False)
        finally:
            bar.close()
        self.save(self.dirs.latest, val)
        stats = {"steps": self.step, "epochs": self.epoch, "val_loss": val,
                 "best_val_loss": None if math.isinf(self.best) else self.best,
                 "seconds": round(time.perf_counter() - started, 1), "tokens": tokens_seen,
                 "tokens_per_s": round(tokens_seen / max(time.perf_counter() - started, 1e-9)),
                 "parameters": self.model.parameter_count(), "device": str(self.device),
                 "precision": str(self.dtype).removeprefix("torch."),
                 "train_files": len(self.train), "val_files": self.val_files,
                 "vocab_size": self.tokenizer.vocab_size, "interrupted": interrupted,
                 "model": asdict(self.model_config), "processes": ranks.world_size}
        if ranks.is_main:
            write_json(self.out / RUN_STATS_FILE, stats)
        ranks.barrier()  # no rank leaves (torchrun would stop the rest) before rank 0 has saved
        return stats

    def _key_loss(self) -> torch.Tensor:
        return self.key_teacher.loss(lambda: autocast(self.device, self.dtype))

    def epoch_examples(self) -> list[Example]:
        """One example per training file for this epoch: a random one of its transpositions."""
        return [v[int(self.rng.integers(len(v)))] if len(v) > 1 else v[0] for v in self.variants]

    def _end_of_epoch(self, val: float | None, per_epoch: bool = True) -> None:
        if per_epoch:
            self.save(self.dirs.epoch(self.epoch), val)
        if val is not None and val < self.best:
            self.best = val
            self.save(self.dirs.best, val)
        logger.info("epoch %d: validation loss %s", self.epoch, "-" if val is None else f"{val:.4f}")
