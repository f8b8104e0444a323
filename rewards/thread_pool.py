"""A thread pool of daemon threads for blocking rewards: a call that never returns neither keeps
the process from exiting nor takes the pool's capacity away from later calls.

    RewardRunner._call_blocking ── await pool.call(fn, timeout_s, label)
      └─ queue ──► up to max_workers worker threads (daemons, started on demand) ──► future
    a call past reward.timeout_s ── pool.abandon(future):
      └─ its thread stops counting as a worker (up to max_abandoned such threads) and a
         replacement starts at once; when the overdue call returns at last, that thread
         rejoins the pool (if it is short of workers) or exits
      └─ past max_abandoned: the thread stays a worker, "stuck"; when every worker is stuck,
         waiting calls fail at once (pool.starved) instead of queueing forever

A thread cannot be killed, so an overdue call keeps running; abandoning it keeps the next
samples from queueing behind it (one hanging input used to take all `max_workers` threads and
fail every later sample). ``max_abandoned`` bounds the threads (and whatever they hold) a
reward that hangs often can leak; ``reward.executor: process`` kills overdue calls instead.

``concurrent.futures.ThreadPoolExecutor`` joins its threads when the interpreter exits, even
after ``shutdown(wait=False)``: one reward stuck in an endless call would hang the run at
exit. Daemon threads are never joined; whatever they still run dies with the process.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

_BOUND_LOG_EVERY_S = 60.0


class NoFreeWorker(Exception):
    """Every worker thread is stuck in an overdue call and ``max_abandoned`` is reached."""

_Item = tuple[concurrent.futures.Future, Callable[..., Any], tuple, dict] | None


class DaemonThreadPool(concurrent.futures.Executor):
    """At most ``max_workers`` worker threads (daemons) plus at most ``max_abandoned`` threads
    still running calls given up on (:meth:`abandon`); a drop-in ``Executor``.

    >>> pool = DaemonThreadPool(2)
    >>> pool.submit(sum, [1, 2]).result()
    3
    >>> pool.shutdown()
    """

    _ids = itertools.count()

    def __init__(
        self, max_workers: int, thread_name_prefix: str = "slime-rl-reward", max_abandoned: int = 64
    ) -> None:
        if max_workers < 1:
            raise ValueError(f"max_workers={max_workers} must be >= 1")
        if max_abandoned < 0:
            raise ValueError(f"max_abandoned={max_abandoned} must be >= 0")
        self.max_workers = max_workers
        self.max_abandoned = max_abandoned
        self._prefix = thread_name_prefix
        self._queue: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._workers: set[threading.Thread] = set()  # count against max_workers
        self._abandoned: set[threading.Thread] = set()  # running a call given up on
        self._stuck: set[threading.Thread] = set()  # workers in an overdue call, not abandoned
        self._running: dict[concurrent.futures.Future, threading.Thread] = {}
        self._waiting = 0  # worker threads blocked on the queue
        self._queued = 0  # items put and not yet taken
        self._shutdown = False
        self.abandoned_total = 0
        """Calls abandoned since the pool started (each got a replacement thread)."""
        self._bound_logged_at = -_BOUND_LOG_EVERY_S

    # -- state, for the runner and its metrics ----------------------------------------------

    @property
    def abandoned(self) -> int:
        """Threads now running a call that was abandoned."""
        return len(self._abandoned)

    @property
    def starved(self) -> bool:
        """Every worker is stuck in an overdue call and no more may be abandoned."""
        return len(self._stuck) >= self.max_workers

    # -- Executor ---------------------------------------------------------------------------

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        """Queue ``fn(*args, **kwargs)``; raises ``RuntimeError`` after :meth:`shutdown`."""
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot submit to a reward thread pool that was shut down")
            future: concurrent.futures.Future = concurrent.futures.Future()
            self._queue.put((future, fn, args, kwargs))
            self._queued += 1
            self._grow()
        return future

    def _grow(self) -> None:
        """Start worker threads while calls wait and there is room (lock held)."""
        while self._queued > self._waiting and len(self._workers) < self.max_workers:
            thread = threading.Thread(
                target=self._work, name=f"{self._prefix}_{next(self._ids)}", daemon=True
            )
            self._workers.add(thread)
            self._waiting += 1  # it is about to wait on the queue
            thread.start()

    def abandon(self, future: concurrent.futures.Future) -> bool:
        """Give up on the running call of ``future`` (it overran its timeout): its thread stops
        counting as a worker and a replacement starts if calls wait. Returns False when
        ``max_abandoned`` threads are abandoned already (the thread then stays, stuck) or
        when the call is not running (finished, or never started)."""
        with self._lock:
            thread = self._running.get(future)
            if thread is None or thread not in self._workers:
                return False
            if len(self._abandoned) >= self.max_abandoned:
                self._stuck.add(thread)
                return False
            self._workers.discard(thread)
            self._abandoned.add(thread)
            self.abandoned_total += 1
            if not self._shutdown:
                self._grow()
            return True

    async def call(self, fn: Callable[[], Any], timeout_s: float, label: str) -> Any:
        """Await ``fn()`` run on a worker thread; the timeout starts when a thread picks it up.

        Raises ``asyncio.TimeoutError`` past ``timeout_s`` (the call is abandoned: see
        :meth:`abandon`) or :class:`NoFreeWorker` at once while the pool is :attr:`starved`.
        ``label`` names the call in log lines.
        """
        loop = asyncio.get_running_loop()
        started = asyncio.Event()

        def work() -> Any:
            try:
                loop.call_soon_threadsafe(started.set)
            except RuntimeError:  # loop already closed: nobody waits for this result
                return None
            return fn()

        cfut = self.submit(work)
        fut = asyncio.wrap_future(cfut)
        while not started.is_set():
            if self.starved and cfut.cancel():
                raise NoFreeWorker()
            try:
                await asyncio.wait_for(started.wait(), 0.1)
            except asyncio.TimeoutError:
                pass
        try:
            return await asyncio.wait_for(fut, timeout_s)
        except asyncio.TimeoutError:
            if not cfut.done():
                self._give_up(cfut, timeout_s, label)
            raise

    def _give_up(self, cfut: concurrent.futures.Future, timeout_s: float, label: str) -> None:
        """Abandon an overdue call and say so (the 1st, 2nd, 4th, 8th... time; when
        ``max_abandoned`` is reached, at most once a minute)."""
        if self.abandon(cfut):
            n = self.abandoned_total
            if n & (n - 1) == 0:
                logger.warning(
                    "reward %s is still running %g s after it started (reward.timeout_s); its "
                    "sample failed and its thread is abandoned (%d abandoned so far, %d still "
                    "running, reward.max_abandoned=%d): a replacement thread serves the next "
                    "samples. A thread cannot be stopped: use reward.executor: process to kill "
                    "overdue calls", label, timeout_s, n, self.abandoned, self.max_abandoned,
                )
        elif not cfut.done() and time.monotonic() - self._bound_logged_at >= _BOUND_LOG_EVERY_S:
            self._bound_logged_at = time.monotonic()
            logger.error(
                "reward %s overran reward.timeout_s=%g s while reward.max_abandoned=%d abandoned "
                "threads still run earlier overdue calls: it keeps its worker thread, so fewer "
                "than reward.max_workers=%d threads serve new samples (none left: they fail at "
                "once). Fix the reward, or use reward.executor: process to kill overdue calls",
                label, timeout_s, self.max_abandoned, self.max_workers,
            )

    def _work(self) -> None:
        me = threading.current_thread()
        while True:
            item = self._queue.get()
            with self._lock:
                self._waiting -= 1
                self._queued -= 1
            if item is None:
                return
            future, fn, args, kwargs = item
            if future.set_running_or_notify_cancel():
                with self._lock:
                    self._running[future] = me
                try:
                    result = fn(*args, **kwargs)
                except BaseException as e:  # noqa: BLE001 - handed to the caller
                    future.set_exception(e)
                else:
                    future.set_result(result)
            del item, fn, args, kwargs
            with self._lock:
                self._running.pop(future, None)
                del future
                self._stuck.discard(me)
                if me in self._abandoned:
                    self._abandoned.discard(me)
                    if self._stuck and not self._shutdown:  # its abandon slot goes to a stuck worker
                        stuck = self._stuck.pop()
                        self._workers.discard(stuck)
                        self._abandoned.add(stuck)
                        self.abandoned_total += 1
                    if self._shutdown or len(self._workers) >= self.max_workers:
                        return
                    self._workers.add(me)  # rejoin: the pool is short of workers
                self._waiting += 1

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop taking work; with ``cancel_futures`` drop queued calls; with ``wait`` join the
        worker threads (never abandoned ones; no thread is waited for at interpreter exit)."""
        with self._lock:
            self._shutdown = True
            if cancel_futures:
                while True:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    self._queued -= 1
                    if item is not None:
                        item[0].cancel()
            threads = list(self._workers)
            for _ in threads:
                self._queue.put(None)
                self._queued += 1
        if wait:
            for thread in threads:
                if thread is not threading.current_thread():
                    thread.join()
