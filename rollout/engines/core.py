"""Shared async driver for engines that advance by synchronous decode steps (hf, vllm).

    generate() ──► pending ──► _loop (asyncio task) ──► backend thread (one worker):
                                 │  admit pending        backend_add(requests)
                                 │  step                 backend_step() -> [StepDelta]
    abort()/pause()/update_weights() ►│  between steps:    backend_abort(ids), backend_update_weights(w)
                                 ▼
                      futures resolved with GenerateResult (tokens tagged with the version
                      that was live during the step that produced them)

All backend calls run on one dedicated thread, so the backend never sees two calls at once
and the event loop (a Ray asyncio actor's) stays responsive while a step computes. Weights
are applied only while no step runs, which makes the per-token versions exact.

A weight update has two phases: pausing (cancellable: a caller that gives up, e.g. on the
actor's timeout, leaves the old weights and version) and loading (shielded: once the backend
received the tensors the version must follow them, so the load runs to the end and resumes
generation even if its caller is gone; `loading_version` says it is running).

An engine that was never shut down is shut down when the interpreter exits (`atexit`): its
requests in flight end as aborted and the backend is closed, instead of the loop failing with
a traceback (and vLLM possibly aborting the process).
"""

from __future__ import annotations

import abc
import asyncio
import atexit
import concurrent.futures
import dataclasses
import functools
import logging
import queue
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from slime_rl.rollout.engines.base import (
    EngineHealth,
    FinishReason,
    GenerateRequest,
    GenerateResult,
    PauseMode,
    RequestRejected,
    WeightBuckets,
    collect_buckets,
    generate_each,
)

logger = logging.getLogger(__name__)

EXIT_SHUTDOWN_TIMEOUT_S = 30.0
"""How long the exit hook waits for each forgotten engine to shut down."""


class BackendThread:
    """The one thread on which every backend call of an engine runs, in submission order.

    Not a `ThreadPoolExecutor`: those refuse new work once the interpreter starts exiting
    ("cannot schedule new futures after interpreter shutdown"), which failed the engine loop
    with a traceback when a script ended with a request in flight, and would keep the exit
    hook from closing the backend. A daemon thread, so a forgotten engine cannot hang exit.
    """

    def __init__(self, name: str) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
        """Queue `fn(*args)`; the future holds its result or exception."""
        if self._stopped:
            raise RuntimeError(f"{self._thread.name}: the engine thread is stopped")
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put((fut, fn, args))
        return fut

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            fut, fn, args = item
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args)
            except BaseException as e:  # delivered to the caller, whatever it is
                fut.set_exception(e)
            else:
                fut.set_result(result)
            # Drop this call's arguments now, not when the next call arrives: a weight update's
            # are a whole state dict, which an idle engine would otherwise keep until the next.
            del item, fut, fn, args
            result = None

    def shutdown(self, wait: bool = True) -> None:
        """Stop after the calls already queued; later `submit`s raise."""
        if not self._stopped:
            self._stopped = True
            self._queue.put(None)
        if wait and threading.current_thread() is not self._thread:
            self._thread.join()


_UNCLOSED: weakref.WeakSet[SteppedEngine] = weakref.WeakSet()
"""Engines not shut down yet, for the exit hook (weak: a dropped engine is not kept alive)."""


@atexit.register
def _shutdown_unclosed_engines() -> None:
    for engine in list(_UNCLOSED):
        try:
            engine._shutdown_at_exit(EXIT_SHUTDOWN_TIMEOUT_S)
        except Exception as e:  # exiting anyway: one line, no traceback
            logger.warning("%s engine: shutdown at exit failed: %r", engine.backend, e)


@dataclasses.dataclass(slots=True)
class StepDelta:
    """New tokens of one request from one backend step."""

    request_id: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    routing: tuple[tuple[int, Any], ...] = ()
    """MoE routing of positions this step computed for the request (engines that record it):
    `(first position, int16 array (n, L, K))` chunks."""


@dataclasses.dataclass(slots=True)
class _Live:
    request: GenerateRequest
    future: asyncio.Future
    policy_version: int
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    token_versions: list[int] = dataclasses.field(default_factory=list)
    admitted: bool = False
    routing: list[Any] = dataclasses.field(default_factory=list)
    """Chunks (n, L, K) of recorded MoE routing, positions 0.. in order."""
    routed: int = 0
    routing_gap: bool = False
    """A position's routing was never delivered (e.g. served from a prefix cache): none is kept."""

    def add_routing(self, start: int, rows: Any) -> None:
        """Keep the routing of positions not recorded yet (a recomputed position keeps its
        first routing, the one that produced its log-prob); a gap drops the routing."""
        if start > self.routed:
            self.routing_gap = True
        new = rows[self.routed - start :] if start <= self.routed else rows[:0]
        if len(new):
            self.routing.append(new)
            self.routed += len(new)

    def routed_experts(self) -> Any:
        if self.routing_gap or not self.routing:
            return None
        import numpy as np

        return np.concatenate(self.routing) if len(self.routing) > 1 else self.routing[0]

    def finish(
        self, version: int, reason: FinishReason, stop_reason: str | int | None = None
    ) -> GenerateResult:
        result = GenerateResult(
            request_id=self.request.request_id,
            token_ids=list(self.token_ids),
            logprobs=list(self.logprobs),
            finish_reason=reason,
            token_versions=list(self.token_versions),
            policy_version=self.policy_version,
            policy_version_end=version,
            stop_reason=stop_reason,
            routed_experts=self.routed_experts(),
        )
        if not self.future.done():
            self.future.set_result(result)
        return result


class SteppedEngine(abc.ABC):
    """Implements `RolloutEngine` on top of five synchronous backend hooks."""

    backend: str = "?"

    def __init__(self) -> None:
        self._version = 0
        self._live: dict[str, _Live] = {}
        self._pending: list[str] = []
        self._paused_by: set[str] = set()  # "user" and/or "update"
        self._draining = False
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        # Set while the loop is between steps (no admit/step in flight, deltas delivered):
        # pause() waits on it, so no token is produced or delivered after pause() returns.
        self._between_steps = asyncio.Event()
        self._between_steps.set()
        self._thread = BackendThread(f"{self.backend}-engine")
        self._loop_task: asyncio.Task | None = None
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:  # built outside a loop; the first generate() records it
            self._loop = None
        self._update_lock = asyncio.Lock()
        self._loading_version: int | None = None
        self._error: BaseException | None = None
        self._closed = False
        _UNCLOSED.add(self)

    # ---- backend hooks (run on the engine thread) -------------------------------------------
    @abc.abstractmethod
    def backend_add(self, requests: list[GenerateRequest]) -> None: ...

    @abc.abstractmethod
    def backend_step(self) -> list[StepDelta]: ...

    @abc.abstractmethod
    def backend_abort(self, request_ids: list[str]) -> None: ...

    @abc.abstractmethod
    def backend_update_weights(self, named_tensors: list[tuple[str, torch.Tensor]]) -> None:
        """Load a full state dict into the model and invalidate every cache derived from it."""

    @abc.abstractmethod
    def backend_close(self) -> None: ...

    # ---- protocol ------------------------------------------------------------------------------
    @property
    def version(self) -> int:
        return self._version

    @property
    def loading_version(self) -> int | None:
        """Version whose weights are being loaded right now (None otherwise); such a load
        finishes and sets the version even if the caller of update_weights gave up."""
        return self._loading_version

    async def _call(self, fn, *args):
        return await asyncio.wrap_future(self._thread.submit(fn, *args))

    def _set_engine_threads(self, num_threads: int) -> None:
        """Set torch's intra-op thread count on the engine thread, where every forward pass
        runs, so that it holds whatever other components of the process set later.

        The count is per thread (OpenMP), and torch initialises a thread's count lazily, at
        its first parallel op, from the value most recently set by *any* thread: set on the
        constructing thread only, the engine thread would take whatever a trainer (or another
        engine) in the process set last. So: initialise the engine thread first
        (`get_num_threads`), then set its own count. `torch._C` directly because vLLM's CPU
        worker turns `torch.set_num_threads` into a no-op."""

        def apply() -> None:
            torch.get_num_threads()  # run torch's per-thread lazy init now, not later
            torch._C.set_num_threads(num_threads)

        self._thread.submit(apply).result()

    async def torch_threads(self) -> int:
        """Torch intra-op threads of the engine thread (what `num_threads` set)."""
        return await self._call(torch.get_num_threads)

    def _check_usable(self) -> None:
        if self._closed:
            raise RuntimeError(f"{self.backend} engine is shut down; create a new one")
        if self._error is not None:
            raise RuntimeError(
                f"{self.backend} engine failed earlier: {self._error!r}"
            ) from self._error

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        self._check_usable()
        if request.request_id in self._live:
            raise RequestRejected(
                f"request_id {request.request_id!r} is already in flight; ids must be unique"
            )
        if self._loop_task is None:
            self._loop = asyncio.get_running_loop()
            self._loop_task = self._loop.create_task(self._run_loop())
        live = _Live(request, asyncio.get_running_loop().create_future(), self._version)
        self._live[request.request_id] = live
        self._pending.append(request.request_id)
        self._wake.set()
        try:
            return await asyncio.shield(live.future)
        except asyncio.CancelledError:  # the caller gave up: free the slot
            if request.request_id in self._live:
                asyncio.get_running_loop().create_task(self.abort([request.request_id]))
            raise

    async def generate_many(self, requests: Sequence[GenerateRequest]) -> list[GenerateResult]:
        """Concurrent `generate`; a request refused alone gives a `FinishReason.ERROR` result."""
        return await generate_each(self, requests)

    async def abort(self, request_ids: Sequence[str]) -> list[GenerateResult]:
        lives = [self._live[r] for r in request_ids if r in self._live]
        if not lives:
            return []
        admitted = [lv.request.request_id for lv in lives if lv.admitted]
        for lv in lives:
            if lv.request.request_id in self._pending:
                self._pending.remove(lv.request.request_id)
        if admitted:
            await self._call(self.backend_abort, admitted)
        results = []
        for lv in lives:
            self._live.pop(lv.request.request_id, None)
            # A request that finished during the last step keeps its real result.
            results.append(
                lv.future.result()
                if lv.future.done()
                else lv.finish(self._version, FinishReason.ABORT)
            )
        return results

    async def progress(self, request_ids: Sequence[str]) -> dict[str, int]:
        return {r: len(self._live[r].token_ids) for r in request_ids if r in self._live}

    async def pause(self, mode: PauseMode | str = PauseMode.KEEP) -> None:
        await self._pause(PauseMode(mode), "user")

    async def resume(self) -> None:
        self._paused_by.discard("user")
        self._wake.set()

    async def _pause(self, mode: PauseMode, who: str) -> None:
        if mode is PauseMode.WAIT and not self._paused_by:  # (already paused: nothing can drain)
            self._draining = True
            try:
                while any(lv.admitted for lv in self._live.values()) and self._error is None:
                    self._idle.clear()
                    self._wake.set()
                    await self._idle.wait()
            finally:
                self._draining = False
                self._wake.set()  # requests that queued meanwhile may start now
        self._paused_by.add(who)
        self._wake.set()
        # Barrier: wait until the loop is between steps (an admit or step in flight ends and
        # its tokens are delivered); the loop re-checks the pause after admitting, so no step
        # starts and no token arrives from now until resume.
        await self._between_steps.wait()
        if mode is PauseMode.ABORT:
            await self.abort([r for r, lv in self._live.items() if lv.admitted])

    async def update_weights(
        self, version: int, buckets: WeightBuckets, mode: PauseMode | str = PauseMode.KEEP
    ) -> int:
        """See `RolloutEngine.update_weights`. Reading the buckets and pausing can be
        cancelled (a caller's timeout then leaves the old weights and version); from the
        backend load on, the update runs to the end even if its caller is gone."""
        self._check_usable()
        named = collect_buckets(buckets)
        if not named:
            raise ValueError(f"weight update to version {version} has no tensors")
        # The lock is released by the load task, not here: a load that outlives its caller
        # still holds it, so updates never overlap.
        await self._update_lock.acquire()
        try:
            await self._pause(PauseMode(mode), "update")
        except BaseException:  # gave up (timeout) or failed while pausing: nothing loaded
            self._resume_after_update()
            raise
        self._loading_version = int(version)
        task = asyncio.ensure_future(self._load_and_resume(named, int(version)))
        try:
            # Shielded: once loading starts, the version must follow the weights even if the
            # caller times out.
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.done():
                task.add_done_callback(functools.partial(report_orphan_load, self.backend, version))
            raise
        return int(version)

    async def _load_and_resume(self, staged: list[tuple[str, torch.Tensor]], version: int) -> None:
        try:
            await self._call(self.backend_update_weights, staged)
            self._version = version
            logger.info("%s: weights at version %d (%d tensors)", self.backend, version, len(staged))
        finally:
            self._resume_after_update()

    def _resume_after_update(self) -> None:
        self._loading_version = None
        self._paused_by.discard("update")
        self._wake.set()
        self._update_lock.release()

    async def health(self) -> EngineHealth:
        running = sum(lv.admitted for lv in self._live.values())
        return EngineHealth(
            ok=self._error is None and not self._closed,
            backend=self.backend,
            version=self._version,
            paused=bool(self._paused_by),
            num_running=running,
            num_waiting=len(self._live) - running,
            detail=repr(self._error) if self._error else ("shut down" if self._closed else ""),
        )

    async def shutdown(self) -> None:
        if self._closed:
            return
        await self.abort(list(self._live))
        self._closed = True
        _UNCLOSED.discard(self)
        self._wake.set()
        if self._loop_task is not None:
            await self._loop_task
        await self._call(self.backend_close)
        self._thread.shutdown(wait=True)

    def _shutdown_at_exit(self, timeout_s: float) -> None:
        """Called by the exit hook for an engine nobody shut down."""
        if self._closed:
            return
        logger.warning(
            "%s engine was not shut down; shutting it down at exit (%d requests in flight "
            "end as aborted). Call shutdown()/close() when done.",
            self.backend,
            len(self._live),
        )
        loop = self._loop
        try:
            current = asyncio.get_running_loop()
        except RuntimeError:
            current = None
        if loop is not None and loop.is_running() and loop is not current:
            asyncio.run_coroutine_threadsafe(self.shutdown(), loop).result(timeout_s)
            return
        # Its loop is gone (e.g. asyncio.run returned): close the backend directly.
        self._closed = True
        _UNCLOSED.discard(self)
        self._thread.submit(self.backend_close).result(timeout_s)
        self._thread.shutdown(wait=False)

    def _admit(self, requests: list[GenerateRequest]) -> list[tuple[str, Exception]]:
        failed: list[tuple[str, Exception]] = []
        for r in requests:
            try:
                self.backend_add([r])
            except Exception as e:  # rejected at admission (e.g. too long): backend untouched
                rejected = RequestRejected(
                    f"{self.backend} engine refused request {r.request_id!r}: {e}"
                )
                rejected.__cause__ = e
                failed.append((r.request_id, rejected))
        return failed

    # ---- the loop ------------------------------------------------------------------------------
    async def _run_loop(self) -> None:
        try:
            await self._loop_body()
        finally:
            self._between_steps.set()
            self._idle.set()

    async def _loop_body(self) -> None:
        while not self._closed:
            self._between_steps.set()
            running = any(lv.admitted for lv in self._live.values())
            can_admit = bool(self._pending) and not self._paused_by and not self._draining
            if self._paused_by or not (running or can_admit):
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            self._between_steps.clear()
            try:
                if can_admit:
                    batch = [self._live[r] for r in self._pending]
                    self._pending.clear()
                    for lv in batch:
                        lv.admitted = True
                        lv.policy_version = self._version
                    failed = await self._call(self._admit, [lv.request for lv in batch])
                    for rid, err in failed:  # a bad request fails alone, not the engine
                        lv = self._live.pop(rid, None)
                        if lv is not None and not lv.future.done():
                            lv.future.set_exception(err)
                if self._paused_by or self._closed:  # paused while admitting: no step now
                    continue
                deltas = await self._call(self.backend_step)
            except Exception as e:  # the backend is in an unknown state: fail loudly, once
                logger.exception("%s engine step failed", self.backend)
                self._error = e
                for lv in list(self._live.values()):
                    if not lv.future.done():
                        lv.future.set_exception(
                            RuntimeError(f"{self.backend} engine failed: {e!r}")
                        )
                self._live.clear()
                return
            version = self._version
            for d in deltas:
                lv = self._live.get(d.request_id)
                if lv is None:  # aborted while the step ran
                    continue
                lv.token_ids.extend(d.token_ids)
                lv.logprobs.extend(d.logprobs)
                lv.token_versions.extend([version] * len(d.token_ids))
                for first, rows in d.routing:
                    lv.add_routing(first, rows)
                if d.finish_reason is not None:
                    del self._live[d.request_id]
                    lv.finish(version, d.finish_reason, d.stop_reason)
            await asyncio.sleep(0)  # let callers run (abort, pause) between steps


def report_orphan_load(backend: str, version: int, task: asyncio.Future) -> None:
    """Done-callback of a load whose update_weights caller gave up: say how it ended (and retrieve
    its exception, which nobody else will)."""
    if task.cancelled():
        return
    if (error := task.exception()) is not None:
        logger.error("%s: weight update to version %d failed after its caller gave up: %r", backend, version, error)
    else:
        logger.warning("%s: weight update to version %d finished after its caller gave up", backend, version)
