"""Recording spans inside one process (the driver, the rollout manager actor, any actor).

    with tracer.span("score", group_id=g):        ─┐
    tracer.complete("generate", t0, t1, track=…)   ├─► bounded deque of Chrome trace events
    tracer.instant("admit", group_id=g)            │   (+ one metadata event per new track lane)
    tracer.counter("groups_in_flight", 5)         ─┘
                                                       │  drain(): once per step, by the driver
                                                       ▼  (one call that it makes anyway)
                                                 TraceWriter (slime_rl/tracing/writer.py)

Recording never leaves the process: a span is one dict appended to a deque under a lock
(~2-4 µs, docs/BENCHMARKS.md "Tracing"); the driver collects them once per step. When nobody
drains, the oldest events go first and are counted (`dropped`).

Times: callers pass `time.monotonic()` seconds (what the project measures with); a tracer
turns them into wall-clock microseconds with one offset taken at start, so events of different
processes on one node line up (across nodes, as well as their clocks agree).

Tracks: one Chrome process per actor (`driver`, `trainer-rank0`, `rollout-manager`, `buffer`,
`engine-0`, ...; `track_pid` fixes their ids and order). Spans of one track that overlap without
nesting (eight groups scoring at once) go to extra lanes (threads `rollout-manager #2`, ...):
Perfetto drops a slice that overlaps its neighbour on one thread, so each lane holds only
properly nested spans.
"""

from __future__ import annotations

import bisect
import collections
import re
import threading
import time
import zlib
from typing import Any

__all__ = ["Tracer", "track_pid", "lane_tid", "SPAN_NAMES"]

SPAN_NAMES = {
    "admit": "instant on rollout-manager: a group took a slot (group_id, prompt, engine)",
    "generate": "engine-i: one generate_group call of a group (group_id, engine, tokens, version)",
    "score": "rollout-manager: reward scoring of a group's samples (group_id, samples)",
    "filter": "rollout-manager: the dynamic-sampling filter (group_id, kept, reason)",
    "put": "buffer: one buffer.put of the finished groups (groups, group_ids, samples)",
    "requeue": "instant on rollout-manager: a group's engine was lost (group_id, engine)",
    "step": "driver: one whole trainer step, the summary span kept for every step (step, version)",
    "buffer_wait": "driver: waiting for B groups (step)",
    "train_step": "trainer-rank0: the optimizer step (step, version, samples, tokens)",
    "weight_sync": "driver: WeightSync.publish (gather on rank 0) and waits on the sync (step, version)",
    "update_weights": "engine-i: loading a version into one engine (version, engine)",
    "eval": "rollout-manager: one evaluation pinned to a version (version, step)",
    "checkpoint": "driver: writing a run checkpoint (step)",
}
"""The span names the run records and `slime-rl trace` reads (one name per phase)."""

_FIXED_PIDS = {"driver": 1, "rollout-manager": 100, "buffer": 200}
_NUMBERED = (("trainer-rank", 10), ("engine-", 1000))
_LANES_MAX = 64
"""Lanes per track; past that, overlapping spans share the last lane (Perfetto may hide some)."""
_LANE_SPANS = 16
"""Top-level spans a lane remembers; a span starting before the forgotten ones takes another lane."""


def track_pid(track: str) -> int:
    """The Chrome pid of a track: fixed for the run's actors (so their order is always the
    same in the viewer), a stable hash for any other name."""
    pid = _FIXED_PIDS.get(track)
    if pid is not None:
        return pid
    for prefix, base in _NUMBERED:
        m = re.fullmatch(re.escape(prefix) + r"(\d+)", track)
        if m and int(m.group(1)) < 1000:
            return base + int(m.group(1))
    return 10_000 + zlib.crc32(track.encode()) % 1_000_000


def lane_tid(pid: int, lane: int) -> int:
    """Thread id of a track's lane: the pid itself for lane 0."""
    return pid if lane == 0 else pid * 1000 + lane


class _Lane:
    """The top-level spans of one lane (sorted by end), enough to place the next span."""

    __slots__ = ("spans", "horizon")

    def __init__(self) -> None:
        self.spans: list[tuple[float, float]] = []
        self.horizon = float("-inf")
        """Largest end of the spans forgotten from `spans`: no new span may start before it."""

    def fits(self, start: float, end: float) -> bool:
        """[start, end] keeps the lane properly nested: every kept span lies before it, after it
        or inside it (then it becomes that span's parent)."""
        if start < self.horizon:
            return False
        if not self.spans or self.spans[-1][1] <= start:  # the common case: after everything
            return True
        return all(e <= start or s >= end or (s >= start and e <= end) for s, e in self.spans)

    def place(self, start: float, end: float) -> None:
        spans = [(s, e) for s, e in self.spans if not (s >= start and e <= end)]  # its children
        bisect.insort(spans, (start, end), key=lambda se: se[1])
        if len(spans) > _LANE_SPANS:
            self.horizon = max(self.horizon, spans[0][1])
            del spans[0]
        self.spans = spans


class _Span:
    """`with tracer.span(...) as s:`; `s.args[...] = ...` adds what is known only at the end."""

    __slots__ = ("tracer", "name", "track", "args", "start")

    def __init__(self, tracer: Tracer, name: str, track: str | None, args: dict[str, Any]) -> None:
        self.tracer, self.name, self.track, self.args = tracer, name, track, args
        self.start = 0.0

    def __enter__(self) -> _Span:
        self.start = time.monotonic()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.args["error"] = exc_type.__name__
        self.tracer.complete(self.name, self.start, time.monotonic(), track=self.track, **self.args)


class _NullSpan:
    __slots__ = ("args",)

    def __init__(self) -> None:
        self.args: dict[str, Any] = {}

    def __enter__(self) -> _NullSpan:
        self.args.clear()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.args.clear()


class Tracer:
    """Records Chrome trace events of one process; `drain()` hands them over.

    Example:
        >>> tracer = Tracer(track="rollout-manager")
        >>> with tracer.span("score", group_id="p7-e0") as s:
        ...     s.args["samples"] = 8
        >>> t0 = tracer.now(); tracer.complete("generate", t0, t0 + 0.5, track="engine-0", tokens=120)
        >>> [e["name"] for e in tracer.drain() if e["ph"] == "X"]
        ['score', 'generate']
    """

    def __init__(self, track: str, *, enabled: bool = True, max_events: int = 100_000) -> None:
        self.track = track
        """Default track of this tracer's events (the actor's name in the timeline)."""
        self.enabled = enabled
        self._events: collections.deque[dict[str, Any]] = collections.deque(maxlen=max(1, max_events))
        self._meta: list[dict[str, Any]] = []
        self._lanes: dict[str, list[_Lane]] = {}
        self._lock = threading.Lock()
        self._offset_us = (time.time() - time.monotonic()) * 1e6
        self._null = _NullSpan()
        self._known: set[tuple[str, int]] = set()
        self.dropped = 0
        """Events lost because `max_events` were waiting (nobody drained in time)."""

    @staticmethod
    def now() -> float:
        """The tracer's clock: `time.monotonic()` seconds."""
        return time.monotonic()

    def span(self, name: str, *, track: str | None = None, **args: Any) -> _Span | _NullSpan:
        """A context manager timing its block as one complete event."""
        if not self.enabled:
            return self._null
        return _Span(self, name, track, args)

    def complete(self, name: str, start_s: float, end_s: float, *, track: str | None = None, **args: Any) -> None:
        """A span measured elsewhere: `start_s`/`end_s` are `time.monotonic()` seconds."""
        if not self.enabled:
            return
        end_s = max(end_s, start_s)
        with self._lock:
            pid, tid = self._place(track or self.track, start_s, end_s)
            ts = round(start_s * 1e6 + self._offset_us)  # both ends rounded alike: adjacent spans never overlap
            self._append({"name": name, "ph": "X", "ts": ts, "dur": round(end_s * 1e6 + self._offset_us) - ts,
                          "pid": pid, "tid": tid, "args": args})

    def instant(self, name: str, at_s: float | None = None, *, track: str | None = None, **args: Any) -> None:
        """A point in time (`admit`, `requeue`); `at_s` defaults to now."""
        if not self.enabled:
            return
        ts = round((time.monotonic() if at_s is None else at_s) * 1e6 + self._offset_us)
        with self._lock:
            pid, tid = self._ids(track or self.track, 0)
            self._append({"name": name, "ph": "i", "s": "t", "ts": ts, "pid": pid, "tid": tid, "args": args})

    def counter(self, name: str, value: float, at_s: float | None = None, *, track: str | None = None) -> None:
        """A sampled value drawn as a counter track (`engines_serving`, `groups_in_flight`)."""
        if not self.enabled:
            return
        ts = round((time.monotonic() if at_s is None else at_s) * 1e6 + self._offset_us)
        with self._lock:
            pid, _ = self._ids(track or self.track, 0)
            self._append({"name": name, "ph": "C", "ts": ts, "pid": pid, "args": {"value": value}})

    def drain(self) -> list[dict[str, Any]]:
        """Every event recorded since the last drain (metadata of new lanes first); cheap to send
        through Ray (plain dicts). A counter `trace/dropped_events` reports losses."""
        with self._lock:
            out = self._meta + list(self._events)
            self._meta = []
            self._events.clear()
            if self.dropped:
                pid = track_pid(self.track)
                out.append({"name": "trace/dropped_events", "ph": "C", "pid": pid,
                            "ts": round(time.monotonic() * 1e6 + self._offset_us), "args": {"value": self.dropped}})
        return out

    # ---- internals (called under the lock) ----------------------------------------------------
    def _append(self, event: dict[str, Any]) -> None:
        if len(self._events) == self._events.maxlen:
            self.dropped += 1
        self._events.append(event)

    def _place(self, track: str, start: float, end: float) -> tuple[int, int]:
        lanes = self._lanes.get(track)
        if lanes is None:
            lanes = self._lanes[track] = []
        for i, lane in enumerate(lanes):
            if lane.fits(start, end):
                lane.place(start, end)
                return self._ids(track, i)
        if len(lanes) < _LANES_MAX:
            lanes.append(_Lane())
        lanes[-1].place(start, end)
        return self._ids(track, len(lanes) - 1)

    def _ids(self, track: str, lane: int) -> tuple[int, int]:
        pid = track_pid(track)
        tid = lane_tid(pid, lane)
        if (track, lane) not in self._known:
            if (track, -1) not in self._known:  # the track's process
                self._known.add((track, -1))
                self._meta.append({"name": "process_name", "ph": "M", "pid": pid, "tid": pid, "args": {"name": track}})
                self._meta.append({"name": "process_sort_index", "ph": "M", "pid": pid, "tid": pid,
                                   "args": {"sort_index": pid}})
            self._known.add((track, lane))
            self._meta.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": tid,
                               "args": {"name": track if lane == 0 else f"{track} #{lane + 1}"}})
        return pid, tid
