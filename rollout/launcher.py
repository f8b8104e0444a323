"""Starting rollout engines as Ray actors for the fleet (rollout/fleet.py), and reading the cluster.

    EngineLaunchSpec (from the driver: rollout config, model, per-bundle and elastic Ray options)
        ─► RayLauncher.launch(name, bundle) ─► EngineActor (max_restarts=0: the fleet replaces)
            ─► wait for the model (engine_start_timeout_s) ─► node_info ─► (client, EngineRecord)
        ─► RayLauncher.elastic_capacity(): Σ over alive nodes ⌊node[resource] / per-engine amount⌋

The first `len(bundle_options)` engines take a reserved placement-group bundle (colocated or
reserved placement); engines beyond them are placed by Ray on any node with the engine's
resources (`ray.engine_resources`, e.g. `{rollout: 1}`), which is how capacity grows and shrinks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any

from slime_rl.rollout.config import RolloutConfig
from slime_rl.rollout.engine_pool import RayEngineClient
from slime_rl.rollout.fleet import EngineRecord

logger = logging.getLogger(__name__)

ENGINE_ENV = {"VLLM_LOGGING_LEVEL": "WARNING", "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning"}
"""Environment of engine actors: vLLM's per-request INFO lines would bury the run's own output."""


@dataclasses.dataclass
class EngineLaunchSpec:
    """Everything needed to start one more engine of a run (picklable: it travels to the manager)."""

    rollout: RolloutConfig
    model_path: str
    bundle_options: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    """Ray options of the engines with a reserved bundle (placement-group strategies), by bundle."""
    elastic_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Ray options of every other engine: num_cpus, num_gpus, resources, scheduling_strategy."""
    runtime_env: dict[str, Any] = dataclasses.field(default_factory=dict)
    elastic_resource: str | None = None
    """Custom resource that marks rollout nodes (rollout.elastic follows it)."""
    elastic_amount: float = 1.0
    """How much of it one engine takes."""


class RayLauncher:
    """`Launcher` of `EngineFleet` for Ray actors."""

    def __init__(self, spec: EngineLaunchSpec) -> None:
        self.spec = spec
        self.num_bundles = len(spec.bundle_options)

    def _options(self, bundle: int | None) -> dict[str, Any]:
        opts = dict(self.spec.bundle_options[bundle] if bundle is not None else self.spec.elastic_options)
        env = dict(self.spec.runtime_env)
        env["env_vars"] = {**ENGINE_ENV, **env.get("env_vars", {})}
        opts["runtime_env"] = env
        opts["max_restarts"] = 0
        return opts

    async def launch(self, name: str, bundle: int | None) -> tuple[RayEngineClient, EngineRecord]:
        from slime_rl.rollout.engines.actor import start_engine_actor_from_config

        opts = self._options(bundle)
        num_cpus, num_gpus = opts.pop("num_cpus", 1), opts.pop("num_gpus", 0)
        resources = {"CPU": float(num_cpus), "GPU": float(num_gpus), **opts.get("resources", {})}
        handle = start_engine_actor_from_config(self.spec.rollout, self.spec.model_path, name=name, num_cpus=num_cpus,
                                                num_gpus=num_gpus, actor_options=opts, load=False)
        client = RayEngineClient(handle, name)
        timeout = self.spec.rollout.engine_start_timeout_s
        try:
            # No limit while Ray looks for a node with room: capacity may come later (elastic).
            node = await handle.node_info.remote()
            await asyncio.wait_for(handle.load.remote(), timeout)
        except asyncio.TimeoutError:
            await self.stop(client, graceful=False)
            raise TimeoutError(f"{name} did not load its model within {timeout:.0f} s (rollout.engine_start_timeout_s)") from None
        except asyncio.CancelledError:
            await self.stop(client, graceful=False)
            raise
        except Exception as e:
            await self.stop(client, graceful=False)
            from slime_rl.rollout.engine_pool import is_actor_loss

            cause = getattr(e, "cause", None) or e
            raise RuntimeError(f"{name} failed to start: {'its actor died' if is_actor_loss(e) else cause}") from None
        record = EngineRecord(name, int(name.rsplit("-", 1)[-1]) if name.rsplit("-", 1)[-1].isdigit() else 0,
                              node["node_id"], node["node_ip"], node["pid"], resources, bundle)
        return client, record

    async def stop(self, client: Any, graceful: bool) -> None:
        import ray

        if graceful:
            try:
                await asyncio.wait_for(client.handle.shutdown.remote(), 30.0)
            except Exception as e:  # gone already, or stuck: killed below
                logger.debug("%s: shutdown failed: %s", client.name, e)
        try:
            ray.kill(client.handle, no_restart=True)
        except Exception:
            pass

    async def _nodes(self) -> list[dict[str, Any]]:
        import ray

        return await asyncio.to_thread(ray.nodes)

    async def elastic_capacity(self) -> int | None:
        if not self.spec.rollout.elastic:
            return None
        key, amount = self.spec.elastic_resource, self.spec.elastic_amount
        total = 0
        for node in await self._nodes():
            if node.get("Alive") and key:
                total += int(float(node.get("Resources", {}).get(key, 0.0)) // amount)
        return total

    async def node_alive(self, node_id: str | None) -> bool | None:
        if node_id is None:
            return None
        for node in await self._nodes():
            if node.get("NodeID") == node_id:
                return bool(node.get("Alive"))
        return False
