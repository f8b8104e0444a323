"""A thread pool of daemon threads for blocking rewards: a call that never returns cannot keep
the process from exiting.

    RewardRunner._call_blocking ── loop.run_in_executor(pool, work)
      └─ queue ──► up to max_workers daemon threads (started on demand) ──► future

``concurrent.futures.ThreadPoolExecutor`` joins its threads when the interpreter exits, even
after ``shutdown(wait=False)``: one reward stuck in an endless call would hang the run at
exit. Daemon threads are never joined; whatever they still run dies with the process.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import queue
import threading
from collections.abc import Callable
from typing import Any

_Item = tuple[concurrent.futures.Future, Callable[..., Any], tuple, dict] | None


class DaemonThreadPool(concurrent.futures.Executor):
    """At most ``max_workers`` daemon threads; a drop-in ``Executor`` for ``run_in_executor``.

    >>> pool = DaemonThreadPool(2)
    >>> pool.submit(sum, [1, 2]).result()
    3
    >>> pool.shutdown()
    """

    _ids = itertools.count()

    def __init__(self, max_workers: int, thread_name_prefix: str = "slime-rl-reward") -> None:
        if max_workers < 1:
            raise ValueError(f"max_workers={max_workers} must be >= 1")
        self.max_workers = max_workers
        self._prefix = thread_name_prefix
        self._queue: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._idle = threading.Semaphore(0)
        self._lock = threading.Lock()
        self._shutdown = False

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        """Queue ``fn(*args, **kwargs)``; raises ``RuntimeError`` after :meth:`shutdown`."""
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot submit to a reward thread pool that was shut down")
            future: concurrent.futures.Future = concurrent.futures.Future()
            self._queue.put((future, fn, args, kwargs))
            if not self._idle.acquire(timeout=0) and len(self._threads) < self.max_workers:
                thread = threading.Thread(
                    target=self._work, name=f"{self._prefix}_{next(self._ids)}", daemon=True
                )
                thread.start()
                self._threads.append(thread)
        return future

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            future, fn, args, kwargs = item
            if future.set_running_or_notify_cancel():
                try:
                    result = fn(*args, **kwargs)
                except BaseException as e:  # noqa: BLE001 - handed to the caller
                    future.set_exception(e)
                else:
                    future.set_result(result)
            del item, future, fn, args, kwargs
            self._idle.release()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop taking work; with ``cancel_futures`` drop queued calls; with ``wait`` join the
        threads (a thread stuck in a call is never waited for at interpreter exit either way)."""
        with self._lock:
            self._shutdown = True
            if cancel_futures:
                while True:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is not None:
                        item[0].cancel()
            for _ in self._threads:
                self._queue.put(None)
            threads = list(self._threads)
        if wait:
            for thread in threads:
                thread.join()
