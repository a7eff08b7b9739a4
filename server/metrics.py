"""Prometheus metrics of one server (its own registry, so several apps can live in one process)."""

from __future__ import annotations

import collections
import threading
import time

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector,
                               generate_latest)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
STEP_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)  # process_resident_memory_bytes and friends
        self.sessions = Gauge("fm_sessions", "WebSocket sessions with a connected client", registry=r)
        self.detached = Gauge("fm_sessions_detached", "dropped sessions waiting for their resume token", registry=r)
        self.jobs = Gauge("fm_generate_jobs", "POST /generate requests in progress", registry=r)
        self.tokens = Counter("fm_tokens", "tokens generated", registry=r)
        self.tokens_per_second = Gauge("fm_tokens_per_second", "tokens generated per second over the last 10 s",
                                       registry=r)
        self.batch_size = Histogram("fm_batch_size", "streams advanced per model step", buckets=BATCH_BUCKETS,
                                    registry=r)
        self.step_seconds = Histogram("fm_step_seconds", "time of one batched step (model, sampling, update)",
                                      buckets=STEP_BUCKETS, registry=r)
        self.notes_sent = Counter("fm_notes_sent", "notes sent to WebSocket clients", registry=r)
        self.late_notes = Counter("fm_late_notes", "notes sent after their start time to clients that read "
                                  "their socket", registry=r)
        self.late_notes_slow_client = Counter("fm_late_notes_slow_client", "notes sent after their start time "
                                              "to clients whose socket was not draining", registry=r)
        self.slow_clients = Counter("fm_slow_clients_dropped", "connections closed for not reading (--send-timeout)",
                                    registry=r)
        self.notes_moved = Counter("fm_notes_moved", "generated notes placed before the stream's latest onset "
                                   "and moved up to it (a live stream only moves forward)", registry=r)
        self.errors = Counter("fm_errors", "errors reported to clients, by code", ["code"], registry=r)
        self.state_bytes = Gauge("fm_session_state_bytes",
                                 "bytes of model state per stream (field vector and position); fixed", registry=r)
        self.slot_bytes = Gauge("fm_session_slot_bytes",
                                "bytes the engine keeps per stream (state plus the next token's scores); fixed",
                                registry=r)
        self.rollback_bytes = Gauge("fm_session_rollback_bytes",
                                    "bytes of the rollback checkpoint per live stream (field, position, heard "
                                    "counts and the model's output there: what a snapshot holds); fixed, besides a host-side log of at most "
                                    "512 tokens", registry=r)
        self.rollbacks = Counter("fm_rollbacks", "times a live stream went back to its latest sent note to "
                                 "answer played notes", registry=r)
        self.notes_dropped = Counter("fm_notes_dropped", "generated notes dropped unsent by a rollback", registry=r)
        self.restored = Counter("fm_sessions_restored", "sessions brought back from a snapshot, by source: store "
                                "(resumed on this replica from the shared --store), fork", ["source"], registry=r)
        self.reread = Counter("fm_sessions_reread", "sessions restored from another checkpoint's snapshot (re-read "
                              "from their last tokens)", registry=r)
        self.snapshots_saved = Counter("fm_snapshots_saved", "session snapshots written to the store", registry=r)
        self.snapshot_bytes = Counter("fm_snapshot_bytes", "bytes of session snapshots written to the store",
                                      registry=r)
        self.save_seconds = Histogram("fm_snapshot_save_seconds", "time to capture, encode and write one batch of "
                                      "session snapshots", buckets=STEP_BUCKETS, registry=r)
        self.store_errors = Counter("fm_store_errors", "failed writes to the session store", registry=r)
        self._window: collections.deque[tuple[float, int]] = collections.deque()
        self._lock = threading.Lock()

    def step(self, batch: int, seconds: float) -> None:
        """Record one batched step of ``batch`` tokens (called by the engine thread)."""
        self.batch_size.observe(batch)
        self.step_seconds.observe(seconds)
        self.tokens.inc(batch)
        now = time.monotonic()
        with self._lock:
            self._window.append((now, batch))
            self._update_rate(now)

    def _update_rate(self, now: float) -> None:
        while self._window and self._window[0][0] < now - 10.0:
            self._window.popleft()
        self.tokens_per_second.set(sum(n for _, n in self._window) / 10.0)

    def render(self) -> bytes:
        with self._lock:
            self._update_rate(time.monotonic())
        return generate_latest(self.registry)
