"""The batching engine: one thread owns the model and advances every stream that needs music.

Who owns what:

* The **engine thread** (``fm-engine``, started by :meth:`Engine.start`) is the only code that
  touches the model, the state slab and the streams' decoders. Each turn of its loop it
  1. runs the commands sessions queued (open a stream, fold played notes in, close a stream),
  2. reads pending input (prompts, played notes) in chunks of at most ``input_chunk`` tokens, so a
     long prompt never holds up the other streams for long,
  3. **schedules**: asks :class:`server.scheduler.Scheduler` which streams need tokens now,
  4. **chooses** every scheduled stream's next token from its row of the slab (:meth:`Engine._execute`:
     :meth:`BatchGenerator.choose`, different positions, temperatures and seeds in one batch),
  5. **updates** the streams (:meth:`Engine._update`: their time, the live-stream policy) and
     hands each its new notes on the event loop (``loop.call_soon_threadsafe``). It never waits
     for a client.
  6. **reads** the chosen tokens: one batched O(1) model step (:meth:`Engine._read_chosen`:
     :meth:`BatchGenerator.feed`) writes the rows back. The notes left before it, so the step
     never delays them.
* The **event loop** (sessions, endpoints) talks to the engine only through :meth:`Engine.open`,
  :meth:`Engine.feed` and :meth:`Engine.release`, which queue a command and await its future. It
  may swap a stream's immutable ``sampling`` and ``timeline`` and flip ``paused``; the engine
  reads them at its next step.

A failed step fails exactly the streams in it: each gets ``on_error`` and is never scheduled
again, so no session hangs and the others carry on.

State: one row per stream in a preallocated slab (``capacity`` rows): the field and position
(:class:`model.fm.state.FieldState`), the 12 pitch-class counts of what the stream heard from its player
(prompt and played notes, which ``key_pull`` leans toward: :mod:`model.generation.key_pull`), plus the
model's output for the stream's next token. Its size never changes with a session's length.

Answers (live streams): a played note must change the music from the last note the client has
been *sent*, not after everything already generated. So each live stream keeps a rollback point
(:mod:`server.rollback`): a second slab row with the field, position and heard counts at a
*checkpoint*, the decoder and RNG step there, and the short log of tokens read since. When played
notes arrive, the generated tokens after the latest sent note are dropped and the state goes back
to the one after that note: a copy, when it is among the stream's recent states; else the
checkpoint, with the kept tokens read again in one parallel pass. Then the played notes are read
and generation goes on from there (its notes start no earlier than ``lookahead`` from now, so none
is late). The checkpoint moves forward (:meth:`Engine._fold`) once enough sent tokens have piled up.
The token after played notes is the answer: a note that starts by the lookahead (plus
``ANSWER_MARGIN``) from then, or with the played notes (``Stream.answer_by``, the generator's
answer mask).

Snapshots (:mod:`server.snapshot`): :meth:`Engine.capture` copies a live stream's rows now and at its
checkpoint, its decoders, log and last tokens; :meth:`Engine.restore` puts them in a free row exactly
as they were (the same checkpoint), or reads the last tokens again from an empty field (another one).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from model.fm.machine import FieldMachine
from model.fm.state import FieldState, FMOutput
from model.generation.generator import BatchGenerator, StreamStep, decoder_for, with_bos
from model.generation.key_pull import PITCH_CLASSES
from model.sampling.config import SamplingConfig
from model.timebase import Timeline
from model.tokenizer.portable import from_first_bar, from_portable, to_portable
from model.tokenizer.stream import StreamDecoder
from model.tokenizer.vocabulary import TokenizerError
from model.tokenizer.tokenizer import Tokenizer
from model.tokenizer.sequences import TokenSequence
from model.tokenizer.voice_register import REGISTER_FLOATS
from server.metrics import Metrics
from server.rollback import (FOLD_TOKENS, MAX_LOG, PLAYED, RECENT_STATES, Checkpoint, LoggedToken, RecentState,
                             RecentStates, Replayed, kept_prefix, played_ids, replay)
from server.snapshot import ROW_NAMES, Place, SnapshotError, StreamSnapshot
from server.scheduler import Scheduler

logger = logging.getLogger(__name__)


HISTORY_TOKENS = 512  # the last tokens a stream keeps for its snapshots (re-read into another checkpoint)
ANSWER_MARGIN = 0.02  # seconds: an answer starts this much after its lookahead from now (hand-over time)


class EngineFull(RuntimeError):
    """Every row of the state slab is taken."""


class EngineClosed(RuntimeError):
    """The engine has stopped."""


@dataclass(frozen=True)
class StreamNote:
    """A note on a stream's timeline: a generated note the engine hands over, or a played note
    folded in. ``beat`` counts beats from the stream's beat 0 (where its prompt ends).

    A generated note also says which token it was (``step``: the stream's token counter when it was
    sampled), which rollback ``epoch`` of the stream produced it, and ``heard_until``: the value the
    session gave with the latest played notes read before it was sampled (None: none)."""

    beat: float
    duration: float  # beats
    pitch: int
    velocity: int
    voice: int
    step: int = -1
    epoch: int = 0
    heard_until: float | None = None


@dataclass(frozen=True)
class Fed:
    """What :meth:`Engine.feed` did: tokens the played notes became, notes left out (no token in
    the vocabulary), and the stream's rollback epoch now (it grew by one if the stream went back to
    its latest sent note: every note of an older epoch after that note is void)."""

    tokens: int
    unknown: int
    epoch: int


@dataclass(eq=False)
class Stream:
    """One generation stream: a WebSocket session or a ``POST /generate`` job.

    The event loop may replace ``sampling``, ``timeline`` and ``banned_voices``, set ``paused``, and
    raise ``sent_step`` (the step of the latest note handed to the client); everything else
    belongs to the engine thread.
    """

    id: int
    realtime: bool
    sampling: SamplingConfig
    timeline: Timeline
    sink: Callable[[list[StreamNote]], None]  # called on the event loop
    on_error: Callable[[str], None]  # called on the event loop, once
    on_done: Callable[[], None] | None = None  # jobs: called on the event loop when remaining hits 0
    remaining: int = 0  # jobs: tokens still to generate
    paused: bool = False
    lookahead: float = 0.0  # seconds: after a rollback, no note starts earlier than this from now
    banned_voices: tuple[int, ...] = ()  # voices the model never plays on this stream (accompaniment)
    sent_step: int = -1  # step of the latest generated note handed to the client (-1: none)
    # engine-owned
    slot: int = -1
    decoder: StreamDecoder | None = None
    offset: float = 0.0  # beats: the decoder time of the stream's beat 0
    clock: float = 0.0  # unix time of session second 0 (set when the prompt has been read)
    primed: bool = False
    failed: bool = False
    closed: bool = False
    steps: int = 0  # tokens sampled so far (with the seed, fixes the stream's randomness)
    frontier: float = 0.0  # beats: onset of the latest token
    unknown_played: int = 0  # played notes the vocabulary could not hold
    epoch: int = 0  # rollbacks so far
    heard_until: float | None = None  # the session's mark of the latest played notes read
    answer_by: int | None = None  # grid step (decoder timeline) its next note must start by: an answer
    checkpoint: Checkpoint | None = None  # live streams, once the prompt is read
    log: list[LoggedToken] = field(default_factory=list)  # tokens read after the checkpoint
    recent: RecentStates = field(default_factory=RecentStates)  # states after its latest reads (server.rollback)
    history: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), np.int64))  # tokens before it (snapshots)
    restored: bool = False  # put back from a snapshot: keeps its clock and checkpoint once primed
    pending: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)  # DNA chunks to read
    ready_future: asyncio.Future | None = None

    @property
    def ready(self) -> bool:
        return self.primed and not self.pending and not self.closed

    def deadline(self) -> float:
        """Unix time at which the music generated so far runs out."""
        return self.clock + self.timeline.seconds(self.frontier)


class Engine:
    def __init__(self, model: FieldMachine, tokenizer: Tokenizer, *, capacity: int, max_batch: int,
                 lookahead: float, generate_ahead: float, metrics: Metrics | None = None,
                 input_chunk: int = 256, rollback: bool = True, recent_states: int = RECENT_STATES) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.generator = BatchGenerator(model, tokenizer)
        self.device = self.generator.device
        self.timebase = tokenizer.timebase
        self.capacity = capacity
        self.lookahead = lookahead
        self.scheduler = Scheduler(max_batch=max_batch, horizon=lookahead + generate_ahead)
        self.metrics = metrics or Metrics()
        self.input_chunk = input_chunk
        self.rollback = rollback  # live streams answer from their latest sent note (else after all generated)
        if recent_states < 0:
            raise ValueError(f"recent_states must be >= 0, not {recent_states}")
        self.recent_states = recent_states if rollback else 0  # per live stream (server.rollback.RecentStates)
        self.streams: dict[int, Stream] = {}
        self._ids = itertools.count(1)
        self._free = list(range(capacity - 1, -1, -1))
        self._input_turn = 0
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.error: BaseException | None = None
        self._allocate_slab()

    # ------------------------------------------------------------------ slab
    @torch.no_grad()
    def _allocate_slab(self) -> None:
        """Rows for ``capacity`` streams, shaped after the model's own output for one token."""
        probe_dna, probe_slots = self.tokenizer.token_dna.of_tokens(
            np.array([1]), np.zeros(1, np.int64), np.zeros(1, np.int64),
            np.array([self.tokenizer.default_bar_length]), np.zeros((1, REGISTER_FLOATS), np.float32))
        state, out = self.generator.read(None, probe_dna[None], probe_slots[None])
        n = self.capacity
        self.field = torch.zeros((n, state.field.shape[-1]), dtype=state.field.dtype, device=self.device)
        self.position = torch.zeros(n, dtype=torch.int64, device=self.device)
        self.logits = torch.zeros((n, out.logits.shape[-1]), dtype=out.logits.dtype, device=self.device)
        self.hidden = torch.zeros((n, out.hidden.shape[-1]), dtype=out.hidden.dtype, device=self.device)
        self.heard = torch.zeros((n, PITCH_CLASSES), dtype=torch.float32, device=self.device)
        # the rollback checkpoint of each live stream (server.rollback)
        self.saved_field = torch.zeros_like(self.field)
        self.saved_position = torch.zeros_like(self.position)
        self.saved_heard = torch.zeros_like(self.heard)
        self.saved_logits = torch.zeros_like(self.logits)  # the output there (a snapshot goes on from it)
        self.saved_hidden = torch.zeros_like(self.hidden)
        self.state_bytes = self.field[0].nbytes + self.position[0].nbytes + self.heard[0].nbytes
        recent_state = self.field[0].nbytes + self.position[0].nbytes + self.hidden[0].nbytes
        self.rollback_bytes = (sum(getattr(self, f"saved_{name}")[0].nbytes for name in ROW_NAMES)
                               + self.recent_states * recent_state)  # at most
        self.slot_bytes = self.state_bytes + self.logits[0].nbytes + self.hidden[0].nbytes
        self.metrics.state_bytes.set(self.state_bytes)
        self.metrics.slot_bytes.set(self.slot_bytes)
        self.metrics.rollback_bytes.set(self.rollback_bytes)

    def _rows(self, slots: torch.Tensor) -> tuple[FieldState, FMOutput]:
        return (FieldState(self.field[slots], self.position[slots]),
                FMOutput(self.logits[slots], self.hidden[slots]))

    def _store(self, slots: torch.Tensor, state: FieldState, out: FMOutput) -> None:
        self.field[slots] = state.field.to(self.field.dtype)
        self.position[slots] = state.position
        self.logits[slots] = out.logits.to(self.logits.dtype)
        self.hidden[slots] = out.hidden.to(self.hidden.dtype)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the engine thread; call from the event loop that will receive the results."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="fm-engine", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    # ------------------------------------------------------------------ event-loop side
    async def _call(self, fn: Callable, *args):
        if not self.running:
            raise EngineClosed("the generation engine is not running")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._commands.put((fn, args, future))
        self._wake.set()
        return await future

    async def open(self, prompt: TokenSequence | None, *, sampling: SamplingConfig, timeline: Timeline,
                   realtime: bool, sink: Callable[[list[StreamNote]], None],
                   on_error: Callable[[str], None], tokens: int = 0,
                   on_done: Callable[[], None] | None = None, lookahead: float | None = None,
                   banned_voices: tuple[int, ...] = ()) -> Stream:
        """Start a stream from ``prompt`` and wait until the prompt has been read.

        Live streams get their ``clock`` then (the engine's ``lookahead`` seconds from now);
        ``lookahead`` is the stream's own (its session's; default the engine's). Raises
        :class:`EngineFull` when every slab row is taken.
        """
        stream = Stream(id=next(self._ids), realtime=realtime, sampling=sampling, timeline=timeline,
                        sink=sink, on_error=on_error, on_done=on_done, remaining=tokens,
                        lookahead=self.lookahead if lookahead is None else lookahead,
                        banned_voices=banned_voices)
        stream.ready_future = asyncio.get_running_loop().create_future()
        await self._call(self._open, stream, prompt)
        await stream.ready_future
        return stream

    async def feed(self, stream: Stream, notes: list[StreamNote], heard_until: float | None = None) -> Fed:
        """Fold played notes into a stream (see :class:`Fed`).

        A live stream goes back to its latest sent note first (``stream.sent_step``; the caller
        holds its sending until this returns) and reads the notes there; the notes it generates
        from then on carry ``heard_until``."""
        return await self._call(self._feed, stream, notes, heard_until)

    async def capture(self, stream: Stream) -> StreamSnapshot:
        """Where a live stream stands, for a snapshot (raises :class:`SnapshotError` before its
        prompt has been read)."""
        return await self._call(self._capture, stream)

    async def restore(self, snapshot: StreamSnapshot, *, same_model: bool, sampling: SamplingConfig,
                      timeline: Timeline, sink: Callable[[list[StreamNote]], None],
                      on_error: Callable[[str], None], lookahead: float | None = None,
                      banned_voices: tuple[int, ...] = ()) -> Stream:
        """A live stream put back where ``snapshot`` stands, paused, and wait until it is ready.

        ``same_model``: the snapshot comes from this checkpoint, so its field rows go back as they
        were; otherwise its last tokens are read again from an empty field (portable tokens: any
        vocabulary). The stream keeps the snapshot's clock, beats and step counter. Raises
        :class:`EngineFull`, or :class:`SnapshotError` for a snapshot this model cannot take."""
        stream = Stream(id=next(self._ids), realtime=True, sampling=sampling, timeline=timeline, sink=sink,
                        on_error=on_error, lookahead=self.lookahead if lookahead is None else lookahead,
                        banned_voices=banned_voices, paused=True, restored=True)
        stream.ready_future = asyncio.get_running_loop().create_future()
        await self._call(self._restore, stream, snapshot, same_model)
        await stream.ready_future
        return stream

    async def release(self, stream: Stream) -> None:
        """Stop a stream and free its row."""
        if self.running:
            await self._call(self._release, stream)

    def _post(self, fn: Callable, *args) -> None:
        """Run ``fn(*args)`` on the event loop (from the engine thread)."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(fn, *args)

    # ------------------------------------------------------------------ engine thread: commands
    def _open(self, stream: Stream, prompt: TokenSequence | None) -> None:
        if not self._free:
            raise EngineFull(f"the engine holds {self.capacity} streams, its limit")
        sequence = with_bos(prompt)
        decoder = decoder_for(self.tokenizer, sequence)
        floats, slots = self.tokenizer.dna(sequence)
        stream.slot = self._free.pop()
        stream.decoder = decoder
        stream.offset = self.timebase.beats_from_grid(decoder.cursor)
        stream.frontier = 0.0
        stream.history = _history_rows(sequence.ids, sequence.velocity, sequence.voice)
        self.field[stream.slot] = 0
        self.position[stream.slot] = 0
        self.heard[stream.slot] = torch.from_numpy(self.generator.heard(sequence.ids)).to(self.device)
        stream.pending = [(floats, slots)]
        self.streams[stream.id] = stream

    def _capture(self, stream: Stream) -> StreamSnapshot:
        """The stream's rows, decoders and log copied, and its last tokens made portable (here: in
        worker threads the conversion only fights the engine thread for the GIL)."""
        if stream.closed or stream.failed:
            raise SnapshotError("the stream has ended")
        if stream.checkpoint is None or stream.pending:
            raise SnapshotError("nothing to save yet: the prompt or played notes are still being read")
        row = stream.slot
        copy = lambda rows: {name: getattr(self, f"{rows}{name}")[row].detach().to("cpu", copy=True)
                             for name in ROW_NAMES}
        checkpoint = stream.checkpoint
        live = Place(copy(""), stream.decoder.state(), stream.steps, stream.frontier)
        saved = Place(copy("saved_"), checkpoint.decoder.state(), checkpoint.steps, checkpoint.frontier)
        log = np.asarray(stream.log, dtype=np.int64).reshape(-1, 4)
        history, history_beat = portable_history(self.tokenizer, np.concatenate([stream.history, log[:, :3]]),
                                                 stream.decoder.cursor, stream.offset, stream.frontier,
                                                 complete=len(stream.history) < HISTORY_TOKENS)
        return StreamSnapshot(live=live, saved=saved, offset=stream.offset, clock=stream.clock, log=log,
                              sent_step=stream.sent_step, history=history, history_beat=history_beat,
                              heard_until=stream.heard_until)

    def _restore(self, stream: Stream, snap: StreamSnapshot, same_model: bool) -> None:
        if not self._free:
            raise EngineFull(f"the engine holds {self.capacity} streams, its limit")
        tok = self.tokenizer
        if same_model:
            for place in (snap.live, snap.saved):
                for name in ROW_NAMES:
                    want, got = tuple(getattr(self, name)[0].shape), tuple(place.rows[name].shape)
                    if want != got:
                        raise SnapshotError(f"the snapshot's {name} has shape {got}, this model's {want}")
            log = [LoggedToken(*map(int, entry)) for entry in snap.log.tolist()]
            if any(not 0 <= t.token < tok.vocab_size for t in log):
                raise SnapshotError("the snapshot's log holds tokens outside this model's vocabulary")
            try:
                decoder = StreamDecoder.from_state(tok, snap.live.decoder)
                checkpoint = Checkpoint(StreamDecoder.from_state(tok, snap.saved.decoder), snap.saved.steps,
                                        snap.saved.frontier)
            except TokenizerError as exc:
                raise SnapshotError(f"the snapshot's decoder does not fit this model: {exc}") from exc
        else:
            prompt = with_bos(from_portable(tok, snap.history))
            floats, slots = tok.dna(prompt)
        stream.slot = row = self._free.pop()
        self.streams[stream.id] = stream
        stream.offset, stream.clock, stream.heard_until = snap.offset, snap.clock, snap.heard_until
        stream.steps = snap.live.steps
        if same_model:  # exactly as it was: now, and at its checkpoint
            for where, place in (("", snap.live), ("saved_", snap.saved)):
                for name in ROW_NAMES:
                    getattr(self, f"{where}{name}")[row] = place.rows[name].to(self.device, getattr(self, name).dtype)
            stream.checkpoint, stream.log, stream.decoder = checkpoint, log, decoder
            stream.recent = RecentStates(self.recent_states)  # none yet: the first answer reads the log again
            stream.frontier, stream.sent_step = snap.live.frontier, snap.sent_step
            history = from_portable(tok, snap.history[: max(0, len(snap.history) - len(log))])
            stream.history = _history_rows(history.ids, history.velocity, history.voice)
        else:  # another model: read the last tokens again, on the snapshot's beats
            for name in ROW_NAMES:
                getattr(self, name)[row] = 0
            self.heard[row] = snap.live.rows["heard"].to(self.device, self.heard.dtype)
            stream.decoder = decoder_for(tok, prompt)
            stream.offset = -snap.history_beat
            stream.frontier = self._beat_of_cursor(stream)
            stream.history = _history_rows(prompt.ids, prompt.velocity, prompt.voice)
            stream.sent_step = stream.steps - 1  # what the old model generated stays (the session holds it)
            stream.pending = [(floats, slots)]

    def _feed(self, stream: Stream, notes: list[StreamNote], heard_until: float | None) -> Fed:
        if stream.closed or stream.failed or stream.decoder is None:
            return Fed(0, 0, stream.epoch)
        kept, replayed, recent = [], None, None
        if stream.checkpoint is not None and self.rollback:  # a live stream: read the notes at its latest sent note
            kept = kept_prefix(stream.log, stream.sent_step)
            replayed = replay(stream.checkpoint, kept, self.tokenizer, stream.offset)
            recent = stream.recent.after(len(kept))  # the state there, if kept: nothing to read again
        decoder = replayed.decoder if replayed is not None else stream.decoder
        played = [(self.timebase.grid_from_beats(n.beat + stream.offset), n.pitch, n.duration, n.velocity,
                   n.voice) for n in notes]
        before = decoder.copy()
        sequence = decoder.encode_notes(played)
        stream.unknown_played += sequence.unknown
        if len(sequence) == 0:  # nothing the stream can read: it carries on as it was
            return Fed(0, sequence.unknown, stream.epoch)
        floats, slots = self._played_dna(sequence, before)
        if replayed is not None:
            self._rewind(stream, kept, replayed, recent)
            if recent is None:
                floats, slots = np.concatenate([replayed.floats, floats]), np.concatenate([replayed.slots, slots])
        if stream.checkpoint is not None:
            stream.log += [LoggedToken(t, v, s, PLAYED) for t, v, s in
                           zip(sequence.ids.tolist(), sequence.velocity.tolist(), sequence.voice.tolist())]
        stream.pending.append((floats, slots))
        self.heard[stream.slot] += torch.from_numpy(self.generator.heard(sequence.ids)).to(self.device)
        stream.frontier = max(stream.frontier, self._beat_of_cursor(stream))
        if heard_until is not None:
            stream.heard_until = heard_until if stream.heard_until is None else max(stream.heard_until, heard_until)
        if stream.realtime and stream.primed:  # the answer, its next token, is a note starting by then
            due = time.time() - stream.clock + stream.lookahead + ANSWER_MARGIN
            # (at least where the played notes went in: a chord with them, when they lie later)
            stream.answer_by = max(self.timebase.grid_from_beats(stream.timeline.beat_at(due) + stream.offset),
                                   stream.decoder.cursor)
        return Fed(len(sequence), sequence.unknown, stream.epoch)

    def _rewind(self, stream: Stream, kept: list[LoggedToken], replayed: Replayed,
                recent: RecentState | None = None) -> None:
        """Put a live stream back after the ``kept`` log: at the ``recent`` state after it, or at its
        checkpoint (then the caller queues the kept tokens' DNA to be read again). The generated
        tokens after them are void (a new epoch)."""
        row = stream.slot
        if recent is not None:
            self._put_recent(row, recent, "")
        else:
            for name in ROW_NAMES:
                if name != "heard":  # the heard counts: those at the checkpoint plus the kept played notes
                    getattr(self, name)[row] = getattr(self, f"saved_{name}")[row]
        self.heard[row] = self.saved_heard[row] + torch.from_numpy(
            self.generator.heard(played_ids(kept))).to(self.device)
        stream.decoder = replayed.decoder
        stream.steps = replayed.steps
        stream.frontier = replayed.frontier
        stream.log = list(kept)
        stream.recent.cut(len(kept))
        stream.pending = []  # unread played tokens are in the kept log, read again with it
        stream.epoch += 1
        self.metrics.rollbacks.inc()

    def _take_checkpoint(self, stream: Stream) -> None:
        """A live stream's first checkpoint: where its prompt ends."""
        row = stream.slot
        for name in ROW_NAMES:
            getattr(self, f"saved_{name}")[row] = getattr(self, name)[row]
        stream.checkpoint = Checkpoint(stream.decoder.copy(), stream.steps, stream.frontier)
        stream.log = []
        stream.recent = RecentStates(self.recent_states)

    def _put_recent(self, row: int, recent: RecentState, rows: str) -> None:
        """Write a recent state into a stream's live rows (``rows`` "") or its checkpoint ("saved_"),
        with the model's output there."""
        getattr(self, f"{rows}field")[row] = recent.field
        getattr(self, f"{rows}position")[row] = recent.position
        getattr(self, f"{rows}hidden")[row] = recent.hidden
        getattr(self, f"{rows}logits")[row] = self.model.heads(recent.hidden[None]).logits[0].to(self.logits.dtype)

    def _remember(self, streams: list[Stream]) -> None:
        """Keep each live stream's state now as the one after its whole log (server.rollback)."""
        streams = [s for s in streams if s.checkpoint is not None and self.recent_states and not s.failed]
        for stream in streams:
            # Each row a copy of its own: a view into a batch would keep the whole batch alive as long
            # as the stream keeps the state (a paused stream, for as long as it is paused).
            row = stream.slot
            stream.recent.record(len(stream.log), self.field[row].clone(), self.position[row].clone(),
                                 self.hidden[row].clone())

    def _fold(self, stream: Stream) -> None:
        """Move the checkpoint forward over the kept part of the log once it is long enough (past
        :data:`MAX_LOG` tokens, over all but the newest ``FOLD_TOKENS`` even if they were not sent)."""
        if len(stream.log) < FOLD_TOKENS:
            return
        kept = kept_prefix(stream.log, stream.sent_step)
        if len(stream.log) > MAX_LOG:
            kept = stream.log[: max(len(kept), len(stream.log) - FOLD_TOKENS)]
        if len(kept) < FOLD_TOKENS:
            return
        replayed = replay(stream.checkpoint, kept, self.tokenizer, stream.offset)
        recent = stream.recent.after(len(kept))
        if recent is not None:  # the state there is kept: a copy
            self._put_recent(stream.slot, recent, "saved_")
        else:
            rows = torch.tensor([stream.slot], device=self.device)
            saved = FieldState(self.saved_field[rows], self.saved_position[rows])
            state, out = self.generator.read(saved, replayed.floats[None], replayed.slots[None])
            self.saved_field[rows] = state.field.to(self.saved_field.dtype)
            self.saved_position[rows] = state.position
            self.saved_logits[rows] = out.logits.to(self.saved_logits.dtype)
            self.saved_hidden[rows] = out.hidden.to(self.saved_hidden.dtype)
        stream.recent.shift(len(kept))
        self.saved_heard[stream.slot] += torch.from_numpy(self.generator.heard(played_ids(kept))).to(self.device)
        stream.checkpoint = Checkpoint(replayed.decoder, replayed.steps, replayed.frontier)
        stream.history = _history_rows(*np.asarray(kept, dtype=np.int64)[:, :3].T, before=stream.history)
        stream.log = stream.log[len(kept):]

    def _played_dna(self, sequence: TokenSequence, before: StreamDecoder) -> tuple[np.ndarray, np.ndarray]:
        """DNA of played tokens, each with the bar length and voice register after it, from where
        the stream's decoder stood before them (``before``, which this pushes them into)."""
        lengths, register, _ = before.contexts(sequence)
        return self.tokenizer.token_dna.of_tokens(sequence.ids, sequence.velocity, sequence.voice, lengths, register)

    def _release(self, stream: Stream) -> None:
        if stream.closed:
            return
        stream.closed = True
        stream.pending.clear()
        if self.streams.pop(stream.id, None) is not None and stream.slot >= 0:
            self._free.append(stream.slot)
            stream.slot = -1

    def _fail(self, stream: Stream, message: str) -> None:
        if stream.failed or stream.closed:
            return
        stream.failed = True
        self._post(stream.on_error, message)
        if stream.ready_future is not None:
            self._post(_settle, stream.ready_future, RuntimeError(message))
        self._release(stream)

    # ------------------------------------------------------------------ engine thread: loop
    def _run(self) -> None:
        logger.info("engine thread started: %d rows, device %s", self.capacity, self.device)
        try:
            with torch.inference_mode():
                while not self._stopping:
                    self._run_commands()
                    read_input = self._read_input()
                    now = time.time()
                    batch = self.scheduler.select(self.streams.values(), now)
                    if batch:
                        self._step(batch)
                    elif not read_input:
                        self._wake.wait(self.scheduler.wait_time(self.streams.values(), now))
                        self._wake.clear()
        except BaseException as exc:  # the engine itself broke: fail everyone, refuse new work
            logger.exception("engine thread died")
            self.error = exc
            for stream in list(self.streams.values()):
                self._fail(stream, f"the generation engine stopped: {exc}")
            self._stopping = True
        finally:
            while not self._commands.empty():
                _, _, future = self._commands.get_nowait()
                self._post(_settle, future, EngineClosed("the generation engine stopped"))

    def _run_commands(self) -> None:
        while True:
            try:
                fn, args, future = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                result = fn(*args)
            except Exception as exc:  # the caller gets the error; the engine carries on
                self._post(_settle, future, exc)
            else:
                self._post(_settle, future, result, False)

    @torch.no_grad()
    def _read_input(self) -> bool:
        """Read at most ``input_chunk`` pending prompt or played tokens; True if any were read.

        Played notes of running streams go first (a quick answer), then prompts, taking turns: the
        order rotates every call, so a long prompt never holds up a short one for long."""
        budget = self.input_chunk - self._read_played_together()
        streams = list(self.streams.values())
        if streams:
            turn = self._input_turn % len(streams)
            self._input_turn += 1
            streams = streams[turn:] + streams[:turn]
            streams.sort(key=lambda s: not s.primed)  # stable: the rotation holds within each group
        for stream in streams:
            if budget <= 0:
                break
            while stream.pending and budget > 0 and not stream.failed:
                floats, slots = stream.pending[0]
                take = min(budget, len(slots))
                try:
                    self._read_chunk(stream, floats[:take], slots[:take])
                except Exception as exc:
                    logger.exception("reading input of stream %d failed", stream.id)
                    self._fail(stream, f"reading the prompt or played notes failed: {exc}")
                    break
                budget -= take
                if take == len(slots):
                    stream.pending.pop(0)
                    if not stream.pending:
                        self._remember([stream])
                else:
                    stream.pending[0] = (floats[take:], slots[take:])
            if stream.primed or stream.pending or stream.failed:
                continue
            stream.primed = True  # its prompt is read: the clock starts
            if not stream.restored:
                stream.clock = time.time() + self.lookahead
            if stream.realtime and stream.checkpoint is None:
                self._take_checkpoint(stream)
            if stream.ready_future is not None:
                self._post(_settle, stream.ready_future, None, False)
        return budget < self.input_chunk

    def _read_played_together(self) -> int:
        """Read the played notes of every running stream that has some (each one short chunk) in
        one padded pass, so that many answers cost one read; returns the tokens read."""
        playing = [s for s in self.streams.values()
                   if s.primed and len(s.pending) == 1 and not s.failed and len(s.pending[0][1]) <= self.input_chunk]
        while sum(len(s.pending[0][1]) for s in playing) > self.input_chunk:
            playing.pop()
        if len(playing) < 2:
            return 0
        rows = torch.tensor([s.slot for s in playing], device=self.device)
        state, _ = self._rows(rows)
        try:
            new_state, last = self.generator.read_many(state, [s.pending[0] for s in playing])
        except Exception:  # read them one by one (a stream whose input fails, fails alone)
            logger.exception("reading the played notes of %d streams together failed", len(playing))
            return 0
        self._store(rows, new_state, last)
        read = sum(len(s.pending[0][1]) for s in playing)
        for stream in playing:
            stream.pending.clear()
        self._remember(playing)
        return read

    def _read_chunk(self, stream: Stream, floats: np.ndarray, slots: np.ndarray) -> None:
        rows = torch.tensor([stream.slot], device=self.device)
        state, _ = self._rows(rows)
        new_state, last = self.generator.read(state, floats[None], slots[None])
        self._store(rows, new_state, last)

    def _step(self, batch: list[Stream]) -> None:
        """One engine step: choose the scheduled streams' next tokens, hand their notes over, then
        let the model read them (the notes leave before the model step and the rollback folds, so
        neither delays them, an answer least of all)."""
        began = time.perf_counter()
        results = self._execute(batch)
        if results is None:
            return
        deliveries, finished = self._update(batch, results)
        self._post(self._deliver, deliveries, [])
        self._read_chosen(batch, results)
        for stream in batch:
            if stream.realtime and stream.checkpoint is not None and not stream.failed:
                self._fold(stream)
        self.metrics.step(len(batch), time.perf_counter() - began)
        if finished:  # a job is done once its step is counted
            self._post(self._deliver, [], finished)
        for stream in finished:
            self._release(stream)

    @torch.no_grad()
    def _execute(self, batch: list[Stream]) -> list[StreamStep] | None:
        """Choose the streams' next tokens (one batched draw from the logits in their rows; the
        model reads them in :meth:`_read_chosen`). If that fails, each stream is tried alone and
        only the ones that fail alone fail (a bad value fails its own stream, never its
        neighbours'); returns the results of the streams that stepped, in ``batch`` order (None:
        none did)."""
        saved = [s.decoder.copy() for s in batch] if len(batch) > 1 else []  # to retry each alone
        try:
            return self._advance(batch)
        except Exception as exc:
            if len(batch) == 1:
                logger.exception("the model step of stream %d failed", batch[0].id)
                self._fail(batch[0], f"the model step failed: {exc}")
                return None
            logger.warning("a model step of %d streams failed (%s); stepping each alone", len(batch), exc)
        results: list[StreamStep] = []
        stepped: list[Stream] = []
        for stream, decoder in zip(batch, saved):
            stream.decoder.restore(decoder)
            outcome = self._execute([stream])
            if outcome is not None:
                results += outcome
                stepped.append(stream)
        batch[:] = stepped  # the caller updates the streams that stepped
        return results or None

    def _advance(self, batch: list[Stream]) -> list[StreamStep]:
        rows = torch.tensor([s.slot for s in batch], device=self.device)
        _, out = self._rows(rows)
        return self.generator.choose(
            out, [s.decoder for s in batch], [s.sampling for s in batch], [s.steps for s in batch],
            self.heard[rows], self._banned_voices(batch),
            [s.answer_by for s in batch] if any(s.answer_by is not None for s in batch) else None)

    @torch.no_grad()
    def _read_chosen(self, batch: list[Stream], results: list[StreamStep]) -> None:
        """The model reads each stream's chosen token (one batched O(1) step) and its row of the
        slab moves on. If that fails, each stream is read alone, and only the ones that fail alone fail."""
        rows = torch.tensor([s.slot for s in batch], device=self.device)
        state, _ = self._rows(rows)
        try:
            new_out, new_state = self.generator.feed(state, results, [s.decoder for s in batch])
        except Exception as exc:
            if len(batch) == 1:
                logger.exception("the model step of stream %d failed", batch[0].id)
                self._fail(batch[0], f"the model step failed: {exc}")
                return
            logger.warning("a model step of %d streams failed (%s); stepping each alone", len(batch), exc)
            for stream, result in zip(batch, results):
                self._read_chosen([stream], [result])
            return
        self._store(rows, new_state, new_out)
        self._remember(batch)

    def _banned_voices(self, batch: list[Stream]) -> torch.Tensor | None:
        """``(B, max_voices)``, True where a stream never plays the voice (None: no stream bans any)."""
        if not any(s.banned_voices for s in batch):
            return None
        voices = self.model.config.max_voices
        mask = torch.zeros((len(batch), voices), dtype=torch.bool)
        for i, stream in enumerate(batch):
            banned = [v for v in stream.banned_voices if v < voices]
            mask[i, banned] = True
        return mask.to(self.device)

    def _update(self, batch: list[Stream], results: list[StreamStep]
                ) -> tuple[list[tuple[Stream, StreamNote]], list[Stream]]:
        """Move each stream's time on and turn its new note into a :class:`StreamNote` (a live
        stream only moves forward, and after a rollback no note starts sooner than its lookahead
        from now); returns the notes to hand over and the jobs now finished."""
        deliveries = []
        moved = 0
        now = time.time()
        for stream, result in zip(batch, results):
            step = stream.steps
            stream.steps += 1
            previous = stream.frontier
            stream.frontier = max(previous, self._beat_of_cursor(stream))
            if stream.checkpoint is not None:
                stream.log.append(LoggedToken(result.token, result.velocity, result.voice, step))
            if result.note is not None:
                stream.answer_by = None  # answered
                n = result.note
                beat = self.timebase.beats_from_steps(n.onset) - stream.offset
                earliest = previous
                if stream.epoch:  # answering: the notes after a rollback may lie before "now"
                    earliest = max(earliest, stream.timeline.beat_at(now - stream.clock + stream.lookahead
                                                                       + ANSWER_MARGIN))
                if stream.realtime and beat < earliest:
                    # A live stream only moves forward: a note placed before the latest onset
                    # (earlier in the bar) sounds at that onset instead of in the past.
                    beat, moved = earliest, moved + 1
                deliveries.append((stream, StreamNote(beat, self.timebase.beats_from_steps(n.duration), n.pitch,
                                                      n.velocity, n.voice, step, stream.epoch, stream.heard_until)))
            if not stream.realtime:
                stream.remaining -= 1
        if moved:
            self.metrics.notes_moved.inc(moved)
        return deliveries, [s for s in batch if not s.realtime and s.remaining <= 0]

    def _beat_of_cursor(self, stream: Stream) -> float:
        """Beats from the stream's beat 0 to the onset of its latest token."""
        return self.timebase.beats_from_grid(stream.decoder.cursor) - stream.offset

    # ------------------------------------------------------------------ event loop: hand-over
    @staticmethod
    def _deliver(deliveries: list[tuple[Stream, StreamNote]], finished: list[Stream]) -> None:
        by_stream: dict[int, tuple[Stream, list[StreamNote]]] = {}
        for stream, note in deliveries:
            by_stream.setdefault(stream.id, (stream, []))[1].append(note)
        for stream, notes in by_stream.values():
            stream.sink(notes)
        for stream in finished:
            if stream.on_done is not None:
                stream.on_done()


def portable_history(tokenizer: Tokenizer, record: np.ndarray, cursor: int, offset: float, frontier: float,
                     complete: bool) -> tuple[np.ndarray, float]:
    """A stream's last tokens (``record``: ``(N, 3)`` ids, velocity levels, voices, ending where its
    decoder's ``cursor`` stands) as portable rows from their first bar line, and the stream beat
    where that bar starts. Without a bar line: all of them from the stream's start if ``complete``
    (its whole record), else none."""
    portable = to_portable(tokenizer, record[:, 0], record[:, 1], record[:, 2])
    history = from_first_bar(portable)
    if len(history):  # where its first bar starts: the stream's cursor less the history's own
        fresh = decoder_for(tokenizer, from_portable(tokenizer, history))
        return history, tokenizer.timebase.beats_from_grid(cursor - fresh.cursor) - offset
    if complete:  # the whole stream, before any bar line: from its start
        return portable, -offset
    return history, frontier


def _history_rows(ids: np.ndarray, velocity: np.ndarray, voice: np.ndarray,
                  before: np.ndarray | None = None) -> np.ndarray:
    """The last :data:`HISTORY_TOKENS` of ``before`` then the given tokens, as ``(N, 3)`` rows."""
    rows = np.stack([np.asarray(ids), np.asarray(velocity), np.asarray(voice)], axis=1).astype(np.int64)
    if before is not None:
        rows = np.concatenate([before, rows])
    return rows[-HISTORY_TOKENS:]


def _settle(future: asyncio.Future, value, is_error: bool | None = None) -> None:
    """Resolve a future on its loop unless it was cancelled (``value`` an exception -> raise)."""
    if future.done():
        return
    if is_error is None:
        is_error = isinstance(value, BaseException)
    if is_error:
        future.set_exception(value)
    else:
        future.set_result(value)

