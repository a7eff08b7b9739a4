"""Which streams take part in the next model step (the "schedule" of schedule -> execute -> update).

A live stream asks for tokens while the music it has generated ends less than ``horizon`` seconds
ahead of now (lookahead + generate-ahead); the ones whose music runs out soonest go first. Jobs
(``POST /generate``) have no deadline: they fill the rest of the batch.
"""

from __future__ import annotations

from typing import Iterable, Protocol


class Schedulable(Protocol):
    ready: bool
    failed: bool
    paused: bool
    realtime: bool
    remaining: int

    def deadline(self) -> float: ...


class Scheduler:
    def __init__(self, *, max_batch: int, horizon: float, idle_wait: float = 0.02) -> None:
        self.max_batch = max_batch
        self.horizon = horizon
        self.idle_wait = idle_wait

    def _active(self, stream: Schedulable) -> bool:
        return stream.ready and not stream.failed and not stream.paused

    def select(self, streams: Iterable[Schedulable], now: float) -> list:
        """Streams to advance by one token now, most urgent first, at most ``max_batch``."""
        live, jobs = [], []
        for stream in streams:
            if not self._active(stream):
                continue
            if stream.realtime:
                deadline = stream.deadline()
                if deadline < now + self.horizon:
                    live.append((deadline, stream))
            elif stream.remaining > 0:
                jobs.append(stream)
        live.sort(key=lambda item: item[0])
        batch = [stream for _, stream in live[: self.max_batch]]
        return batch + jobs[: self.max_batch - len(batch)]

    def wait_time(self, streams: Iterable[Schedulable], now: float) -> float:
        """Seconds until some live stream will ask for tokens (at most ``idle_wait``)."""
        soonest = self.idle_wait
        for stream in streams:
            if self._active(stream) and stream.realtime:
                soonest = min(soonest, stream.deadline() - self.horizon - now)
        return max(soonest, 0.0)
