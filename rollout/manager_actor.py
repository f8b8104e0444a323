"""The rollout manager as a Ray async actor: the driver's handle on the whole rollout side.

    driver ──setup / start──────────────► RolloutManagerActor ──► RolloutManager (one event loop)
           ──update_weights(v, refs)────►        │                  ├─ EnginePool ─► EngineActor × N
           ──evaluate() / metrics()─────►        │                  └─ RayBufferClient ─► BufferActor
           ──snapshot / restore / check / stop ─►┘

All methods are coroutines on the actor's loop, so the manager's state needs no locks; the
driver never blocks the generation loop (long calls such as `evaluate` run beside it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ray
from slime_rl.rollout.clients import RayBufferClient
from slime_rl.rollout.engine_pool import RayEngineClient
from slime_rl.rollout.manager import ManagerSpec, RolloutManager


class RolloutManagerActor:
    """Ray actor body around `RolloutManager` (create it with `start_rollout_manager`)."""

    def __init__(self, spec: ManagerSpec, engines: Sequence[Any], engine_names: Sequence[str], buffer: Any) -> None:
        clients = [RayEngineClient(h, n) for h, n in zip(engines, engine_names)]
        self.manager = RolloutManager(spec, clients, RayBufferClient(buffer))

    async def setup(self) -> dict[str, Any]:
        return await self.manager.setup()

    async def start(self) -> None:
        await self.manager.start()

    async def update_weights(
        self, version: int, buckets: list[Any], per_engine: list[list[Any]] | None = None
    ) -> dict[str, float]:
        # ObjectRefs inside a list arrive unresolved: the engines resolve them themselves.
        return await self.manager.update_weights(version, buckets, per_engine=per_engine)

    async def open_slots(self, version: int) -> None:
        self.manager.open_slots(version)

    async def evaluate(self) -> dict[str, float]:
        return await self.manager.evaluate()

    async def metrics(self) -> dict[str, float]:
        return await self.manager.metrics()

    async def check(self) -> dict[str, int]:
        return await self.manager.check()

    async def snapshot(self, folder: str) -> dict[str, Any]:
        return await self.manager.snapshot(folder)

    async def restore(self, state: dict[str, Any]) -> None:
        self.manager.restore(state)

    async def stop(self) -> None:
        await self.manager.stop()


def start_rollout_manager(
    spec: ManagerSpec,
    engines: Sequence[Any],
    engine_names: Sequence[str],
    buffer: Any,
    *,
    name: str | None = None,
    runtime_env: dict[str, Any] | None = None,
) -> Any:
    """Start the manager actor (no CPU reserved: it only coordinates; rewards use its threads)."""
    options: dict[str, Any] = {"num_cpus": 0, "max_concurrency": 64}
    if name:
        options["name"] = name
    if runtime_env:
        options["runtime_env"] = runtime_env
    return ray.remote(RolloutManagerActor).options(**options).remote(spec, list(engines), list(engine_names), buffer)
