"""Ray actor wrapper: one rollout engine per (asyncio) actor, same methods as `RolloutEngine`.

    rollout manager ──generate_group(reqs)──────► EngineActor ──► engine (hf | vllm | sglang)
                    ──tokenizer_info()──────────►     (per-request results: a bad request is
                                                       an error result, not an exception)
                    ──update_weights(v, buckets)►     resolve ObjectRefs ─► check versions and
                                                      indices ─► read the buckets off the event
                                                      loop (files, broadcasts) ─► engine.update_weights
                                                      (pause → load full state dict → resume)

A bucket is `list[tuple[str, Tensor]]` or `dict[str, Tensor]` (HF parameter names), or a
versioned handle (`version`, `index`, `num_buckets`, `named_tensors()`: the trainer's
`WeightBucket`, a disk or collective bucket of `slime_rl.weight_sync`); the buckets of one
version together must hold the full state dict. Every update has a timeout and raises
`TimeoutError` naming the actor, the version and whether the old weights are still in place.

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
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ray
from slime_rl.rollout.config import RolloutConfig
from slime_rl.rollout.engines.base import (
    EngineHealth,
    GenerateRequest,
    GenerateResult,
    PauseMode,
    collect_buckets,
    generate_each,
)
from slime_rl.rollout.engines.registry import create_engine, engine_params_from_config

logger = logging.getLogger(__name__)

class EngineActor:
    """Owns one engine; use through `start_engine_actor` (an asyncio Ray actor)."""

    def __init__(
        self,
        kind: str,
        model_path: str,
        params: dict[str, Any],
        weight_update_timeout_s: float = 300.0,
        weight_update_mode: str = "keep",
        load: bool = True,
    ) -> None:
        """`load=False` defers loading the model to `load()`, so a caller can tell an actor that
        waits for a node with room (`node_info` does not answer yet) from one loading its model."""
        self._name = f"EngineActor[{kind}]"
        if ray.is_initialized():  # (get_runtime_context() would start a local Ray cluster)
            try:
                ctx = ray.get_runtime_context()
                if ctx.worker.mode == ray.WORKER_MODE:  # a driver (direct use in tests) has no actor name
                    self._name = f"EngineActor[{kind}:{ctx.get_actor_name() or ctx.get_actor_id()}]"
            except Exception:
                pass
        self._timeout = weight_update_timeout_s
        self._mode = PauseMode(weight_update_mode)
        self._spec = (kind, model_path, params)
        self._engine = create_engine(kind, model_path, **params) if load else None

    async def load(self) -> int:
        """Load the model if `__init__` deferred it; returns the engine's weight version."""
        if self._engine is None:
            kind, model_path, params = self._spec
            self._engine = create_engine(kind, model_path, **params)  # on the actor loop: vLLM wants it there
        return self._engine.version

    async def node_info(self) -> dict[str, Any]:
        """Where this engine runs: `{"node_id", "node_ip", "pid"}`."""
        import os

        return {"node_id": ray.get_runtime_context().get_node_id(), "node_ip": ray.util.get_node_ip_address(),
                "pid": os.getpid()}

    async def _resolve(self, bucket: Any) -> Any:
        return await bucket if isinstance(bucket, ray.ObjectRef) else bucket

    async def _timed(self, coro, what: str, version: int | None):
        old = self._engine.version
        try:
            return await asyncio.wait_for(coro, self._timeout)
        except asyncio.TimeoutError as e:
            loading = getattr(self._engine, "loading_version", None)
            if loading is not None and loading == version:
                state = (
                    f"the load had started and cannot be interrupted: it goes on and the "
                    f"engine switches to version {version} when it ends (check version())"
                )
            else:
                state = (
                    f"nothing was loaded: the engine keeps version {old} and its weights; "
                    "resend the version"
                )
            raise TimeoutError(
                f"{self._name}: {what} for weight version {version} did not finish within "
                f"{self._timeout:g} s (rollout.weight_update_timeout_s); {state}"
            ) from e

    # ---- generation ---------------------------------------------------------------------------
    async def generate(self, request: GenerateRequest) -> GenerateResult:
        return await self._engine.generate(request)

    async def generate_many(self, requests: Sequence[GenerateRequest]) -> list[GenerateResult]:
        return await self._engine.generate_many(requests)

    async def generate_group(self, requests: Sequence[GenerateRequest]) -> list[GenerateResult]:
        """One prompt group in one call (low Ray overhead): results in request order; a request
        refused alone (too long, duplicate id) comes back with `finish_reason=error` and
        `error` set, whatever the backend's `generate_many` does. Raises only when the engine
        itself failed or is shut down."""
        return await generate_each(self._engine, requests)

    async def tokenizer_info(self) -> dict[str, Any]:
        """`{"max_model_len": int, "eos_token_id": int | list[int]}`: the engine's context limit
        (prompt + response tokens; hf: the model's `max_position_embeddings`) and its EOS ids."""
        info = getattr(self._engine, "tokenizer_info", None)
        if callable(info):
            return dict(info())
        return {
            "max_model_len": int(getattr(self._engine, "max_model_len", 0) or 0),
            "eos_token_id": list(getattr(self._engine, "eos_token_ids", []) or []),
        }

    async def torch_threads(self) -> int | None:
        """Torch intra-op threads of the engine thread (hf, vllm; None for other backends)."""
        fn = getattr(self._engine, "torch_threads", None)
        return await fn() if callable(fn) else None

    async def abort(self, request_ids: Sequence[str]) -> list[GenerateResult]:
        return await self._engine.abort(request_ids)

    async def progress(self, request_ids: Sequence[str]) -> dict[str, int]:
        return await self._engine.progress(request_ids)

    async def pause(self, mode: str = "keep") -> None:
        await self._engine.pause(PauseMode(mode))

    async def resume(self) -> None:
        await self._engine.resume()

    # ---- weights ------------------------------------------------------------------------------
    async def update_weights(
        self, version: int, buckets: Sequence[Any] | Any, mode: str | None = None
    ) -> int:
        """Load one whole version from one bucket or a list of buckets, each a value or an
        ObjectRef (resolved here, so tensors never pass through the caller). Versioned
        buckets are checked first: every bucket's `version` equals `version`, indices are
        distinct and all `num_buckets` arrived (then staged in index order); nothing is
        loaded unless the checks pass. `mode`: keep | wait | abort (default: the actor's
        `weight_update_mode`).

        Returns the new version. Raises `ValueError` naming the bucket (wrong version,
        repeated index, missing buckets), `TimeoutError` naming the actor and the version.
        """
        t0 = time.perf_counter()
        buckets = await self._resolve(buckets)
        single = isinstance(buckets, Mapping) or hasattr(buckets, "named_tensors")
        if single or (buckets and isinstance(buckets[0], tuple)):
            buckets = [buckets]
        buckets = list(await asyncio.gather(*(self._resolve(b) for b in buckets)))
        if not buckets:
            raise ValueError(f"{self._name}: update_weights({version}) got no buckets")
        buckets = _check_versioned(self._name, version, buckets)
        pause = PauseMode(mode or self._mode)

        async def stage_and_load() -> int:
            # Reading the buckets blocks (disk reads, collective receives; object-store buckets
            # are mapped, not copied): off the event loop, so generation goes on meanwhile. The
            # tensors come back through `staged`, not as the future's result: executor futures
            # sit in reference cycles, which would keep a whole state dict alive until Python's
            # cycle collector happens to run.
            staged: list[Any] = []
            await asyncio.get_running_loop().run_in_executor(None, lambda: staged.extend(collect_buckets(buckets)))
            named, staged = staged, []
            t1 = time.perf_counter()
            got = await self._engine.update_weights(version, named, pause)
            self._update_stats = {"transfer_s": t1 - t0, "load_s": time.perf_counter() - t1}
            return got

        return await self._timed(stage_and_load(), "update_weights", version)

    async def weight_update_stats(self) -> dict[str, float]:
        """Seconds of the last weight update: `transfer_s` (resolving refs, reading or receiving
        the buckets; generation goes on) and `load_s` (pause, load, cache reset, resume)."""
        return dict(getattr(self, "_update_stats", {}))

    # ---- lifecycle ----------------------------------------------------------------------------
    async def version(self) -> int:
        return self._engine.version

    async def health(self) -> EngineHealth:
        return await self._engine.health()

    async def shutdown(self) -> None:
        await self._engine.shutdown()


def _check_versioned(actor: str, version: int, buckets: list[Any]) -> list[Any]:
    """Buckets of one version in index order, or `ValueError` naming what does not fit."""
    for pos, b in enumerate(buckets):
        got = getattr(b, "version", version)
        if got != version:
            raise ValueError(
                f"{actor}: bucket {getattr(b, 'index', pos)} (position {pos}) holds weight "
                f"version {got}, expected {version}; send one version's buckets per call"
            )
    versioned = [b for b in buckets if hasattr(b, "num_buckets")]
    if not versioned:
        return buckets
    indices = [b.index for b in versioned]
    if len(set(indices)) != len(indices):
        dup = next(i for i in indices if indices.count(i) > 1)
        raise ValueError(f"{actor}: bucket {dup} of version {version} arrived twice")
    expected = {b.num_buckets for b in versioned}
    if len(expected) != 1 or len(versioned) != next(iter(expected)):
        raise ValueError(
            f"{actor}: version {version} has {sorted(expected)} buckets but {len(versioned)} "
            f"arrived (indices {sorted(indices)}); send all of them"
        )
    if len(versioned) != len(buckets):
        raise ValueError(f"{actor}: version {version} mixes versioned buckets with plain ones")
    return sorted(buckets, key=lambda b: b.index)


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
    load: bool = True,
    **params: Any,
) -> ray.actor.ActorHandle:
    """Start an `EngineActor`; `params` go to the engine constructor (see `create_engine`).
    `load=False`: the model loads on `load()` (see `EngineActor`)."""
    options: dict[str, Any] = dict(num_cpus=num_cpus, num_gpus=num_gpus, max_concurrency=1000)
    if name is not None:
        options["name"] = name
    options.update(actor_options or {})
    cls = ray.remote(EngineActor)
    return cls.options(**options).remote(
        kind, str(model_path), params, weight_update_timeout_s, weight_update_mode, load
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
