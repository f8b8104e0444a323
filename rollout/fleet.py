"""The engine fleet: how many rollout engines run, where, and what happens when one comes or goes.

    target ── rollout.num_engines, changed by `scale` (slime-rl scale RUN_DIR --engines N), or with
              rollout.elastic: every engine that fits on the alive nodes carrying the rollout resource
    reconcile (every second, and at once on a change):
        running + starting < target ─► launch ─► wait until the model is loaded ─► pool.add
                                        ─► bring_up (current weights) ─► UP: takes its share of work
        running > target            ─► retire the newest: DRAINING (no new work) ─► idle ─► shut down
    an engine lost (its actor gone) ─► its groups requeued by the manager at once ─► a warning that
        names the engine, its node and whether the node is gone ─► replaced if the target wants it
        (Ray places the replacement on a node with room; none is tried against a node that is gone)

Engines are Ray actors created by the rollout manager (so they die with it), with Ray's own
restarts off: the fleet decides replacements. A launch that dies before its model is loaded counts
as a failure; `rollout.engine_max_restarts` failures in a row stop the run with the last error.
`Launcher` is the only Ray-specific part (`RayLauncher`); tests may pass their own.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from typing import Any, Protocol

from slime_rl.rollout.engine_pool import EngineClient, EnginePool, EngineSlot, SlotState

logger = logging.getLogger(__name__)


class FleetError(RuntimeError):
    """The fleet cannot keep engines running (every launch fails); the message has the last error."""


@dataclasses.dataclass(frozen=True)
class EngineRecord:
    """Where one engine runs (for `actors.json`, warnings and metrics)."""

    name: str
    index: int
    node_id: str | None = None
    node_ip: str | None = None
    pid: int | None = None
    resources: dict[str, float] = dataclasses.field(default_factory=dict)
    bundle: int | None = None
    """Placement-group bundle it occupies (colocated / reserved engines), None for the others."""


class Launcher(Protocol):
    """Creates and ends engines (Ray actors in a run)."""

    num_bundles: int
    """Engines that have a reserved placement-group bundle (the first `num_bundles` launched)."""

    async def launch(self, name: str, bundle: int | None) -> tuple[EngineClient, EngineRecord]:
        """Start an engine and wait until its model is loaded (raises if it fails or times out)."""
        ...

    async def stop(self, client: EngineClient, graceful: bool) -> None: ...

    async def elastic_capacity(self) -> int | None:
        """Engines the alive nodes can hold (rollout.elastic), or None when not elastic."""
        ...

    async def node_alive(self, node_id: str | None) -> bool | None: ...


class EngineFleet:
    """Keeps `target` engines running in an `EnginePool` (see the module docstring)."""

    def __init__(
        self,
        pool: EnginePool,
        launcher: Launcher | None,
        *,
        name_prefix: str,
        target: int,
        max_failures: int = 3,
        on_lost: Callable[[EngineSlot, EngineRecord | None], None] | None = None,
    ) -> None:
        self.pool = pool
        self.launcher = launcher
        self.name_prefix = name_prefix
        self.target = int(target)
        self.max_failures = max_failures
        self.records: dict[str, EngineRecord] = {}
        self._starting: dict[str, asyncio.Task] = {}
        self._bundles: dict[str, int | None] = {}
        """Bundle reserved by each engine being launched."""
        self._draining: dict[str, asyncio.Task] = {}
        self._next_id = 0
        self._failures = 0
        self._error: BaseException | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._on_lost = on_lost
        self.changes = 0
        """Bumped whenever the membership changes (for `actors.json` rewrites)."""
        self.lost = 0
        """Engines lost over the run."""
        pool.on_lost = self._lost

    # ---- control -------------------------------------------------------------------------------
    def set_target(self, n: int) -> int:
        """Change the number of engines (takes effect at once; returns the new target)."""
        if n < 0:
            raise ValueError(f"engines={n} must be >= 0")
        if self.launcher is None and n != self.target:
            raise ValueError("this rollout side was built with fixed engines and cannot scale")
        self.target = int(n)
        self._wake.set()
        return self.target

    async def start(self, wait: bool, timeout_s: float) -> None:
        """Launch the initial engines; with `wait`, until all are up (raises naming the first that
        failed or did not start within `timeout_s`). Then reconcile in the background."""
        if self.launcher is not None:
            names = [self._launch() for _ in range(self.target - self._alive())]
            if wait and names:
                tasks = [self._starting[n] for n in names if n in self._starting]
                done, pending = await asyncio.wait(tasks, timeout=timeout_s)
                if pending:
                    late = [n for n in names if n in self._starting and not self._starting[n].done()]
                    raise FleetError(f"rollout engine(s) {', '.join(late)} did not start within {timeout_s:.0f} s "
                                     "(rollout.engine_start_timeout_s)")
                for t in done:
                    if t.exception() is not None:
                        raise t.exception()
        self._task = asyncio.get_running_loop().create_task(self._reconcile_loop())

    def check(self) -> None:
        if self._error is not None:
            raise self._error

    async def stop(self, graceful: bool = True) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for t in [*self._starting.values(), *self._draining.values()]:
            t.cancel()
        await asyncio.gather(*self._starting.values(), *self._draining.values(), return_exceptions=True)
        if self.launcher is not None:
            await asyncio.gather(*(self.launcher.stop(s.client, graceful) for s in self.pool.slots), return_exceptions=True)

    def info(self) -> dict[str, Any]:
        """Target, counts per state and every engine's record."""
        return {
            "target": self.target,
            "serving": self.pool.num_serving,
            "starting": self._launching() + self.pool.count(SlotState.STARTING),
            "waiting_for_weights": self.pool.count(SlotState.WAITING),
            "draining": self.pool.count(SlotState.DRAINING),
            "lost": self.lost,
            "changes": self.changes,
            "engines": [dataclasses.asdict(self.records[s.name]) | {"state": s.state.value}
                        for s in self.pool.slots if s.name in self.records],
        }

    # ---- reconcile -----------------------------------------------------------------------------
    def _launching(self) -> int:
        """Engines launched and not in the pool yet (one stays in `_starting` until it is up)."""
        return sum(1 for name in self._starting if self.pool.get(name) is None)

    def _alive(self) -> int:
        """Engines that count toward the target: launching, loading weights, waiting for weights,
        serving (each once)."""
        return self._launching() + self.pool.count(SlotState.STARTING, SlotState.WAITING, SlotState.UP)

    async def _reconcile_loop(self) -> None:
        while True:
            try:
                await self._reconcile()
            except asyncio.CancelledError:
                raise
            except BaseException as e:  # noqa: BLE001 - reported through check()
                self._error = e if isinstance(e, FleetError) else FleetError(f"engine fleet failed: {e!r}")
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=1.0)
            except asyncio.TimeoutError:
                pass

    async def _reconcile(self) -> None:
        if self.launcher is None:
            return
        capacity = await self.launcher.elastic_capacity()
        target = self.target if capacity is None else min(self.target, capacity) if self.target else capacity
        alive = self._alive()
        for _ in range(max(0, target - alive)):
            self._launch()
        if alive > target:
            serving = sorted((s for s in self.pool.slots if s.state in (SlotState.UP, SlotState.WAITING)),
                             key=lambda s: s.index, reverse=True)
            for slot in serving[: alive - target]:
                self._retire(slot.name)

    def _free_bundle(self) -> int | None:
        used = {r.bundle for n, r in self.records.items() if r.bundle is not None}
        used |= {b for b in self._bundles.values() if b is not None}
        for b in range(self.launcher.num_bundles):
            if b not in used:
                return b
        return None

    def _launch(self) -> str:
        name = f"{self.name_prefix}-{self._next_id}"
        self._next_id += 1
        bundle = self._free_bundle()
        self._bundles[name] = bundle
        self._starting[name] = asyncio.get_running_loop().create_task(self._bring_up(name, bundle))
        self.changes += 1
        return name

    async def _bring_up(self, name: str, bundle: int | None) -> None:
        try:
            client, record = await self.launcher.launch(name, bundle)
            slot = self.pool.add(client)
            self.records[name] = record
            await self.pool.bring_up(slot)
            self._failures = 0
            logger.info("%s serving on node %s (%s); %d engine(s) serving", name, record.node_ip, (record.node_id or "?")[:12],
                        self.pool.num_serving)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self._failures += 1
            slot = self.pool.get(name)
            if slot is not None:
                self.pool.discard(name)
                await self.launcher.stop(slot.client, graceful=False)
            self.records.pop(name, None)
            logger.warning("rollout engine %s failed to start (%d in a row): %s", name, self._failures, e)
            if self._failures > self.max_failures:
                self._error = FleetError(
                    f"rollout engines keep failing to start ({self._failures} in a row, rollout.engine_max_restarts="
                    f"{self.max_failures}); last: {name}: {e}"
                )
            raise
        finally:
            self._starting.pop(name, None)
            self._bundles.pop(name, None)
            self.changes += 1
            self._wake.set()

    def _retire(self, name: str) -> None:
        if name in self._draining:
            return
        slot = self.pool.retire(name)
        if slot is None:
            return
        self._draining[name] = asyncio.get_running_loop().create_task(self._drain(slot))
        self.changes += 1

    async def _drain(self, slot: EngineSlot) -> None:
        try:
            while (slot.in_flight or slot.updating) and slot.state is SlotState.DRAINING:
                await asyncio.sleep(0.2)  # its work, and a weight load already sent to it, finish first
            self.pool.discard(slot.name)
            self.records.pop(slot.name, None)
            await self.launcher.stop(slot.client, graceful=True)
            logger.info("%s retired; %d engine(s) serving", slot.name, self.pool.num_serving)
        finally:
            self._draining.pop(slot.name, None)
            self.changes += 1
            self._wake.set()

    def _lost(self, slot: EngineSlot) -> None:
        """Called by the pool the moment an engine's actor is found gone (before any of its groups
        has been requeued): the manager reports it; then, if Ray declares its node dead (a lost
        machine is detected by Ray's health checks within about a minute), a second line says so."""
        record = self.records.pop(slot.name, None)
        self.lost += 1
        self.changes += 1
        task = self._draining.pop(slot.name, None)
        if task is not None:
            task.cancel()
        if self._on_lost is not None:
            self._on_lost(slot, record)
        if self.launcher is not None and record is not None and record.node_id:
            asyncio.get_running_loop().create_task(self._watch_node(record))
        self._wake.set()

    async def _watch_node(self, record: EngineRecord, within_s: float = 90.0) -> None:
        deadline = asyncio.get_running_loop().time() + within_s
        while asyncio.get_running_loop().time() < deadline:
            if await self.launcher.node_alive(record.node_id) is False:
                logger.warning("node %s (%s) is gone: %s and any other engine there will not come back on it; "
                               "%d engine(s) serving", record.node_ip, record.node_id[:12], record.name, self.pool.num_serving)
                self.changes += 1
                return
            await asyncio.sleep(2.0)
