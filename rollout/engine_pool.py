"""The manager's view of its engines: load tracking, least-loaded choice, weight loads, recovery.

    RolloutManager ──pick(n)──► EnginePool ──► EngineSlot[i] (client, in-flight count, up/down)
                   ──update_weights(v, buckets)──► every slot at once (timed, named on failure)
                   ──on engine death──► slot down ─► recover(): wait for Ray's restart,
                                                     reload the current weights, slot up

An engine is reached through an `EngineClient`; `RayEngineClient` wraps an `EngineActor` handle
(every call awaited with a timeout, so a stuck engine raises instead of hanging), and tests
may pass in-process clients with the same methods.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
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

    async def info(self) -> dict[str, Any]: ...


def _is_actor_loss(e: BaseException) -> bool:
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

    async def _await(self, ref: Any, what: str, timeout: float | None = None) -> Any:
        try:
            return await asyncio.wait_for(ref, timeout or self._timeout)
        except asyncio.TimeoutError as e:
            raise TimeoutError(f"{self.name}: {what} did not answer within {timeout or self._timeout:.0f} s") from e
        except Exception as e:
            if _is_actor_loss(e):
                raise EngineLostError(f"{self.name}: {what} failed, the engine actor is gone: {e}") from e
            raise

    async def generate_group(self, requests: Sequence[GenerateRequest]) -> list[GenerateResult]:
        return await self._await(self.handle.generate_group.remote(list(requests)), "generate")

    async def update_weights(self, version: int, buckets: Sequence[Any], mode: str | None) -> int:
        return await self._await(
            self.handle.update_weights.remote(version, list(buckets), mode), f"update_weights v{version}"
        )

    async def version(self) -> int:
        return await self._await(self.handle.version.remote(), "version", timeout=30.0)

    async def info(self) -> dict[str, Any]:
        return await self._await(self.handle.tokenizer_info.remote(), "info", timeout=60.0)


class EngineSlot:
    """One engine with the manager's bookkeeping."""

    def __init__(self, client: EngineClient, index: int) -> None:
        self.client = client
        self.index = index
        self.in_flight = 0
        """Requests (samples) sent and not answered."""
        self.up = True
        self.busy_s = 0.0
        """Seconds with at least one request in flight (for `rollout/engine_idle_frac`)."""
        self._busy_since: float | None = None
        self.restarts = 0

    @property
    def name(self) -> str:
        return self.client.name

    def add(self, n: int) -> None:
        if self.in_flight == 0:
            self._busy_since = time.monotonic()
        self.in_flight += n

    def remove(self, n: int) -> None:
        self.in_flight -= n
        if self.in_flight == 0 and self._busy_since is not None:
            self.busy_s += time.monotonic() - self._busy_since
            self._busy_since = None

    def busy_seconds(self) -> float:
        extra = time.monotonic() - self._busy_since if self._busy_since is not None else 0.0
        return self.busy_s + extra


class EnginePool:
    """Engines, least-loaded choice under a per-engine cap, and weight loads to all of them."""

    def __init__(
        self,
        clients: Sequence[EngineClient],
        max_in_flight: int,
        weight_timeout_s: float,
        restart_timeout_s: float = 300.0,
    ) -> None:
        if not clients:
            raise ValueError("the rollout side needs at least one engine (rollout.num_engines >= 1)")
        self.slots = [EngineSlot(c, i) for i, c in enumerate(clients)]
        self.max_in_flight = max_in_flight
        self.weight_timeout_s = weight_timeout_s
        self.restart_timeout_s = restart_timeout_s
        self.version = 0
        """Weight version every engine that is up holds."""
        self._weights: tuple[int, list[Any]] | None = None
        self._recovering: dict[int, asyncio.Task] = {}
        self.changed = asyncio.Event()
        """Set whenever capacity may have grown (a request ended, an engine came back)."""

    def pick(self, n: int) -> EngineSlot | None:
        """The up engine with the fewest requests in flight that can take `n` more (an idle
        engine always can, so a group larger than the cap still runs)."""
        best = None
        for s in self.slots:
            if not s.up or (s.in_flight and s.in_flight + n > self.max_in_flight):
                continue
            if best is None or s.in_flight < best.in_flight:
                best = s
        return best

    def any_up(self) -> bool:
        return any(s.up for s in self.slots)

    def release(self, slot: EngineSlot, n: int) -> None:
        slot.remove(n)
        self.changed.set()

    async def update_weights(
        self,
        version: int,
        buckets: Sequence[Any],
        mode: str | None,
        per_engine: Sequence[Sequence[Any]] | None = None,
    ) -> dict[str, float]:
        """Load one version into every engine that is up, concurrently; returns per-engine seconds.

        `per_engine[i]` (when given) replaces `buckets` for engine i (transports whose buckets
        differ per receiver, e.g. a collective rank); `buckets` is then what a restarted engine
        reloads (may be empty: it then keeps its own weights until the next version).

        Raises:
            TimeoutError / RuntimeError: naming the engine that failed or did not answer in time.
        """
        self._weights = (int(version), list(buckets)) if buckets else self._weights
        slots = [s for s in self.slots if s.up]

        async def one(slot: EngineSlot) -> float:
            t0 = time.monotonic()
            mine = per_engine[slot.index] if per_engine is not None else buckets
            try:
                got = await asyncio.wait_for(slot.client.update_weights(version, mine, mode), self.weight_timeout_s)
            except asyncio.TimeoutError as e:
                raise TimeoutError(
                    f"{slot.name}: weight update to version {version} took longer than "
                    f"{self.weight_timeout_s:.0f} s (rollout.weight_update_timeout_s)"
                ) from e
            except EngineLostError:
                self.mark_down(slot)  # it reloads the current weights when it is back
                return float("nan")
            if int(got) != int(version):
                raise RuntimeError(f"{slot.name}: asked for weight version {version}, the engine reports {got}")
            return time.monotonic() - t0

        seconds = await asyncio.gather(*(one(s) for s in slots))
        self.version = int(version)
        self.changed.set()
        return {s.name: t for s, t in zip(slots, seconds)}

    def mark_down(self, slot: EngineSlot) -> None:
        """Take an engine out of rotation and start waiting for it to come back."""
        if not slot.up:
            return
        slot.up = False
        logger.warning("%s is gone; its groups go back to the queue, waiting for Ray to restart it", slot.name)
        self._recovering[slot.index] = asyncio.get_running_loop().create_task(self._recover(slot))

    async def _recover(self, slot: EngineSlot) -> None:
        deadline = time.monotonic() + self.restart_timeout_s
        while True:
            try:
                version = await slot.client.version()
                break
            except Exception as e:  # still restarting (or gone for good)
                if time.monotonic() > deadline:
                    logger.error("%s did not come back within %.0f s: %s", slot.name, self.restart_timeout_s, e)
                    return
                await asyncio.sleep(1.0)
        if self._weights is not None and version != self._weights[0]:
            v, buckets = self._weights
            await slot.client.update_weights(v, buckets, None)
        slot.restarts += 1
        slot.in_flight = 0
        slot._busy_since = None
        slot.up = True
        logger.warning("%s is back (restart %d) with weight version %d", slot.name, slot.restarts, self.version)
        self.changed.set()

    def all_down_for_good(self) -> bool:
        """Every engine is down and no recovery is still trying."""
        return not self.any_up() and all(t.done() for t in self._recovering.values())

    def busy_seconds(self) -> list[float]:
        return [s.busy_seconds() for s in self.slots]
