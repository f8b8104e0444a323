"""The rollout manager as a Ray async actor: the driver's handle on the whole rollout side.

    driver ──setup / start──────────────► RolloutManagerActor ──► RolloutManager (one event loop)
           ──update_weights(v, refs)────►        │                  ├─ EngineFleet + EnginePool
           ──evaluate() / metrics()─────►        │                  │    └─► EngineActor × N (owned here)
           ──scale(n) / fleet_info()────►        │                  └─ RayBufferClient ─► BufferActor
           ──snapshot / restore / check / stop ─►┘

The engines are created by this actor (so they end with it); `slime-rl scale` reaches it by name.

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

    async def node_info(self) -> dict[str, Any]:
        import os

        return {"node_id": ray.get_runtime_context().get_node_id(), "node_ip": ray.util.get_node_ip_address(),
                "pid": os.getpid()}

    async def scale(self, num_engines: int) -> dict[str, Any]:
        return self.manager.scale(num_engines)

    async def fleet_info(self) -> dict[str, Any]:
        return self.manager.fleet_info()

    async def sync_members(self) -> list[str]:
        return self.manager.sync_members()

    async def wait_due(self, trainer_version: int, timeout_s: float) -> int:
        return await self.manager.wait_due(trainer_version, timeout_s)

    async def drain_trace(self) -> list[dict[str, Any]]:
        """The timeline events recorded since the last call (the driver writes them to trace.json)."""
        return self.manager.tracer.drain()

    async def setup(self) -> dict[str, Any]:
        return await self.manager.setup()

    async def start(self) -> None:
        await self.manager.start()

    async def update_weights(
        self, version: int, buckets: list[Any], per_engine: dict[str, list[Any]] | None = None
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
    scheduling_strategy: Any = None,
) -> Any:
    """Start the manager actor (no CPU reserved: it only coordinates; rewards use its threads)."""
    options: dict[str, Any] = {"num_cpus": 0, "max_concurrency": 64}
    if name:
        options["name"] = name
    if runtime_env:
        options["runtime_env"] = runtime_env
    if scheduling_strategy is not None:
        options["scheduling_strategy"] = scheduling_strategy
    return ray.remote(RolloutManagerActor).options(**options).remote(spec, list(engines), list(engine_names), buffer)
