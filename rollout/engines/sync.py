"""Synchronous facade over an async engine, for scripts, benchmarks and tests.

    caller thread ── runner.call(engine.generate_many(reqs)) ──► event loop thread ──► engine
                  ◄───────────────── result (or exception) ─────────┘

The engine is built and driven on one private event loop that lives in a daemon thread, so
its background loop task survives between calls (a fresh `asyncio.run` per call would not).

`EngineRunner` and `actor.ActorClient` share the blocking client methods below
(`generate`, `submit`, `abort`, `update_weights`, ...), so checks written against one run
against an engine in this process or in a Ray actor alike (see `conformance.py`).

Example:
    >>> with EngineRunner("hf", model_dir) as runner:                 # doctest: +SKIP
    ...     results = runner.generate_many(requests)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

from slime_rl.rollout.engines.base import (
    EngineHealth,
    GenerateRequest,
    GenerateResult,
    PauseMode,
    RolloutEngine,
)
from slime_rl.rollout.engines.registry import create_engine

T = TypeVar("T")


class EngineRunner:
    """Owns an event-loop thread and one engine created on it."""

    def __init__(
        self, kind: str, model_path: str | Path, *, timeout_s: float = 600.0, **params: Any
    ) -> None:
        self._timeout = timeout_s
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"{kind}-runner", daemon=True
        )
        self._thread.start()

        async def build() -> RolloutEngine:
            return create_engine(kind, model_path, **params)

        self.engine: RolloutEngine = self.call(build())

    def call(self, coro: Coroutine[Any, Any, T], timeout_s: float | None = None) -> T:
        """Run a coroutine on the engine's loop and wait for its result."""
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return fut.result(timeout=timeout_s or self._timeout)

    def submit(self, coro: Coroutine[Any, Any, T]):
        """Start a coroutine on the engine's loop; returns a `concurrent.futures.Future`."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    # ---- blocking client methods ---------------------------------------------------------------
    def generate(self, request: GenerateRequest) -> GenerateResult:
        return self.call(self.engine.generate(request))

    def generate_many(self, requests: Sequence[GenerateRequest]) -> list[GenerateResult]:
        return self.call(self.engine.generate_many(requests))

    def submit_generate(self, request: GenerateRequest) -> concurrent.futures.Future:
        """Start one request; `.result(timeout)` on the returned future waits for it."""
        return self.submit(self.engine.generate(request))

    def abort(self, request_ids: Sequence[str]) -> list[GenerateResult]:
        return self.call(self.engine.abort(request_ids))

    def progress(self, request_ids: Sequence[str]) -> dict[str, int]:
        return self.call(self.engine.progress(request_ids))

    def update_weights(
        self, version: int, tensors: Any, mode: PauseMode | str = PauseMode.KEEP
    ) -> int:
        return self.call(self.engine.update_weights(version, tensors, mode))

    def pause(self, mode: PauseMode | str = PauseMode.KEEP) -> None:
        self.call(self.engine.pause(mode))

    def resume(self) -> None:
        self.call(self.engine.resume())

    def health(self) -> EngineHealth:
        return self.call(self.engine.health())

    def version(self) -> int:
        return self.engine.version

    def close(self) -> None:
        """Shut the engine down and stop the loop thread (idempotent)."""
        if not self._loop.is_running():
            return
        try:
            self.call(self.engine.shutdown())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)

    def __enter__(self) -> EngineRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
