"""Clients the rollout manager talks through: the buffer (Ray actor or in-process) and in-process engines.

    RolloutManager ──put(batch) / counts() / save(folder)──► RayBufferClient ──► BufferActor
                                                         └─► LocalBufferClient ──► ReplayBuffer (thread)
                   ──generate_group / update_weights────► RayEngineClient (engine_pool.py)
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
    GenerateRequest,
    GenerateResult,
    PauseMode,
    RolloutEngine,
    generate_each,
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


class LocalEngineClient:
    """An in-process `RolloutEngine` as an `EngineClient` (created and used on one event loop)."""

    def __init__(self, engine: RolloutEngine, name: str = "engine-0") -> None:
        self.engine = engine
        self.name = name

    async def generate_group(self, requests: Sequence[GenerateRequest]) -> list[GenerateResult]:
        return await generate_each(self.engine, requests)

    async def update_weights(self, version: int, buckets: Sequence[Any], mode: str | None) -> int:
        return await self.engine.update_weights(version, list(buckets), PauseMode(mode or "keep"))

    async def version(self) -> int:
        return self.engine.version

    async def progress(self, request_ids: Sequence[str]) -> dict[str, int]:
        return await self.engine.progress(request_ids)

    async def info(self) -> dict[str, Any]:
        return {"max_model_len": int(getattr(self.engine, "max_model_len", 0) or 0)}
