"""The manager's view of its engines: load tracking, least-loaded choice, weight loads, losses.

    RolloutManager ──pick(n)──────────────► EnginePool ──► EngineSlot (client, in-flight count, state)
                   ──update_weights(v, …)─► every slot that is up or waiting, at once (timed)
    EngineFleet ──add(client)──► slot STARTING ─► current weights loaded ─► UP (takes work)
                ──retire(name)─► DRAINING (no new work) ─► removed once idle
    a call fails with the actor gone ──► mark_down: slot LOST, removed, `on_lost` (the fleet
                                          replaces it; the manager requeues its groups)

An engine is reached through an `EngineClient`; `RayEngineClient` wraps an `EngineActor` handle
(every call awaited with a timeout, so a stuck engine raises instead of hanging), and tests may
pass in-process clients with the same methods. A new engine loads the weights of the latest
update before it takes work: the pool keeps that update's buckets (ObjectRefs or files). When the
transport has nothing to keep (collective: each engine receives its own broadcast), the engine
waits (WAITING) and loads with the next update, which the driver starts at once when it sees one.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any, Protocol

from slime_rl.rollout.engines.base import GenerateRequest, GenerateResult

logger = logging.getLogger(__name__)


class EngineLostError(RuntimeError):
    """An engine (actor) died or became unreachable; its work must be re-dispatched."""


class EngineClient(Protocol):
    """What the manager calls on one engine (all coroutines)."""

    name: str

    async def generate_group(self, requests: Sequence[GenerateRequest]) -> list[GenerateResult]: ...

    async def update_weights(self, version: int, buckets: Sequence[Any], mode: str | None) -> int: ...

    async def version(self) -> int: ...

    async def progress(self, request_ids: Sequence[str]) -> dict[str, int]: ...

    async def info(self) -> dict[str, Any]: ...


def is_actor_loss(e: BaseException) -> bool:
    """The exception says the actor is gone (dead, its node gone, or unreachable)."""
    try:
        from ray.exceptions import ActorUnavailableError, RayActorError
    except ImportError:  # pragma: no cover - ray is a core dependency
        return False
    return isinstance(e, (RayActorError, ActorUnavailableError))


class RayEngineClient:
    """An `EngineActor` handle as an `EngineClient`; actor loss becomes `EngineLostError`."""

    def __init__(self, handle: Any, name: str, call_timeout_s: float = 600.0) -> None:
        self.handle = handle
        self.name = name
        self._timeout = call_timeout_s

    async def _await(self, ref: Any, what: str, timeout: float | None | bool = False) -> Any:
        """`timeout`: seconds, None for no limit, False for the client's default."""
        limit = self._timeout if timeout is False else timeout
        try:
            return await asyncio.wait_for(ref, limit)
        except asyncio.TimeoutError as e:
            raise TimeoutError(f"{self.name}: {what} did not answer within {limit:.0f} s") from e
        except Exception as e:
            if is_actor_loss(e):
                raise EngineLostError(f"{self.name}: {what} failed, the engine actor is gone: {e}") from e
            raise

    async def generate_group(self, requests: Sequence[GenerateRequest]) -> list[GenerateResult]:
        # No time limit: generations may be long; an engine that stops is caught by the stall
        # watch (rollout/watchdog.py), which kills it so this call fails with the actor gone.
        return await self._await(self.handle.generate_group.remote(list(requests)), "generate", timeout=None)

    async def progress(self, request_ids: Sequence[str]) -> dict[str, int]:
        """Tokens generated so far by each of these requests still in flight."""
        return await self._await(self.handle.progress.remote(list(request_ids)), "progress", timeout=10.0)

    async def update_weights(self, version: int, buckets: Sequence[Any], mode: str | None) -> int:
        return await self._await(
            self.handle.update_weights.remote(version, list(buckets), mode), f"update_weights v{version}"
        )

    async def version(self) -> int:
        return await self._await(self.handle.version.remote(), "version", timeout=30.0)

    async def info(self) -> dict[str, Any]:
        return await self._await(self.handle.tokenizer_info.remote(), "info", timeout=60.0)


class SlotState(str, enum.Enum):
    STARTING = "starting"
    """Added; loading the current weights (takes no work yet)."""
    WAITING = "waiting"
    """Up, but the transport kept no weights for it: loads with the next update, then UP."""
    UP = "up"
    """Serving: takes work."""
    DRAINING = "draining"
    """Being retired: finishes its work, takes no new work."""
    LOST = "lost"
    """Its actor is gone (removed from the pool)."""


class EngineSlot:
    """One engine with the manager's bookkeeping."""

    def __init__(self, client: EngineClient, index: int) -> None:
        self.client = client
        self.index = index
        """Order of addition (stable for the life of the slot)."""
        self.state = SlotState.STARTING
        self.in_flight = 0
        """Requests (samples) sent and not answered."""
        self.version = 0
        """Weight version it holds (engines given to the pool at start hold the initial weights)."""
        self.updating = False
        """A weight update to it is pending (the stall watch then wants an answer from it)."""
        self.busy_s = 0.0
        """Seconds with at least one request in flight (for `rollout/engine_idle_frac`)."""
        self._busy_since: float | None = None
        self.added_at = time.monotonic()

    @property
    def name(self) -> str:
        return self.client.name

    @property
    def up(self) -> bool:
        """Takes new work."""
        return self.state is SlotState.UP

    def add(self, n: int) -> None:
        if self.in_flight == 0:
            self._busy_since = time.monotonic()
        self.in_flight += n

    def remove(self, n: int) -> None:
        self.in_flight = max(0, self.in_flight - n)
        if self.in_flight == 0 and self._busy_since is not None:
            self.busy_s += time.monotonic() - self._busy_since
            self._busy_since = None

    def busy_seconds(self) -> float:
        extra = time.monotonic() - self._busy_since if self._busy_since is not None else 0.0
        return self.busy_s + extra


class _LoadGate:
    """Engines that join load the kept weights side by side; a weight update waits until they are
    done, and they wait for an update in flight. (An update that started while an engine loaded
    would skip it, and the engine would come up a version behind; loading again until it caught
    up never ends while the trainer publishes faster than an engine loads.)"""

    def __init__(self) -> None:
        self._cond = asyncio.Condition()
        self._joining = 0
        self._updating = False

    @contextlib.asynccontextmanager
    async def joining(self) -> AsyncIterator[None]:
        async with self._cond:
            await self._cond.wait_for(lambda: not self._updating)
            self._joining += 1
        try:
            yield
        finally:
            async with self._cond:
                self._joining -= 1
                self._cond.notify_all()

    @contextlib.asynccontextmanager
    async def updating(self) -> AsyncIterator[None]:
        async with self._cond:
            await self._cond.wait_for(lambda: not self._updating and not self._joining)
            self._updating = True
        try:
            yield
        finally:
            async with self._cond:
                self._updating = False
                self._cond.notify_all()


class EnginePool:
    """Engines, least-loaded choice under a per-engine cap, and weight loads to all of them."""

    def __init__(self, clients: Sequence[EngineClient], max_in_flight: int, weight_timeout_s: float) -> None:
        self._slots: dict[str, EngineSlot] = {}
        self._next_index = 0
        self.max_in_flight = max_in_flight
        self.weight_timeout_s = weight_timeout_s
        self.version = 0
        """Weight version every engine that is up holds."""
        self._weights: tuple[int, list[Any]] | None = None
        """The latest update's buckets (for engines that join later); None when none was kept."""
        self.changed = asyncio.Event()
        """Set whenever capacity may have grown (a request ended, an engine came up)."""
        self.on_lost: Callable[[EngineSlot], None] | None = None
        """Called once per engine found gone (the fleet and the manager react)."""
        self._gate = _LoadGate()
        for c in clients:  # engines given at construction are up and hold version 0
            self.add(c).state = SlotState.UP

    # ---- membership ----------------------------------------------------------------------------
    @property
    def slots(self) -> list[EngineSlot]:
        """Every engine the pool holds (any state but lost), in order of addition."""
        return list(self._slots.values())

    def get(self, name: str) -> EngineSlot | None:
        return self._slots.get(name)

    def add(self, client: EngineClient) -> EngineSlot:
        """A new engine (STARTING); `bring_up` loads the current weights and puts it to work."""
        if client.name in self._slots:
            raise ValueError(f"engine {client.name} is already in the pool")
        slot = EngineSlot(client, self._next_index)
        self._next_index += 1
        self._slots[client.name] = slot
        return slot

    async def bring_up(self, slot: EngineSlot) -> None:
        """Load the latest update's weights into a STARTING engine, then UP (or WAITING when no
        buckets were kept: it loads with the next update). No update runs meanwhile (it would
        skip this engine, which would then come up a version behind and make groups staler
        than admission allowed for); one that is running finishes first.

        Raises `EngineLostError` / `TimeoutError` naming the engine."""
        async with self._gate.joining():
            if (kept := self._weights) is not None and kept[0] > slot.version:
                version, buckets = kept
                got = await asyncio.wait_for(slot.client.update_weights(version, buckets, None), self.weight_timeout_s)
                if int(got) != version:
                    raise RuntimeError(f"{slot.name}: asked for weight version {version}, the engine reports {got}")
                slot.version = version
            # Behind the last update without buckets to load (collective): wait for the next.
            slot.state = SlotState.UP if slot.version >= self.version else SlotState.WAITING
        self.changed.set()

    def retire(self, name: str) -> EngineSlot | None:
        """Stop giving an engine work (it finishes what it has); `drained` says when it is idle."""
        slot = self._slots.get(name)
        if slot is not None and slot.state is not SlotState.LOST:
            slot.state = SlotState.DRAINING
        return slot

    def discard(self, name: str) -> None:
        """Forget an engine (retired and idle, or lost)."""
        self._slots.pop(name, None)
        self.changed.set()

    def mark_down(self, slot: EngineSlot) -> None:
        """The engine's actor is gone: remove it and tell `on_lost` (once)."""
        if slot.state is SlotState.LOST:
            return
        slot.state = SlotState.LOST
        self._slots.pop(slot.name, None)
        self.changed.set()
        if self.on_lost is not None:
            self.on_lost(slot)

    def count(self, *states: SlotState) -> int:
        return sum(s.state in states for s in self._slots.values())

    @property
    def num_serving(self) -> int:
        """Engines that take work (`rollout/num_engines`)."""
        return self.count(SlotState.UP)

    def needs_weights(self) -> list[str]:
        """Engines waiting for the next update before they take work."""
        return [s.name for s in self._slots.values() if s.state is SlotState.WAITING]

    # ---- dispatch ------------------------------------------------------------------------------
    def pick(self, n: int) -> EngineSlot | None:
        """The up engine with the fewest requests in flight that can take `n` more (an idle
        engine always can, so a group larger than the cap still runs)."""
        best = None
        for s in self._slots.values():
            if not s.up or (s.in_flight and s.in_flight + n > self.max_in_flight):
                continue
            if best is None or s.in_flight < best.in_flight:
                best = s
        return best

    def any_up(self) -> bool:
        return any(s.up for s in self._slots.values())

    def release(self, slot: EngineSlot, n: int) -> None:
        slot.remove(n)
        self.changed.set()

    # ---- weights -------------------------------------------------------------------------------
    async def update_weights(
        self,
        version: int,
        buckets: Sequence[Any],
        mode: str | None,
        per_engine: Mapping[str, Sequence[Any]] | None = None,
    ) -> dict[str, float]:
        """Load one version into every engine that is up or waiting, concurrently; returns
        per-engine seconds (NaN for an engine lost meanwhile).

        `per_engine[name]` (when given) replaces `buckets` for that engine (transports whose
        buckets differ per receiver, e.g. a collective rank); an engine missing from it keeps
        its weights and waits for the next update. `buckets` is what a later engine loads (may
        be empty: it then waits for the next update).

        Raises:
            TimeoutError / RuntimeError: naming the engine that failed or did not answer in time.
        """
        async with self._gate.updating():
            return await self._update_all(version, buckets, mode, per_engine)

    async def _update_all(
        self, version: int, buckets: Sequence[Any], mode: str | None, per_engine: Mapping[str, Sequence[Any]] | None
    ) -> dict[str, float]:
        self._weights = (int(version), list(buckets)) if buckets else None
        targets = [s for s in self._slots.values() if s.state in (SlotState.UP, SlotState.WAITING, SlotState.DRAINING)]
        if per_engine is not None:
            for s in targets:
                if s.name not in per_engine and s.state is SlotState.UP:
                    s.state = SlotState.WAITING  # joined after the sender chose its ranks
            targets = [s for s in targets if s.name in per_engine]

        async def one(slot: EngineSlot) -> float:
            t0 = time.monotonic()
            mine = per_engine[slot.name] if per_engine is not None else buckets
            try:
                got = await asyncio.wait_for(slot.client.update_weights(version, mine, mode), self.weight_timeout_s)
            except EngineLostError:
                self.mark_down(slot)
                return float("nan")
            except Exception as e:
                if slot.state is SlotState.DRAINING:  # scaled down meanwhile: takes no more work, its weights do not matter
                    logger.info("%s (retiring) did not take version %d: %s", slot.name, version, f"{type(e).__name__}: {e}")
                    return float("nan")
                if isinstance(e, asyncio.TimeoutError):
                    raise TimeoutError(
                        f"{slot.name}: weight update to version {version} took longer than "
                        f"{self.weight_timeout_s:.0f} s (rollout.weight_update_timeout_s)"
                    ) from e
                raise
            finally:
                slot.updating = False
            if int(got) != int(version):
                raise RuntimeError(f"{slot.name}: asked for weight version {version}, the engine reports {got}")
            slot.version = int(version)
            if slot.state is SlotState.WAITING:
                slot.state = SlotState.UP
            return time.monotonic() - t0

        for s in targets:  # before any await: a retiring engine is not stopped while its update is pending (fleet._drain)
            s.updating = True
        # Every engine's call ends before an error is raised: a lost engine is marked down (and
        # counted) first, so the caller's retry sees the engines there are now.
        results = await asyncio.gather(*(one(s) for s in targets), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise errors[0]
        seconds = results
        self.version = int(version)
        for s in self._slots.values():  # came up during this update, one version behind and nothing kept to load
            if s.state is SlotState.UP and s.version < self.version:
                s.state = SlotState.WAITING
        self.changed.set()
        return {s.name: t for s, t in zip(targets, seconds)}

    def busy_seconds(self) -> dict[str, float]:
        return {s.name: s.busy_seconds() for s in self._slots.values()}
