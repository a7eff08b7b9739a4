"""The batching engine with a real (tiny) model: jobs, live streams, failures, fixed state."""

from __future__ import annotations

import asyncio
import math
import time

import pytest
import torch

from model.checkpoint.format import load_model
from model.fm.state import FieldState
from model.sampling.config import SamplingConfig
from server.engine import Engine, StreamNote
from server.rollback import FOLD_TOKENS, RECENT_STATES, RecentStates, replay
from model.timebase import Timeline
from tests.waiting import wait_until


@pytest.fixture(scope="module")
def served(served_checkpoint):
    model, tokenizer, _ = load_model(served_checkpoint)
    return model, tokenizer


def make_engine(served, **kwargs) -> Engine:
    model, tokenizer = served
    options = dict(capacity=8, max_batch=8, lookahead=0.2, generate_ahead=0.1)
    options.update(kwargs)
    return Engine(model, tokenizer, **options)


async def run_job(engine: Engine, tokens: int, seed: int) -> tuple[list, object]:
    notes, done = [], asyncio.get_running_loop().create_future()
    stream = await engine.open(None, sampling=SamplingConfig(seed=seed), timeline=Timeline(120), realtime=False,
                               tokens=tokens, sink=notes.extend,
                               on_error=lambda m: done.set_exception(RuntimeError(m)),
                               on_done=lambda: done.set_result(None))
    await asyncio.wait_for(done, 60)
    return notes, stream


def test_jobs_run_in_one_batch_and_free_their_rows(served):
    async def main():
        engine = make_engine(served)
        engine.start()
        try:
            results = await asyncio.gather(*(run_job(engine, 50, seed) for seed in range(4)))
            assert all(stream.steps == 50 for _, stream in results)
            assert all(notes for notes, _ in results)
            text = engine.metrics.render().decode()
            assert "fm_tokens_total 200.0" in text
            assert 'fm_batch_size_bucket{le="1.0"} 0.0' in text  # all four streams stepped together
            await wait_until(lambda: len(engine._free) == 8 and not engine.streams, 10,
                             lambda: f"the rows to be freed: {len(engine._free)} free, streams {list(engine.streams)}")
        finally:
            engine.close()
    asyncio.run(main())


@pytest.mark.parametrize("phase", ["choose", "feed"])
def test_a_failed_step_fails_its_streams_and_the_engine_carries_on(served, monkeypatch, phase):
    """A step breaks while tokens are drawn (``choose``) or while the model reads them (``feed``,
    after the notes were handed over): the stream fails with the error, the next one is served."""
    async def main():
        engine = make_engine(served)
        engine.start()
        try:
            real = getattr(engine.generator, phase)
            calls = {"n": 0}

            def broken_once(*args, **kwargs):  # a simulated device error in one step
                calls["n"] += 1
                if calls["n"] == 3:
                    raise RuntimeError("simulated device error")
                return real(*args, **kwargs)

            monkeypatch.setattr(engine.generator, phase, broken_once)
            with pytest.raises(RuntimeError, match="simulated device error"):
                await run_job(engine, 20, seed=1)
            notes, stream = await run_job(engine, 20, seed=2)  # the next stream is served
            assert stream.steps == 20
        finally:
            engine.close()
    asyncio.run(main())


@pytest.mark.parametrize("recent_states", [RECENT_STATES, 0], ids=["recent-states", "read-again"])
def test_live_stream_state_stays_the_same_size_and_played_notes_are_read(served, recent_states):
    """Played notes go in where the stream was last sent, from a recent state or (none kept) by
    reading the log again from the checkpoint; the state stays the same size."""
    async def main():
        engine = make_engine(served, recent_states=recent_states)
        engine.start()
        received = []
        try:
            stream = await engine.open(None, sampling=SamplingConfig(seed=3), timeline=Timeline(400), realtime=True,
                                       sink=received.extend, on_error=print)
            slab = (engine.field.shape, engine.logits.shape)
            await wait_until(lambda: len(received) >= 4, 30, lambda: f"generated notes: {len(received)} so far")
            position = int(engine.position[stream.slot])
            # common pitches on whole beats; the tiny model's vocabulary may still lack one of them
            beat = math.ceil(stream.frontier) + 1
            played = [StreamNote(beat + i, 0.5, pitch, 90, 0) for i, pitch in enumerate((60, 62, 64, 67))]
            stream.sent_step = received[-1].step  # everything generated so far was sent: nothing is dropped
            fed = await engine.feed(stream, played)
            tokens, unknown = fed.tokens, fed.unknown
            assert tokens >= 1 and tokens + unknown >= 4
            # what the stream heard from its player (for key_pull): the played notes it could read,
            # nothing it generated
            heard = engine.heard[stream.slot]
            assert heard.sum() == 4 - unknown and set(heard.nonzero().flatten().tolist()) <= {0, 2, 4, 7}
            # The stream reads the played tokens and generates past them (~5 beats ahead: 0.75 s at 400 bpm).
            await wait_until(lambda: int(engine.position[stream.slot]) > position + tokens, 30,
                             lambda: f"the stream to move past the played notes: position "
                                     f"{int(engine.position[stream.slot])}, was {position} + {tokens} played tokens")
            assert (engine.field.shape, engine.logits.shape) == slab
            assert engine.state_bytes == engine.field.shape[1] * 4 + 8 + 12 * 4  # field, position, heard
            # the checkpoint: the same rows once more, with its output; and the recent states
            recent_state = engine.field[0].nbytes + engine.position[0].nbytes + engine.hidden[0].nbytes
            assert engine.rollback_bytes == engine.slot_bytes + recent_states * recent_state
            assert len(stream.recent) <= recent_states
            beats = [n.beat for n in received]
            assert beats == sorted(beats)  # a live stream only moves forward
            await engine.release(stream)
            assert not engine.streams
        finally:
            engine.close()
    asyncio.run(main())


def test_a_recent_state_is_the_state_reading_the_log_again_gives(served):
    """Going back to a recent state (a copy) puts a stream where reading its log again from the
    checkpoint would (the slow path, still taken for older points): checked on the engine thread
    while the stream plays, at the end of its log and a few tokens earlier."""
    async def main():
        engine = make_engine(served)
        engine.start()
        try:
            stream = await engine.open(None, sampling=SamplingConfig(seed=5), timeline=Timeline(400), realtime=True,
                                       sink=lambda notes: None, on_error=print)
            # a second stream, so that the two step in one batch
            await engine.open(None, sampling=SamplingConfig(seed=6), timeline=Timeline(400), realtime=True,
                              sink=lambda notes: None, on_error=print)

            def compare():  # on the engine thread: nothing moves meanwhile
                if len(stream.log) < 4:
                    return None
                checked = []
                for back in (0, 3):
                    n = len(stream.log) - back
                    recent = stream.recent.after(n)
                    assert recent is not None, f"no recent state after {n} of {len(stream.log)} tokens"
                    replayed = replay(stream.checkpoint, stream.log[:n], engine.tokenizer, stream.offset)
                    rows = torch.tensor([stream.slot])
                    start = FieldState(engine.saved_field[rows], engine.saved_position[rows])
                    state, out = engine.generator.read(start, replayed.floats[None], replayed.slots[None])
                    checked.append((recent, state, out))
                return checked

            checked = None
            deadline = time.monotonic() + 30
            while checked is None and time.monotonic() < deadline:
                checked = await engine._call(compare)
                await asyncio.sleep(0.05)
            assert checked is not None, "the stream never logged 4 tokens after its checkpoint"
            for recent, state, out in checked:
                # its own memory: no view into a batch or the slab that would keep them alive
                assert recent.field.untyped_storage().nbytes() == recent.field.nbytes
                assert recent.hidden.untyped_storage().nbytes() == recent.hidden.nbytes
                assert int(recent.position) == int(state.position[0])
                torch.testing.assert_close(recent.field.float(), state.field[0].float(), atol=2e-3, rtol=2e-3)
                torch.testing.assert_close(recent.hidden.float(), out.hidden[0].float(), atol=2e-2, rtol=2e-2)
        finally:
            engine.close()
    asyncio.run(main())


def test_recent_states_follow_the_log():
    """Kept by log length; a cut log forgets the states past it, a fold moves the keys down, and
    only the newest RECENT_STATES stay."""
    recent = RecentStates(size=4)
    row = lambda n: (torch.full((2,), float(n)), torch.tensor(n), torch.full((3,), float(n)))
    for n in range(1, 6):
        recent.record(n, *row(n))
    assert len(recent) == 4 and recent.after(1) is None and float(recent.after(5).field[0]) == 5
    recent.cut(3)  # a rollback kept the first 3 tokens
    assert recent.after(4) is None and recent.after(5) is None and float(recent.after(3).field[0]) == 3
    recent.record(4, *row(40))  # the played note read after them
    assert float(recent.after(4).field[0]) == 40
    recent.record(3, *row(30))  # read again from 3: the state after 4 is void
    assert recent.after(4) is None and float(recent.after(3).field[0]) == 30
    recent.shift(2)  # a fold took the first 2 tokens into the checkpoint
    assert float(recent.after(1).field[0]) == 30 and float(recent.after(0).field[0]) == 2
    recent.clear()
    assert len(recent) == 0


PLAYED_PITCHES = (55, 59, 62, 67)  # pitches of the tiny corpus (its vocabulary has few others)


async def open_live(engine: Engine, received: list, seed: int, bpm: float = 120, **kwargs):
    return await engine.open(None, sampling=SamplingConfig(seed=seed), timeline=Timeline(bpm), realtime=True,
                             sink=received.extend, on_error=print, **kwargs)


def test_played_notes_drop_the_unsent_notes_and_are_answered_from_the_latest_sent_one(served):
    """The stream goes back to the latest sent note, reads the played notes at their own time and
    generates on from there: the next note is the token after the sent one, it heard the played
    notes, and it starts no sooner than a lookahead from now."""
    async def main():
        engine = make_engine(served, lookahead=0.1, generate_ahead=0.5)
        engine.start()
        received = []
        try:
            stream = await open_live(engine, received, seed=5)
            await wait_until(lambda: len(received) >= 6, 30, lambda: f"generated notes: {len(received)} so far")
            sent = received[2]
            stream.sent_step = sent.step  # the client has been sent three notes; the rest are void
            now = time.time() - stream.clock
            beat = stream.timeline.beat_at(now)
            played = [StreamNote(beat, 0.5, pitch, 90, 0) for pitch in PLAYED_PITCHES]
            fed = await engine.feed(stream, played, heard_until=now)
            assert fed.tokens >= 1 and fed.epoch == 1
            answers = lambda: [n for n in received if n.epoch == fed.epoch]
            await wait_until(lambda: len(answers()) >= 3, 30, lambda: f"answers: {len(answers())} so far")
            first = answers()[0]
            assert all(n.heard_until == now for n in answers())
            assert all(n.heard_until is None for n in received if n.epoch == 0)
            assert first.step > sent.step  # generation went on from the sent note, not after the dropped ones
            assert min(n.step for n in received if n.epoch == 0 and n.step > sent.step) == sent.step + 1
            assert first.beat >= beat  # not before the played note, nor (floor) before now + lookahead
            beats = [n.beat for n in answers()]
            assert beats == sorted(beats)
            assert engine.metrics.rollbacks._value.get() == 1
        finally:
            engine.close()
    asyncio.run(main())


def test_the_rollback_log_stays_short_while_notes_are_sent(served):
    """Sent tokens fold into the checkpoint: the log holds about the unsent tail, not the session."""
    async def main():
        engine = make_engine(served)
        engine.start()
        received = []
        try:
            stream = await open_live(engine, received, seed=6, bpm=400)

            def send_all() -> bool:
                if received:
                    stream.sent_step = received[-1].step
                return stream.steps > 3 * FOLD_TOKENS
            await wait_until(send_all, 60, lambda: f"tokens: {stream.steps}")
            assert stream.checkpoint.steps > 0 and len(stream.log) < 2 * FOLD_TOKENS
            fed = await engine.feed(stream, [StreamNote(stream.frontier, 0.5, p, 90, 0) for p in PLAYED_PITCHES])
            assert fed.epoch == 1
            await wait_until(lambda: any(n.epoch == 1 for n in received), 30, lambda: "an answer after the fold")
        finally:
            engine.close()
    asyncio.run(main())


def played_voices(engine: Engine, seed: int, count: int, banned: tuple[int, ...]) -> list[int]:
    async def main():
        engine.start()
        received = []
        try:
            await open_live(engine, received, seed=seed, bpm=400, banned_voices=banned)
            await wait_until(lambda: len(received) >= count, 60, lambda: f"notes: {len(received)} so far")
        finally:
            engine.close()
        return [n.voice for n in received]
    return asyncio.run(main())


@pytest.mark.parametrize("banned", [(0,), (0, 1), (0, 1, 2)], ids=["one voice", "two voices", "three voices"])
def test_accompaniment_never_plays_the_players_voices_and_plays_the_others(served, banned):
    """The tiny model learned two voices (0 and 1, tests/conftest.py's corpus); its voice head has 16
    and puts a little weight on the rest. "Plays the others" is checked against the voices it plays
    often (a tenth of its notes or more) when nothing is banned: each one not banned still comes;
    with both learned voices banned, it still plays, in the voices left."""
    free = played_voices(make_engine(served), seed=7, count=80, banned=())
    voices = played_voices(make_engine(served), seed=7, count=80, banned=banned)
    assert len(voices) >= 80
    assert not set(voices) & set(banned)
    common = {v for v in free if free.count(v) * 10 >= len(free)}
    assert common and common - set(banned) <= set(voices)
