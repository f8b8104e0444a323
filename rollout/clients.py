"""Clients the rollout manager talks through: the buffer (Ray actor or in-process) and in-process engines.

    RolloutManager ──put(batch) / counts() / save(folder)──► RayBufferClient ──► BufferActor
                                                         └─► LocalBufferClient ──► ReplayBuffer (thread)
                   ──generate_group / load_weights──────► RayEngineClient (engine_pool.py)
                                                         └─► LocalEngineClient ──► RolloutEngine

The local clients let the manager run in one process (tests, notebooks) with the same code path
as under Ray.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
from slime_rl.buffers.replay_buffer import ReplayBuffer
from slime_rl.buffers.stats import BufferCounts
from slime_rl.rollout.engines.base import (
    FinishReason,
    GenerateRequest,
    GenerateResult,
    PauseMode,
    RolloutEngine,
)


class RayBufferClient:
    """A `BufferActor` handle with awaitable, timed calls."""

    def __init__(self, handle: Any, timeout_s: float = 900.0) -> None:
        self.handle = handle
        self._timeout = timeout_s

    async def _await(self, ref: Any, what: str) -> Any:
        try:
            return await asyncio.wait_for(ref, self._timeout)
        except asyncio.TimeoutError as e:
            raise TimeoutError(f"buffer actor: {what} did not answer within {self._timeout:.0f} s") from e

    async def put(self, batch: pa.RecordBatch) -> int:
        return await self._await(self.handle.put.remote(batch), "put")

    async def counts(self) -> BufferCounts:
        return await self._await(self.handle.counts.remote(), "counts")

    async def save(self, folder: str) -> str:
        return await self._await(self.handle.save.remote(folder), "save")


class LocalBufferClient:
    """An in-process `ReplayBuffer` behind the same async surface (blocking calls run in a thread)."""

    def __init__(self, buffer: ReplayBuffer) -> None:
        self.buffer = buffer

    async def put(self, batch: pa.RecordBatch) -> int:
        return await asyncio.to_thread(self.buffer.put, batch)

    async def counts(self) -> BufferCounts:
        return self.buffer.counts()

    async def save(self, folder: str) -> str:
        return str(await asyncio.to_thread(self.buffer.save, folder))


def error_result(request: GenerateRequest, error: BaseException, version: int) -> GenerateResult:
    """A result standing for a request the engine refused (the sample becomes `failed`)."""
    reason = getattr(FinishReason, "ERROR", FinishReason.ABORT)
    kwargs: dict[str, Any] = {}
    if "error" in GenerateResult.__dataclass_fields__:
        kwargs["error"] = f"{type(error).__name__}: {error}"
    return GenerateResult(request.request_id, [], [], reason, [], version, version, None, **kwargs)


class LocalEngineClient:
    """An in-process `RolloutEngine` as an `EngineClient` (created and used on one event loop)."""

    def __init__(self, engine: RolloutEngine, name: str = "engine-0") -> None:
        self.engine = engine
        self.name = name

    async def generate_group(self, requests: Sequence[GenerateRequest]) -> list[GenerateResult]:
        async def one(r: GenerateRequest) -> GenerateResult:
            try:
                return await self.engine.generate(r)
            except ValueError as e:  # refused alone (e.g. prompt too long); others still run
                return error_result(r, e, self.engine.version)

        return list(await asyncio.gather(*(one(r) for r in requests)))

    async def load_weights(self, version: int, buckets: Sequence[Any], mode: str | None) -> int:
        await self.engine.begin_weight_update(version)
        for b in buckets:
            await self.engine.load_weight_bucket(b)
        return await self.engine.commit_weight_update(PauseMode(mode or "keep"))

    async def version(self) -> int:
        return self.engine.version

    async def info(self) -> dict[str, Any]:
        return {"max_model_len": int(getattr(self.engine, "max_model_len", 0) or 0)}
