"""Ray actor wrapper: one rollout engine per (asyncio) actor, same methods as `RolloutEngine`.

    rollout worker ──generate(req)──────────────► EngineActor ──► engine (hf | vllm | sglang)
    weight publisher ─begin_weight_update(v)────►     │  stage buckets (ObjectRefs are
                     ─load_weight_bucket(b|ref)─►     │  resolved inside the actor)
                     ─commit_weight_update()────►     └► pause → load full state dict → resume
      or in one call: update_weights(v, [bucket | ref, ...])
      or the trainer's WeightBucket stream: receive_bucket(b) (index 0 opens, last commits)

A bucket is `list[tuple[str, Tensor]]` or `dict[str, Tensor]` (HF parameter names); the
buckets of one version together must hold the full state dict. Every weight call has a
timeout and raises `TimeoutError` naming the actor and version, so a sync never hangs.

Example:
    >>> actor = start_engine_actor("hf", model_dir, name="engine-0")        # doctest: +SKIP
    >>> ray.get(actor.generate.remote(GenerateRequest("r0", [1, 2, 3])))    # doctest: +SKIP
    >>> refs = [ray.put(b) for b in buckets]                                # doctest: +SKIP
    >>> ray.get(actor.update_weights.remote(1, refs))                       # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ray
import torch
from slime_rl.rollout.config import RolloutConfig
from slime_rl.rollout.engines.base import (
    EngineHealth,
    GenerateRequest,
    GenerateResult,
    PauseMode,
)
from slime_rl.rollout.engines.registry import create_engine, engine_params_from_config

logger = logging.getLogger(__name__)

Bucket = Sequence[tuple[str, torch.Tensor]] | Mapping[str, torch.Tensor]


class EngineActor:
    """Owns one engine; use through `start_engine_actor` (an asyncio Ray actor)."""

    def __init__(
        self,
        kind: str,
        model_path: str,
        params: dict[str, Any],
        weight_update_timeout_s: float = 300.0,
        weight_update_mode: str = "keep",
    ) -> None:
        self._name = f"EngineActor[{kind}]"
        try:
            ctx = ray.get_runtime_context()
            self._name = f"EngineActor[{kind}:{ctx.get_actor_name() or ctx.get_actor_id()}]"
        except Exception:  # not inside Ray (direct use in tests)
            pass
        self._timeout = weight_update_timeout_s
        self._mode = PauseMode(weight_update_mode)
        self._engine = create_engine(kind, model_path, **params)

    async def _resolve(self, bucket: Any) -> Any:
        return await bucket if isinstance(bucket, ray.ObjectRef) else bucket

    async def _timed(self, coro, what: str, version: int | None):
        try:
            return await asyncio.wait_for(coro, self._timeout)
        except asyncio.TimeoutError as e:
            raise TimeoutError(
                f"{self._name}: {what} for weight version {version} did not finish within "
                f"{self._timeout:.0f} s (rollout.weight_update_timeout_s)"
            ) from e

    # ---- generation ---------------------------------------------------------------------------
    async def generate(self, request: GenerateRequest) -> GenerateResult:
        return await self._engine.generate(request)

    async def generate_many(self, requests: Sequence[GenerateRequest]) -> list[GenerateResult]:
        return await self._engine.generate_many(requests)

    async def abort(self, request_ids: Sequence[str]) -> list[GenerateResult]:
        return await self._engine.abort(request_ids)

    async def progress(self, request_ids: Sequence[str]) -> dict[str, int]:
        return await self._engine.progress(request_ids)

    async def pause(self, mode: str = "keep") -> None:
        await self._engine.pause(PauseMode(mode))

    async def resume(self) -> None:
        await self._engine.resume()

    # ---- weights ------------------------------------------------------------------------------
    async def begin_weight_update(self, version: int) -> None:
        await self._engine.begin_weight_update(version)

    async def load_weight_bucket(self, bucket: Bucket | ray.ObjectRef) -> int:
        return await self._engine.load_weight_bucket(await self._resolve(bucket))

    async def commit_weight_update(self, mode: str | None = None) -> int:
        version = getattr(self._engine, "staged_version", None)
        commit = self._engine.commit_weight_update(PauseMode(mode or self._mode))
        return await self._timed(commit, "commit", version)

    async def update_weights(
        self,
        version: int,
        buckets: Sequence[Bucket | ray.ObjectRef] | Bucket | ray.ObjectRef,
        mode: str | None = None,
    ) -> int:
        """Load a whole version: one bucket, a list of buckets, or ObjectRefs of either
        (`mode`: keep | wait | abort; default the actor's `weight_update_mode`)."""
        buckets = await self._resolve(buckets)
        single = isinstance(buckets, Mapping) or hasattr(buckets, "named_tensors")
        if single or (buckets and isinstance(buckets[0], tuple)):
            buckets = [buckets]
        await self._engine.begin_weight_update(version)
        for b in buckets:
            await self._engine.load_weight_bucket(await self._resolve(b))
        commit = self._engine.commit_weight_update(PauseMode(mode or self._mode))
        return await self._timed(commit, "commit", version)

    async def receive_bucket(self, bucket: Any) -> int | None:
        """Sink for the trainer's `WeightBucket` stream (duck-typed: `version`, `index`,
        `num_buckets`, `named_tensors()`): the first bucket opens the update, the last one
        commits it with the actor's `weight_update_mode`. Returns the new version after the
        last bucket, else None."""
        bucket = await self._resolve(bucket)
        if bucket.index == 0:
            await self._engine.begin_weight_update(bucket.version)
        staged = getattr(self._engine, "staged_version", bucket.version)
        if staged is not None and staged != bucket.version:
            raise ValueError(
                f"{self._name}: bucket {bucket.index} of version {bucket.version} arrived while "
                f"version {staged} is being loaded; send each version's buckets in order, index 0 first"
            )
        await self._engine.load_weight_bucket(bucket)
        if bucket.index == bucket.num_buckets - 1:
            return await self.commit_weight_update()
        return None

    # ---- lifecycle ----------------------------------------------------------------------------
    async def version(self) -> int:
        return self._engine.version

    async def health(self) -> EngineHealth:
        return await self._engine.health()

    async def shutdown(self) -> None:
        await self._engine.shutdown()


def start_engine_actor(
    kind: str,
    model_path: str | Path,
    *,
    name: str | None = None,
    num_cpus: float = 1,
    num_gpus: float = 0,
    weight_update_timeout_s: float = 300.0,
    weight_update_mode: str = "keep",
    actor_options: dict[str, Any] | None = None,
    **params: Any,
) -> ray.actor.ActorHandle:
    """Start an `EngineActor`; `params` go to the engine constructor (see `create_engine`)."""
    options: dict[str, Any] = dict(num_cpus=num_cpus, num_gpus=num_gpus, max_concurrency=1000)
    if name is not None:
        options["name"] = name
    options.update(actor_options or {})
    cls = ray.remote(EngineActor)
    return cls.options(**options).remote(
        kind, str(model_path), params, weight_update_timeout_s, weight_update_mode
    )


def start_engine_actor_from_config(
    cfg: RolloutConfig, model_path: str | Path, *, name: str | None = None, **options: Any
) -> ray.actor.ActorHandle:
    """`start_engine_actor` with the engine, its parameters and the weight-update policy from
    the `rollout` config section (GPUs per actor = `tensor_parallel_size` when on GPU)."""
    options.setdefault(
        "num_gpus", cfg.tensor_parallel_size if cfg.engine != "hf" and _cuda_visible() else 0
    )
    return start_engine_actor(
        cfg.engine,
        model_path,
        name=name,
        weight_update_timeout_s=cfg.weight_update_timeout_s,
        weight_update_mode=cfg.weight_update_mode,
        **options,
        **engine_params_from_config(cfg),
    )


def _cuda_visible() -> bool:
    return bool(ray.cluster_resources().get("GPU", 0))


class ActorClient:
    """Blocking client of an `EngineActor` with the same methods as `sync.EngineRunner`."""

    def __init__(self, handle: ray.actor.ActorHandle, timeout_s: float = 600.0) -> None:
        self.handle = handle
        self._timeout = timeout_s

    def _get(self, ref: ray.ObjectRef) -> Any:
        return ray.get(ref, timeout=self._timeout)

    def generate(self, request: GenerateRequest) -> GenerateResult:
        return self._get(self.handle.generate.remote(request))

    def generate_many(self, requests: Sequence[GenerateRequest]) -> list[GenerateResult]:
        return self._get(self.handle.generate_many.remote(list(requests)))

    def submit_generate(self, request: GenerateRequest) -> concurrent.futures.Future:
        return self.handle.generate.remote(request).future()

    def abort(self, request_ids: Sequence[str]) -> list[GenerateResult]:
        return self._get(self.handle.abort.remote(list(request_ids)))

    def progress(self, request_ids: Sequence[str]) -> dict[str, int]:
        return self._get(self.handle.progress.remote(list(request_ids)))

    def update_weights(
        self, version: int, tensors: Any, mode: PauseMode | str = PauseMode.KEEP
    ) -> int:
        return self._get(self.handle.update_weights.remote(version, tensors, PauseMode(mode).value))

    def pause(self, mode: PauseMode | str = PauseMode.KEEP) -> None:
        self._get(self.handle.pause.remote(PauseMode(mode).value))

    def resume(self) -> None:
        self._get(self.handle.resume.remote())

    def health(self) -> EngineHealth:
        return self._get(self.handle.health.remote())

    def version(self) -> int:
        return self._get(self.handle.version.remote())

    def close(self) -> None:
        """Shut the engine down (frees its memory) and end the actor."""
        try:
            self._get(self.handle.shutdown.remote())
        finally:
            ray.kill(self.handle)
