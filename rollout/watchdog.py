"""Stall alarms on the rollout side: groups that take far longer than usual, engines that stop.

    every few seconds (manager actor):
        each RUNNING group older than max(stall_min_s, stall_factor x median group time)
            ─► one warning: group, prompt id, engine, age, tokens so far (engine.progress)
        each engine with requests in flight:
            tokens went up since the last look ─► alive
            no new token (or no answer) for engine_stall_s ─► treated as lost: killed, so every
            call on it fails at once, its groups requeue and the fleet starts a replacement
        each engine with a weight update pending (and nothing in flight):
            it answers the probe ─► alive (a slow load is bounded by weight_update_timeout_s)
            no answer for engine_stall_s ─► treated as lost as above: its update fails with the
            actor gone, the sync goes on without it, the replacement loads the kept weights

A stopped process (SIGSTOP), a deadlocked engine loop or a wedged device never answer a
generate call; without this the trainer would wait for their groups until the buffer's timeout.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import statistics
import time
from collections.abc import Callable
from typing import Any

from slime_rl.rollout.admission import Admission, GroupState
from slime_rl.rollout.engine_pool import EnginePool

logger = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 10.0
"""Longest a progress probe may take before it counts as no answer (at most half of
`engine_stall_s`, so a stopped engine is caught within about 1.5x `engine_stall_s`)."""


class StallWatch:
    """Watches the manager's groups and engines (see the module docstring)."""

    def __init__(self, admission: Admission, pool: EnginePool, *, stall_factor: float, stall_min_s: float,
                 engine_stall_s: float, kill: Callable[[Any], None]) -> None:
        self.admission = admission
        self.pool = pool
        self.stall_factor = stall_factor
        self.stall_min_s = stall_min_s
        self.engine_stall_s = engine_stall_s
        self.kill = kill
        """Ends an engine's actor (its calls then fail with the actor gone)."""
        self.durations: collections.deque[float] = collections.deque(maxlen=200)
        """Seconds of recently finished groups (the median is the yardstick)."""
        self._warned: set[str] = set()
        self._tokens: dict[str, int] = {}
        self._progress_at: dict[str, float] = {}
        self._killed: set[str] = set()
        """Engines killed and not yet gone from the pool (killed once, counted once)."""
        self.stalled_groups = 0
        """Groups in flight now that are past the stall age."""
        self.warnings = 0
        """Stall warnings over the run."""
        self.engines_killed = 0
        """Engines killed as stalled over the run."""

    def finished(self, seconds: float) -> None:
        self.durations.append(seconds)

    def stall_age(self) -> float:
        median = statistics.median(self.durations) if self.durations else 0.0
        return max(self.stall_min_s, self.stall_factor * median)

    async def run(self, period_s: float | None = None) -> None:
        period = period_s or max(1.0, min(5.0, self.stall_min_s / 4, self.engine_stall_s / 4))
        while True:
            await asyncio.sleep(period)
            await self.check()

    async def check(self) -> None:
        now = time.monotonic()
        age_limit = self.stall_age()
        running = [w for w in self.admission if w.state is GroupState.RUNNING]
        live = {w.group_id for w in running}
        self._warned &= live
        stalled = [w for w in running if now - w.started > age_limit]
        self.stalled_groups = len(stalled)
        by_engine: dict[str, list[Any]] = collections.defaultdict(list)
        for w in running:
            by_engine[w.engine].append(w)
        for slot in self.pool.slots:
            if slot.updating:  # a stopped engine never finishes its weight update either
                by_engine.setdefault(slot.name, [])
        probes = {name: self._probe(name, works) for name, works in by_engine.items()}
        tokens = dict(zip(probes, await asyncio.gather(*probes.values()), strict=True))
        for w in stalled:
            if w.group_id in self._warned:
                continue
            self._warned.add(w.group_id)
            self.warnings += 1
            got = tokens.get(w.engine)
            mine = sum(got[1].get(r, 0) for r in w.request_ids) if got and got[1] is not None else None
            logger.warning(
                "group %s (prompt %s) on %s in flight for %.0f s, %.1fx the median group time (%.1f s): %s",
                w.group_id, getattr(w.prompt, "uid", "?"), w.engine, now - w.started,
                (now - w.started) / max(statistics.median(self.durations) if self.durations else 0.0, 1e-9),
                statistics.median(self.durations) if self.durations else float("nan"),
                f"{mine} tokens so far over {len(w.request_ids)} request(s)" if mine is not None else "no token count (the engine did not answer)",
            )
        self._check_engines(tokens, now)

    async def _probe(self, name: str, works: list[Any]) -> tuple[str, dict[str, int] | None]:
        slot = self.pool.get(name)
        ids = [r for w in works for r in w.request_ids]
        if slot is None or not hasattr(slot.client, "progress"):
            return name, None
        try:
            return name, await asyncio.wait_for(slot.client.progress(ids), min(PROBE_TIMEOUT_S, max(1.0, self.engine_stall_s / 2)))
        except Exception:  # no answer (stopped process) or already gone: counts as no progress
            return name, None

    def _check_engines(self, tokens: dict[str, tuple[str, dict[str, int] | None]], now: float) -> None:
        self._killed &= {slot.name for slot in self.pool.slots}
        for slot in self.pool.slots:
            if slot.name in self._killed:
                continue
            if not (slot.in_flight or slot.updating) or slot.name not in tokens:
                self._progress_at[slot.name] = now
                continue
            got = tokens[slot.name][1]
            total = sum(got.values()) if got is not None else None
            if total is not None and (total != self._tokens.get(slot.name) or not got):
                self._tokens[slot.name] = total
                self._progress_at[slot.name] = now
                continue
            quiet = now - self._progress_at.setdefault(slot.name, now)
            if quiet > self.engine_stall_s:
                busy = f"{slot.in_flight} request(s) in flight" + (" and a weight update pending" if slot.updating else "")
                logger.warning(
                    "%s made no progress for %.0f s with %s (%s): treated as lost (its actor is killed, its groups "
                    "requeued, a replacement started; rollout.engine_stall_s=%.0f)",
                    slot.name, quiet, busy, "it did not answer" if got is None else "no new token", self.engine_stall_s,
                )
                self.engines_killed += 1
                self._killed.add(slot.name)
                self._progress_at.pop(slot.name, None)
                self.kill(slot.client)

    def metrics(self) -> dict[str, float]:
        return {"rollout/stalled_groups": float(self.stalled_groups), "rollout/stall_warnings": float(self.warnings),
                "rollout/engines_killed_stalled": float(self.engines_killed)}
