"""Worker processes for blocking rewards (``reward.executor: process``), killable on timeout.

    RewardProcessPool(max_workers, components)   # starts every worker at once (warm pool)
      worker: load_reward(ref, kwargs) for each component ──► "ready" (or the load error)
    RewardRunner._call ── await pool.call(comp, sample, timeout_s)
      └─ take a ready worker, first come first served (waiting, start-up included, is not timed)
      └─ send (ref, kwargs, sample) ──► worker calls it, sends the result
      └─ result within timeout_s ──► worker handed to the oldest waiting call
         past timeout_s ──► SIGKILL that worker only, the call fails at once; a replacement
                            forks from a preloaded forkserver, in the background

Unlike threads, processes give CPU-bound rewards real parallelism and a call that never
returns (math-verify on a pathological expression, say) is killed instead of holding its
worker forever. The clock of a call starts when it is sent to a worker that has finished
loading: a worker's start-up (interpreter, imports, loading the reward) never counts against
``reward.timeout_s``, so a timeout shorter than the start-up cannot fail every sample.
Workers start with ``forkserver`` (``spawn`` where unavailable) and load the reward from its
reference, so the reference must be importable there: a built-in name, an installed module or
a file path (all that ``reward.fn`` accepts). A reward that loads in the driver but not in a
worker fails its calls at once with the worker's error, not with timeouts.

Waiting calls are served in arrival order: when timeouts keep the pool busy, no group waits
behind later ones (polling waiters used to race for each freed worker, so the samples of some
groups lost every race and their groups went stale in the buffer). The forkserver preloads
this module (and with it slime_rl's imports), so a replacement is ready in milliseconds plus
the reward's own loading, not a fresh interpreter's start-up.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import multiprocessing
import multiprocessing.connection
import threading
from collections.abc import Sequence
from typing import Any

from slime_rl.rewards.loader import RewardComponent

logger = logging.getLogger(__name__)


class WorkerError(RuntimeError):
    """The reward raised in its worker process; the message is the reward's own error."""


_MAX_START_FAILURES = 3


def _key(ref: str, kwargs: dict[str, Any]) -> tuple[str, str]:
    return ref, json.dumps(kwargs, sort_keys=True, default=repr)


def _worker_main(conn: multiprocessing.connection.Connection, preload: list[tuple[str, dict[str, Any]]]) -> None:
    from slime_rl.rewards.loader import load_reward  # loaded in the worker process

    loaded: dict[tuple[str, str], RewardComponent] = {}
    try:
        for ref, kwargs in preload:
            loaded[_key(ref, kwargs)] = load_reward(ref, kwargs)
    except Exception as e:
        conn.send(("error", f"loading the reward in a worker process failed: {type(e).__name__}: {e}"))
        return
    conn.send(("ready", None))
    while True:
        try:
            ref, kwargs, arg = conn.recv()
        except (EOFError, KeyboardInterrupt):
            return
        try:
            key = _key(ref, kwargs)
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
    def __init__(self, ctx: Any, preload: list[tuple[str, dict[str, Any]]]) -> None:
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(
            target=_worker_main, args=(child, preload), daemon=True, name="slime-rl-reward"
        )
        self.process.start()
        child.close()

    def start_state(self) -> tuple[str, str | None] | None:
        """None while loading; ``("ready", None)``, or ``("error", why)`` once it stopped trying."""
        try:
            if not self.conn.poll():
                return None
            return self.conn.recv()
        except (EOFError, OSError):
            self.process.join(timeout=5)
            return "error", f"the reward worker process exited during start-up (exit code {self.process.exitcode})"

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=5)
        self.conn.close()


class RewardProcessPool:
    """``max_workers`` reward worker processes, started ahead and kept warm.

    ``components``: the blocking rewards each worker loads at start-up (others load on their
    first call there).
    """

    def __init__(self, max_workers: int, components: Sequence[RewardComponent] = ()) -> None:
        if max_workers < 1:
            raise ValueError(f"reward.max_workers={max_workers} must be >= 1")
        methods = multiprocessing.get_all_start_methods()
        self._ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
        if "forkserver" in methods:
            # Takes effect if this process has not started its forkserver yet (the default is
            # ["__main__"]): every worker then forks with slime_rl's imports done.
            self._ctx.set_forkserver_preload(["__main__", __name__])
        self.max_workers = max_workers
        self._preload = [(c.ref, dict(c.load_kwargs or c.kwargs)) for c in components]
        self._starting: list[_Worker] = []
        self._idle: list[_Worker] = []
        self._busy: set[_Worker] = set()
        self._waiters: collections.deque[asyncio.Future] = collections.deque()
        self._poller: asyncio.Task | None = None
        self._start_failures = 0
        self._load_error: str | None = None
        self._closed = False
        self.killed_total = 0
        """Workers killed for a call past its timeout since the pool started."""
        for _ in range(max_workers):
            self._spawn()

    def _spawn(self) -> None:
        if self._closed:
            raise WorkerError("the reward process pool was closed")
        self._starting.append(_Worker(self._ctx, self._preload))

    def _check_starting(self) -> None:
        """Move workers that finished loading to the idle list; raise the load error if any."""
        for worker in list(self._starting):
            state = worker.start_state()
            if state is None:
                continue
            self._starting.remove(worker)
            kind, why = state
            if kind == "ready":
                self._start_failures = 0
                self._idle.append(worker)
                continue
            worker.kill()
            self._start_failures += 1
            if (why or "").startswith("loading the reward") or self._start_failures >= _MAX_START_FAILURES:
                self._load_error = why
        if self._load_error is not None:
            raise WorkerError(self._load_error)

    def _dispatch(self) -> None:
        """Hand idle workers to the oldest waiting calls; start workers while calls wait and
        the pool is short of them; poll the starting ones while anyone waits for them."""
        try:
            self._check_starting()
        except WorkerError as e:
            while self._waiters:
                waiter = self._waiters.popleft()
                if not waiter.done():
                    waiter.set_exception(WorkerError(str(e)))
            return
        while self._idle and self._waiters:
            waiter = self._waiters.popleft()
            if waiter.done():  # its call was cancelled while waiting
                continue
            worker = self._idle.pop()
            self._busy.add(worker)
            waiter.set_result(worker)
        if not self._waiters or self._closed:
            return
        while len(self._busy) + len(self._starting) < self.max_workers:
            self._spawn()  # replaces a worker that died during start-up
        if self._starting and (self._poller is None or self._poller.done()):
            self._poller = asyncio.get_running_loop().create_task(self._poll())

    async def _poll(self) -> None:
        """While calls wait and workers start, check those every 20 ms (one task, not one per call)."""
        while self._waiters and self._starting and not self._closed:
            await asyncio.sleep(0.02)
            self._dispatch()

    async def _acquire(self) -> _Worker:
        self._check_starting()
        if self._idle and not self._waiters:
            worker = self._idle.pop()
            self._busy.add(worker)
            return worker
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        if self._poller is not None and self._poller.get_loop() is not waiter.get_loop():
            self._poller = None  # left behind by an event loop that has ended
        self._dispatch()
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._release(waiter.result(), healthy=True)  # handed over as we were cancelled
            raise

    def _release(self, worker: _Worker, healthy: bool) -> None:
        self._busy.discard(worker)
        if healthy and not self._closed:
            self._idle.append(worker)
        else:
            worker.process.kill()  # SIGKILL now; reaping it (join) happens off the event loop
            threading.Thread(target=worker.kill, name="slime-rl-reward-reaper", daemon=True).start()
            if not self._closed:
                self._spawn()  # the replacement warms up while other calls run
        if not self._closed:
            self._dispatch()

    async def call(self, comp: RewardComponent, arg: Any, timeout_s: float) -> Any:
        """Run ``comp`` on ``arg`` in a ready worker; the timeout starts when the call is sent.

        Raises ``asyncio.TimeoutError`` (the worker is killed and replaced) or
        :class:`WorkerError` with the reward's own error text (or its load error).
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
                try:
                    await asyncio.wait_for(ready.wait(), timeout_s)
                except asyncio.TimeoutError:
                    self.killed_total += 1
                    raise
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
            self._release(worker, healthy)
        if not ok:
            raise WorkerError(value)
        return value

    def close(self) -> None:
        """Kill every worker (running calls included); the pool cannot be used afterwards."""
        self._closed = True
        for worker in [*self._starting, *self._idle, *self._busy]:
            worker.kill()
        self._starting.clear()
        self._idle.clear()
        self._busy.clear()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done() and not waiter.get_loop().is_closed():
                waiter.get_loop().call_soon_threadsafe(_fail, waiter, WorkerError("the reward process pool was closed"))


def _fail(waiter: asyncio.Future, error: BaseException) -> None:
    if not waiter.done():
        waiter.set_exception(error)
