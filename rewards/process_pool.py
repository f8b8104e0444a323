"""Worker processes for blocking rewards (``reward.executor: process``), killable on timeout.

    RewardRunner._call ── await pool.call(comp, sample, timeout_s)
      └─ take an idle worker (start one, up to max_workers; waiting for one is not timed)
      └─ send (ref, kwargs, sample) ──► worker: load_reward(ref, kwargs) once, call, send result
      └─ result within timeout_s ──► worker back to the idle list
         past timeout_s ──► SIGKILL that worker only (a fresh one replaces it on demand)

Unlike threads, processes give CPU-bound rewards real parallelism and a call that never
returns (math-verify on a pathological expression, say) is killed instead of holding its
worker forever. Workers start with ``forkserver`` (``spawn`` where unavailable) and load the
reward from its reference, so the reference must be importable there: a built-in name, an
installed module or a file path (all that ``reward.fn`` accepts).
"""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing
import multiprocessing.connection
from typing import Any

from slime_rl.rewards.loader import RewardComponent

logger = logging.getLogger(__name__)


class WorkerError(RuntimeError):
    """The reward raised in its worker process; the message is the reward's own error."""


def _worker_main(conn: multiprocessing.connection.Connection) -> None:
    from slime_rl.rewards.loader import load_reward  # loaded in the worker process

    loaded: dict[tuple[str, str], RewardComponent] = {}
    while True:
        try:
            ref, kwargs, arg = conn.recv()
        except (EOFError, KeyboardInterrupt):
            return
        try:
            key = (ref, json.dumps(kwargs, sort_keys=True, default=repr))
            comp = loaded.get(key)
            if comp is None:
                comp = loaded[key] = load_reward(ref, kwargs)
            reply: tuple[bool, Any] = (True, comp.fn(arg, **comp.kwargs))
        except Exception as e:
            reply = (False, f"{type(e).__name__}: {e}")
        try:
            conn.send(reply)
        except Exception as e:  # an unpicklable result
            conn.send((False, f"result cannot be sent back from the worker process: {type(e).__name__}: {e}"))


class _Worker:
    def __init__(self, ctx: Any) -> None:
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker_main, args=(child,), daemon=True, name="slime-rl-reward")
        self.process.start()
        child.close()

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=5)
        self.conn.close()


class RewardProcessPool:
    """At most ``max_workers`` reward worker processes, started on demand."""

    def __init__(self, max_workers: int) -> None:
        if max_workers < 1:
            raise ValueError(f"reward.max_workers={max_workers} must be >= 1")
        methods = multiprocessing.get_all_start_methods()
        self._ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
        self.max_workers = max_workers
        self._idle: list[_Worker] = []
        self._busy: set[_Worker] = set()
        self._free: asyncio.Condition | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _condition(self) -> asyncio.Condition:
        loop = asyncio.get_running_loop()
        if self._free is None or self._loop is not loop:  # a Condition is bound to one loop
            self._free, self._loop = asyncio.Condition(), loop
        return self._free

    async def _acquire(self) -> _Worker:
        free = self._condition()
        async with free:
            while not self._idle and len(self._busy) >= self.max_workers:
                await free.wait()
            worker = self._idle.pop() if self._idle else None
            if worker is None:
                worker = await asyncio.to_thread(_Worker, self._ctx)
            self._busy.add(worker)
            return worker

    async def _release(self, worker: _Worker, healthy: bool) -> None:
        self._busy.discard(worker)
        if healthy:
            self._idle.append(worker)
        else:
            await asyncio.to_thread(worker.kill)
        free = self._condition()
        async with free:
            free.notify()

    async def call(self, comp: RewardComponent, arg: Any, timeout_s: float) -> Any:
        """Run ``comp`` on ``arg`` in a worker; the timeout starts once a worker is free.

        Raises ``asyncio.TimeoutError`` (the worker is killed) or :class:`WorkerError` with
        the reward's own error text.
        """
        worker = await self._acquire()
        healthy = False
        try:
            loop = asyncio.get_running_loop()
            ready = asyncio.Event()
            fd = worker.conn.fileno()
            loop.add_reader(fd, ready.set)
            try:
                worker.conn.send((comp.ref, dict(comp.load_kwargs or comp.kwargs), arg))
                await asyncio.wait_for(ready.wait(), timeout_s)
            finally:
                loop.remove_reader(fd)
            try:
                ok, value = worker.conn.recv()
            except EOFError:
                worker.process.join(timeout=5)
                raise WorkerError(
                    f"the reward worker process died (exit code {worker.process.exitcode})"
                ) from None
            healthy = True
        finally:
            await self._release(worker, healthy)
        if not ok:
            raise WorkerError(value)
        return value

    def close(self) -> None:
        """Kill every worker (running calls included)."""
        for worker in [*self._idle, *self._busy]:
            worker.kill()
        self._idle.clear()
        self._busy.clear()
