"""`<run_dir>/trace.json`: the run's timeline, valid JSON at every moment, bounded in size.

    Tracer.drain() (driver, rollout manager, ...) ─► TraceWriter.add(events, step)
        ├─ step ≤ head_steps ───────────► head (kept for good)
        ├─ the last tail_steps steps ───► tail (a rolling window)
        ├─ a step leaving the tail ─────► only its summary spans ("step") stay
        └─ OtelSink.export(events)       (with logging.otel_endpoint)
    flush(): at most every flush_s seconds, the whole file written to a temporary file and
             renamed over trace.json (os.replace is atomic: a killed run leaves the last flush)

Size: (head_steps + tail_steps) steps of every event (40 events of ~145 bytes per demo step)
plus one summary span (~120 bytes) per other step: 20 + 200 demo steps = 1.3 MB, 5,000 steps
1.8 MB (measured). Events past `max_events_per_step` in one step are dropped and
counted in `otherData.slime_rl.dropped_events`.

A resumed run (`resume_step`) reads the previous trace.json back, drops what came after the
checkpoint's step, and goes on in the same file.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["TraceWriter", "TRACE_FILE", "SUMMARY_SPANS", "encode_event"]

logger = logging.getLogger(__name__)

TRACE_FILE = "trace.json"
SUMMARY_SPANS = frozenset({"step"})
"""Span names kept for every step, however long the run (the driver's step span)."""


def encode_event(event: dict[str, Any]) -> str:
    """One event as compact JSON; NaN and infinities (not JSON) become null."""
    try:
        return json.dumps(event, separators=(",", ":"), allow_nan=False, default=str)
    except ValueError:
        return json.dumps(_finite(event), separators=(",", ":"), allow_nan=False, default=str)


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


class TraceWriter:
    """Collects drained events per step and keeps `trace.json` valid and bounded.

    Example:
        >>> writer = TraceWriter(run_dir, head_steps=20, tail_steps=200)   # doctest: +SKIP
        >>> writer.add(driver_tracer.drain() + manager_events, step=7)       # doctest: +SKIP
        >>> writer.flush()          # rate-limited by flush_s; close() always writes   # doctest: +SKIP
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        head_steps: int = 20,
        tail_steps: int = 200,
        flush_s: float = 5.0,
        max_events_per_step: int = 20_000,
        resume_step: int | None = None,
        sink: Any = None,
        run_name: str = "",
    ) -> None:
        self.path = Path(run_dir) / TRACE_FILE
        self.head_steps, self.tail_steps = head_steps, max(1, tail_steps)
        self.flush_s, self.max_events_per_step = flush_s, max_events_per_step
        self.sink = sink
        """Where the same events also go (`OtelSink`), or None."""
        self.run_name = run_name
        self._meta: dict[tuple[str, int, int], str] = {}
        self._head: list[str] = []
        self._summaries: list[str] = []
        self._tail: collections.deque[tuple[int, list[str], list[str]]] = collections.deque()
        self._per_step: dict[int, int] = {}
        self._step = 0
        self._first_step: int | None = None
        self._dropped = 0
        self._dirty = False
        self._last_flush = float("-inf")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            self._reload(resume_step)

    # ---- adding ------------------------------------------------------------------------------
    def add(self, events: Iterable[dict[str, Any]], step: int | None = None) -> None:
        """Store events collected during `step` (default: the last step seen). Spans and instants
        get `args.step` unless they carry one; metadata ("M") is kept once per track lane."""
        step = self._step if step is None else int(step)
        self._step = max(self._step, step)
        if self._first_step is None:
            self._first_step = step
        events = list(events)
        for e in events:
            ph = e.get("ph")
            if ph == "M":
                self._meta.setdefault((e.get("name", ""), e.get("pid", 0), e.get("tid", 0)), encode_event(e))
                continue
            if ph in ("X", "i"):
                args = e.setdefault("args", {})
                args.setdefault("step", step)
            self._store(step, e)
        if self.sink is not None and events:
            try:
                self.sink.export(events)
            except Exception as ex:  # an unreachable collector never stops the run
                logger.warning("trace: sending spans to OpenTelemetry failed: %s", ex)
        self._dirty = True

    def _store(self, step: int, e: dict[str, Any]) -> None:
        summary = e.get("ph") == "X" and e.get("name") in SUMMARY_SPANS
        if not summary:
            n = self._per_step.get(step, 0)
            if n >= self.max_events_per_step:
                self._dropped += 1
                return
            self._per_step[step] = n + 1
        text = encode_event(e)
        if step <= self.head_steps:
            self._head.append(text)
            return
        if self._tail and self._tail[-1][0] == step:
            bucket = self._tail[-1]
        else:
            bucket = next((b for b in self._tail if b[0] == step), None)
            if bucket is None:
                if step < (self._tail[0][0] if self._tail else step):  # older than the window
                    if summary:
                        self._summaries.append(text)
                    return
                bucket = (step, [], [])
                self._tail.append(bucket)
                self._evict()
        (bucket[2] if summary else bucket[1]).append(text)

    def _evict(self) -> None:
        while len(self._tail) > self.tail_steps:
            step, _, summaries = self._tail.popleft()
            self._summaries.extend(summaries)
            self._per_step.pop(step, None)

    # ---- writing -----------------------------------------------------------------------------
    def flush(self, force: bool = False) -> bool:
        """Rewrite trace.json if something changed and `flush_s` has passed (or `force`).
        Returns whether it wrote."""
        now = time.monotonic()
        if not self._dirty or (not force and now - self._last_flush < self.flush_s):
            return False
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write('{"traceEvents":[\n')
            first = True
            for part in (self._meta.values(), self._head, self._summaries,
                         *((*b[2], *b[1]) for b in self._tail)):
                for text in part:
                    if not first:
                        f.write(",\n")
                    f.write(text)
                    first = False
            f.write('\n],"displayTimeUnit":"ms","otherData":')
            f.write(json.dumps({"slime_rl": self.info()}))
            f.write("}\n")
        os.replace(tmp, self.path)
        self._dirty = False
        self._last_flush = now
        return True

    def close(self) -> Path:
        """Write everything and close the sink (its last spans are sent)."""
        self._dirty = True
        self.flush(force=True)
        if self.sink is not None:
            try:
                self.sink.close()
            except Exception as ex:
                logger.warning("trace: closing the OpenTelemetry exporter failed: %s", ex)
            self.sink = None
        return self.path

    def info(self) -> dict[str, Any]:
        """What the file holds (written as `otherData.slime_rl`)."""
        tail_from = self._tail[0][0] if self._tail else None
        return {
            "run": self.run_name,
            "first_step": self._first_step,
            "last_step": self._step,
            "head_steps": self.head_steps,
            "tail_steps": self.tail_steps,
            "all_events_of_steps": f"<= {self.head_steps} and >= {tail_from}" if tail_from else f"<= {self.head_steps}",
            "summary_only_steps": max(0, (tail_from or 0) - self.head_steps - 1),
            "dropped_events": self._dropped,
        }

    # ---- resume ------------------------------------------------------------------------------
    def _reload(self, resume_step: int) -> None:
        try:
            events = json.loads(self.path.read_text(encoding="utf-8"))["traceEvents"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            logger.warning("trace: %s cannot be read back (%s); the resumed run starts a new timeline", self.path, e)
            return
        step = 0
        for e in events:
            if e.get("ph") == "M":
                self._meta.setdefault((e.get("name", ""), e.get("pid", 0), e.get("tid", 0)), encode_event(e))
                continue
            step = int(e.get("args", {}).get("step", step)) if e.get("ph") != "C" else step
            if step <= resume_step:
                self._store(step, e)
                self._step = max(self._step, step)
                if self._first_step is None:
                    self._first_step = step
        self._dirty = True
