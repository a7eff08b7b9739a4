"""The batching engine with a real (tiny) model: jobs, live streams, failures, fixed state."""

from __future__ import annotations

import asyncio
import math

import pytest

from model.checkpoint.format import load_model
from model.sampling.config import SamplingConfig
from server.engine import Engine, StreamNote
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


def test_a_failed_step_fails_its_streams_and_the_engine_carries_on(served, monkeypatch):
    async def main():
        engine = make_engine(served)
        engine.start()
        try:
            real_advance = engine.generator.advance
            calls = {"n": 0}

            def broken_once(*args, **kwargs):  # a simulated device error in one step
                calls["n"] += 1
                if calls["n"] == 3:
                    raise RuntimeError("simulated device error")
                return real_advance(*args, **kwargs)

            monkeypatch.setattr(engine.generator, "advance", broken_once)
            with pytest.raises(RuntimeError, match="simulated device error"):
                await run_job(engine, 20, seed=1)
            notes, stream = await run_job(engine, 20, seed=2)  # the next stream is served
            assert stream.steps == 20
        finally:
            engine.close()
    asyncio.run(main())


def test_live_stream_state_stays_the_same_size_and_played_notes_are_read(served):
    async def main():
        engine = make_engine(served)
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
            tokens, unknown = await engine.feed(stream, played)
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
            beats = [n.beat for n in received]
            assert beats == sorted(beats)  # a live stream only moves forward
            await engine.release(stream)
            assert not engine.streams
        finally:
            engine.close()
    asyncio.run(main())
