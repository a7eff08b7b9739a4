"""Session snapshots: the bytes (a round trip, and every kind of damage refused with a reason), and
the engine putting a stream back where a snapshot stands, into the same model or another one."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import numpy as np
import pytest

from model.checkpoint.format import load_model
from model.sampling.config import SamplingConfig
from model.timebase import Timeline
from server.engine import Engine
from server.snapshot import SNAPSHOT_FORMAT, SessionSnapshot, SnapshotError
from tests.snapshot_bytes import set_key, with_metadata
from tests.waiting import wait_until

NOTES_BEFORE = 12  # notes "sent" before the snapshot
NOTES_AFTER = 24  # notes compared after it


@pytest.fixture(scope="module")
def served(served_checkpoint):
    model, tokenizer, _ = load_model(served_checkpoint)
    return model, tokenizer


def make_engine(model, tokenizer) -> Engine:
    # A long generate-ahead at a fast tempo: the streams run far ahead, so the test has notes at once.
    return Engine(model, tokenizer, capacity=4, max_batch=4, lookahead=0.2, generate_ahead=30.0)


def key(note) -> tuple:
    return (round(note.beat, 6), note.pitch, note.voice, round(note.duration, 6), note.velocity)


async def live_stream(engine: Engine, seed: int = 7):
    notes: list = []
    stream = await engine.open(None, sampling=SamplingConfig(seed=seed), timeline=Timeline(400), realtime=True,
                               sink=notes.extend, on_error=pytest.fail)
    return stream, notes


async def captured(engine: Engine, seed: int = 7):
    """A stream that generated enough, its notes, and a snapshot taken after its NOTES_BEFORE-th note."""
    stream, notes = await live_stream(engine, seed)
    await wait_until(lambda: len(notes) >= NOTES_BEFORE + NOTES_AFTER, 60, "the stream to generate notes")
    stream.sent_step = notes[NOTES_BEFORE - 1].step  # as if the session had sent the first notes
    snap = await engine.capture(stream)
    return stream, notes, snap


def session_snapshot(stream, snap, last_beat: float) -> SessionSnapshot:
    return SessionSnapshot(checkpoint="a" * 32, session_id="s1", saved_at=1.0, sampling=stream.sampling,
                           timeline=stream.timeline, stream=snap, last_beat=last_beat, sent=NOTES_BEFORE,
                           programs=[0, 41, None], accompany=[1])


def test_a_restored_stream_plays_the_notes_its_original_played_after_the_snapshot(served):
    async def main():
        first, second = make_engine(*served), make_engine(*served)
        first.start(), second.start()
        try:
            stream, notes, snap = await captured(first)
            data = session_snapshot(stream, snap, notes[NOTES_BEFORE - 1].beat).to_bytes()
            back = SessionSnapshot.from_bytes(data)
            restored_notes: list = []
            restored = await second.restore(back.stream, same_model=True, sampling=back.sampling,
                                            timeline=back.timeline, sink=restored_notes.extend, on_error=pytest.fail)
            assert restored.clock == stream.clock and restored.steps == snap.live.steps
            assert restored.sent_step == stream.sent_step
            restored.paused = False
            second._wake.set()
            await wait_until(lambda: len(restored_notes) >= NOTES_AFTER, 60, "the restored stream's notes")
            await wait_until(lambda: len([n for n in notes if n.step >= snap.live.steps]) >= NOTES_AFTER, 60,
                             "the original stream's notes")
            after = [key(n) for n in notes if n.step >= snap.live.steps][:NOTES_AFTER]
            assert [key(n) for n in restored_notes[:NOTES_AFTER]] == after
        finally:
            first.close(), second.close()
    asyncio.run(main())


def test_a_snapshot_survives_its_bytes(served):
    async def main():
        engine = make_engine(*served)
        engine.start()
        try:
            stream, notes, snap = await captured(engine)
            original = session_snapshot(stream, snap, notes[NOTES_BEFORE - 1].beat)
            back = SessionSnapshot.from_bytes(original.to_bytes())
        finally:
            engine.close()
        assert (back.checkpoint, back.session_id, back.sent, back.programs, back.accompany) == \
               ("a" * 32, "s1", NOTES_BEFORE, [0, 41, None], [1])
        assert back.sampling == stream.sampling and back.timeline == stream.timeline
        assert back.last_beat == notes[NOTES_BEFORE - 1].beat
        s, b = original.stream, back.stream
        for mine, theirs in ((s.live, b.live), (s.saved, b.saved)):
            assert all(np.array_equal(mine.rows[n].numpy(), theirs.rows[n].numpy()) for n in mine.rows)
            assert (theirs.decoder, theirs.steps, theirs.frontier) == (mine.decoder, mine.steps, mine.frontier)
        assert np.array_equal(s.log, b.log) and np.array_equal(s.history, b.history)
        assert (b.offset, b.clock, b.sent_step) == (s.offset, s.clock, s.sent_step)
        assert len(b.history) > 0 and b.history[0, 0] == 4  # from a bar line (BAR is kind 4)
    asyncio.run(main())


@pytest.fixture(scope="module")
def snapshot_bytes(served) -> bytes:
    async def main():
        engine = make_engine(*served)
        engine.start()
        try:
            stream, notes, snap = await captured(engine)
            return session_snapshot(stream, snap, notes[NOTES_BEFORE - 1].beat).to_bytes()
        finally:
            engine.close()
    return asyncio.run(main())


@pytest.mark.parametrize("damage, reason", [
    (lambda d: b"", "too short"),
    (lambda d: b"not a snapshot at all", "header runs past"),
    (lambda d: d[: len(d) // 2], "damaged"),
    (lambda d: d[:8] + b"[" + d[9:], "not a snapshot"),
    (lambda d: with_metadata(d, set_key("format", SNAPSHOT_FORMAT + 1)), "this server reads format"),
    (lambda d: with_metadata(d, set_key("format", None)), "snapshot format None"),
    (lambda d: with_metadata(d, lambda m: m.pop("stream")), "malformed"),
    (lambda d: with_metadata(d, set_key("timeline.bpm", -5)), "bpm"),
    (lambda d: with_metadata(d, set_key("sampling.temperature", 0)), "temperature"),
    (lambda d: with_metadata(d, set_key("stream.clock", "soon")), "malformed"),
    (lambda d: with_metadata(d, set_key("programs", [200])), "programs"),
], ids=["empty", "garbage", "truncated", "broken-header", "future-format", "no-format", "no-stream", "bad-bpm",
        "bad-temperature", "bad-clock", "bad-program"])
def test_damaged_or_foreign_snapshots_are_refused_with_the_reason(snapshot_bytes, damage, reason):
    SessionSnapshot.from_bytes(snapshot_bytes)  # the undamaged one reads
    with pytest.raises(SnapshotError, match=reason):
        SessionSnapshot.from_bytes(damage(snapshot_bytes))


def test_a_snapshot_another_model_cannot_hold_is_refused_there(served, snapshot_bytes):
    snap = SessionSnapshot.from_bytes(snapshot_bytes)
    snap.stream.live.rows["field"] = snap.stream.live.rows["field"][:-1]  # a field of another size

    async def main():
        engine = make_engine(*served)
        engine.start()
        try:
            with pytest.raises(SnapshotError, match="field has shape"):
                await engine.restore(snap.stream, same_model=True, sampling=snap.sampling, timeline=snap.timeline,
                                     sink=lambda notes: None, on_error=pytest.fail)
            assert len(engine._free) == 4  # nothing taken
        finally:
            engine.close()
    asyncio.run(main())


def test_another_checkpoint_rereads_the_last_tokens_and_goes_on_on_the_same_beats(served, snapshot_bytes):
    """Another model (here: another vocabulary too) reads the snapshot's portable last tokens."""
    from model.tokenizer.tokenizer import Tokenizer

    model, tokenizer = served
    snap = SessionSnapshot.from_bytes(snapshot_bytes)
    # the same weights over the vocabulary in another order: every token id means another token now
    specials, rest = tokenizer.vocab[:4], tokenizer.vocab[4:]
    other = Tokenizer(tokenizer.config, vocab=specials + rest[::-1])
    assert other.vocab_size == tokenizer.vocab_size and other.vocab[4] != tokenizer.vocab[4]

    async def main():
        engine = make_engine(model, other)
        engine.start()
        try:
            notes: list = []
            stream = await engine.restore(snap.stream, same_model=False, sampling=replace(snap.sampling),
                                          timeline=snap.timeline, sink=notes.extend, on_error=pytest.fail)
            assert stream.clock == snap.stream.clock
            # the re-read tokens end where the snapshot's stream stood
            assert stream.frontier == pytest.approx(snap.stream.live.frontier)
            stream.paused = False
            engine._wake.set()
            await wait_until(lambda: len(notes) >= 8, 60, "the re-read stream's notes")
            # no note before where the snapshot stood: the stream goes on from its beats
            assert min(n.beat for n in notes) >= snap.stream.live.frontier - 1e-9
        finally:
            engine.close()
    asyncio.run(main())
