"""Placement: who runs where, and with what resources (the connection itself: `slime_rl.cluster`).

    ray.placement = colocate:     one placement group; engine i and trainer rank i share bundle i
                                  (on GPU they split its device: both hold their memory at once)
    ray.placement = disaggregate: a placement group per side; engines and trainer never share a device

Each actor's Ray options come from `Placement.engine_options(i)` / `Placement.trainer_options(rank)`,
which pin it to its bundle. Resources per actor come from the config: engine CPUs =
`rollout.cpu_threads` (1 when 0), engine GPUs = `rollout.tensor_parallel_size` on a GPU cluster;
trainer CPUs = `trainer.num_threads`, GPUs = `trainer.num_gpus_per_worker`.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

logger = logging.getLogger(__name__)


class PlacementError(RuntimeError):
    """The cluster cannot host the run as configured; the message says what is missing."""


@dataclasses.dataclass(frozen=True)
class Resources:
    engine_cpus: float
    engine_gpus: float
    trainer_cpus: float
    trainer_gpus: float
    num_engines: int
    num_trainers: int

    @property
    def total_cpus(self) -> float:
        return self.engine_cpus * self.num_engines + self.trainer_cpus * self.num_trainers

    @property
    def total_gpus(self) -> float:
        return self.engine_gpus * self.num_engines + self.trainer_gpus * self.num_trainers


def resources_for(cfg: Any, gpu_cluster: bool) -> Resources:
    """Per-actor resources from the config (`Config`)."""
    r, t = cfg.rollout, cfg.trainer
    engine_gpus = float(r.tensor_parallel_size) if gpu_cluster and r.engine != "hf" else 0.0
    return Resources(
        engine_cpus=float(r.cpu_threads or 1),
        engine_gpus=engine_gpus,
        trainer_cpus=float(t.num_threads) if t.num_gpus_per_worker == 0 else 1.0,
        trainer_gpus=float(t.num_gpus_per_worker),
        num_engines=r.num_engines,
        num_trainers=t.num_workers,
    )


class Placement:
    """Placement groups of one run and the Ray options of each actor.

    colocate:     one group (`ray.trainer_strategy`) of N engine bundles then M trainer bundles; on
                  a GPU cluster bundle i holds one device shared by engine i and trainer rank i.
    disaggregate: the engines' reserved bundles (`ray.engine_strategy`) and the trainer's
                  (`ray.trainer_strategy`) in two groups; custom resources (`ray.engine_resources`,
                  `ray.trainer_resources`) pin each side to the nodes that carry them.
    Engines beyond the reserved N (scale-up, elastic capacity, a replacement) take `elastic_options`:
    their resources, and Ray puts them on any node with room.
    """

    def __init__(self, cfg: Any, timeout_s: float = 60.0) -> None:
        gpu = bool(ray.cluster_resources().get("GPU", 0))
        self.res = res = resources_for(cfg, gpu_cluster=gpu)
        self.mode = cfg.ray.placement
        self.engine_custom = {k: float(v) for k, v in cfg.ray.engine_resources.items()}
        self.trainer_custom = {k: float(v) for k, v in cfg.ray.trainer_resources.items()}
        self.groups: list[PlacementGroup] = []
        engine_bundle = {"CPU": res.engine_cpus, **({"GPU": res.engine_gpus} if res.engine_gpus else {}), **self.engine_custom}
        trainer_bundle = {"CPU": res.trainer_cpus, **({"GPU": res.trainer_gpus} if res.trainer_gpus else {}), **self.trainer_custom}
        self._shared_gpu = bool(self.mode == "colocate" and gpu and res.trainer_gpus and res.engine_gpus)
        if self.mode == "colocate":
            bundles = [engine_bundle] * res.num_engines + [trainer_bundle] * res.num_trainers
            if self._shared_gpu:
                # Shared devices: bundle i holds one device for engine i and trainer rank i.
                n = max(res.num_engines, res.num_trainers)
                merged = {**self.engine_custom, **self.trainer_custom}
                bundles = [{"CPU": res.engine_cpus + res.trainer_cpus, "GPU": 1.0, **merged}] * n
            self.groups = [self._reserve(bundles, cfg.ray.trainer_strategy, timeout_s, "the run")]
        else:
            engines = [engine_bundle] * res.num_engines
            self.groups = [
                self._reserve(engines, cfg.ray.engine_strategy, timeout_s, "the rollout engines") if engines else None,
                self._reserve([trainer_bundle] * res.num_trainers, cfg.ray.trainer_strategy, timeout_s, "the trainer"),
            ]

    def _reserve(self, bundles: list[dict[str, float]], strategy: str, timeout_s: float, what: str) -> PlacementGroup:
        pg = placement_group(bundles, strategy=strategy)
        ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
        if not ready:
            remove_placement_group(pg)
            have = {k: v for k, v in ray.available_resources().items() if not k.startswith(("node:", "memory", "object_store"))}
            raise PlacementError(
                f"the cluster cannot host {what}: it needs bundles {bundles} ({strategy}) but has {have} free; lower "
                "rollout.num_engines / trainer.num_workers / their threads, start nodes with the custom resources named "
                "in ray.engine_resources / ray.trainer_resources, or join a larger cluster (ray.address)"
            )
        return pg

    def _strategy(self, group: int, bundle: int) -> PlacementGroupSchedulingStrategy:
        return PlacementGroupSchedulingStrategy(
            placement_group=self.groups[group], placement_group_bundle_index=bundle,
            placement_group_capture_child_tasks=True,
        )

    def engine_options(self, i: int) -> dict[str, Any]:
        """Ray options of the engine with reserved bundle `i` (0 <= i < rollout.num_engines)."""
        res = self.res
        if self._shared_gpu:
            return {"num_cpus": res.engine_cpus, "num_gpus": 0.5, "scheduling_strategy": self._strategy(0, i)}
        opts = {"num_cpus": res.engine_cpus, "num_gpus": res.engine_gpus, "scheduling_strategy": self._strategy(0, i)}
        if self.engine_custom:
            opts["resources"] = dict(self.engine_custom)
        return opts

    def engine_bundle_options(self) -> list[dict[str, Any]]:
        return [self.engine_options(i) for i in range(self.res.num_engines)]

    def elastic_options(self) -> dict[str, Any]:
        """Ray options of an engine without a reserved bundle."""
        opts: dict[str, Any] = {"num_cpus": self.res.engine_cpus, "num_gpus": self.res.engine_gpus}
        if self.engine_custom:
            opts["resources"] = dict(self.engine_custom)
        return opts

    def trainer_options(self, rank: int) -> dict[str, Any]:
        res = self.res
        if self._shared_gpu:
            return {"num_cpus": res.trainer_cpus, "num_gpus": 0.5, "scheduling_strategy": self._strategy(0, rank)}
        group, bundle = (0, res.num_engines + rank) if self.mode == "colocate" else (1, rank)
        opts = {"num_cpus": res.trainer_cpus, "num_gpus": res.trainer_gpus, "scheduling_strategy": self._strategy(group, bundle)}
        if self.trainer_custom:
            opts["resources"] = dict(self.trainer_custom)
        return opts

    def release(self) -> None:
        for pg in self.groups:
            if pg is None:
                continue
            try:
                remove_placement_group(pg)
            except Exception:  # already gone with the cluster
                pass
        self.groups = []
