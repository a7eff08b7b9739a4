"""Which streams step: the most urgent live ones first, jobs fill the rest."""

from __future__ import annotations

from dataclasses import dataclass

from server.scheduler import Scheduler


@dataclass(eq=False)
class FakeStream:  # the scheduler only reads these attributes
    name: str
    due: float = 0.0
    realtime: bool = True
    remaining: int = 0
    ready: bool = True
    failed: bool = False
    paused: bool = False

    def deadline(self) -> float:
        return self.due


def names(batch) -> list[str]:
    return [s.name for s in batch]


def test_live_streams_step_when_their_music_runs_low_most_urgent_first():
    scheduler = Scheduler(max_batch=10, horizon=1.0)
    streams = [FakeStream("later", due=100.8), FakeStream("soon", due=100.2), FakeStream("enough", due=101.5)]
    assert names(scheduler.select(streams, now=100.0)) == ["soon", "later"]


def test_paused_failed_and_unready_streams_do_not_step():
    scheduler = Scheduler(max_batch=10, horizon=1.0)
    streams = [FakeStream("paused", paused=True), FakeStream("failed", failed=True),
               FakeStream("reading", ready=False), FakeStream("ok")]
    assert names(scheduler.select(streams, now=0.0)) == ["ok"]


def test_jobs_fill_what_the_live_streams_leave_of_the_batch():
    scheduler = Scheduler(max_batch=3, horizon=1.0)
    streams = [FakeStream("job1", realtime=False, remaining=5), FakeStream("done", realtime=False, remaining=0),
               FakeStream("a", due=0.1), FakeStream("b", due=0.2), FakeStream("job2", realtime=False, remaining=1)]
    assert names(scheduler.select(streams, now=0.0)) == ["a", "b", "job1"]
    assert names(Scheduler(max_batch=2, horizon=1.0).select(streams, now=0.0)) == ["a", "b"]


def test_wait_time_is_until_the_next_stream_needs_tokens():
    scheduler = Scheduler(max_batch=4, horizon=1.0, idle_wait=0.5)
    assert abs(scheduler.wait_time([FakeStream("x", due=11.2)], now=10.0) - 0.2) < 1e-9
    assert scheduler.wait_time([FakeStream("x", due=20.0)], now=10.0) == 0.5
    assert scheduler.wait_time([], now=10.0) == 0.5
