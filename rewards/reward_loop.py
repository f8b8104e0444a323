"""An event loop of its own for async rewards, with a watchdog for rewards that block it.

    caller's loop (rollout manager: generation + scoring)
      └─ await RewardLoop.run(make_coro, label) ──► reward loop thread (daemon)
                                                    task: make_coro(track)  (timeouts inside)
                                                    track(reward coroutine): marks each step
      watchdog thread, every 50 ms:
        a step of one reward call running >= warn_after_s ──► warning naming the reward
        ... running >= timeout_s ──► that call fails (RewardLoopBlocked, naming it); the loop is
                                     abandoned: its other calls fail, new calls get a fresh loop
        no heartbeat for >= timeout_s (code outside any reward call) ──► abandoned likewise

An ``async def`` reward that calls blocking code (``time.sleep``, ``requests``, heavy CPU)
freezes the loop it runs on, and no ``asyncio`` timeout can fire there. Running async rewards
on this loop instead of the caller's keeps generation running whatever a reward does; the
watchdog keeps the reward's own timeout and says which reward blocked.
"""

from __future__ import annotations

import asyncio
import collections.abc
import concurrent.futures
import dataclasses
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Generator
from typing import Any

logger = logging.getLogger(__name__)

_POLL_S = 0.05
_BEAT_S = 0.1


class RewardLoopBlocked(RuntimeError):
    """An async reward blocked the reward event loop past its timeout (or was abandoned with it)."""


@dataclasses.dataclass(eq=False)
class _Call:
    label: str
    future: concurrent.futures.Future
    task: asyncio.Task | None = None
    warned: bool = False


class _Tracked(collections.abc.Coroutine):
    """Wraps a reward's coroutine; marks which call runs while each of its steps executes."""

    def __init__(self, coro: Coroutine, call: _Call, loop: _LoopThread) -> None:
        self._coro, self._call, self._loop = coro, call, loop

    def _step(self, fn: Callable[..., Any], *args: Any) -> Any:
        self._loop.running = (self._call, time.monotonic())
        try:
            return fn(*args)
        finally:
            self._loop.running = None

    def send(self, value: Any) -> Any:
        return self._step(self._coro.send, value)

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        if val is None and tb is None:
            return self._step(self._coro.throw, typ)
        return self._step(self._coro.throw, typ, val, tb)

    def close(self) -> None:
        self._coro.close()

    def __next__(self) -> Any:
        return self.send(None)

    def __await__(self) -> Generator[Any, None, Any]:
        return self  # type: ignore[return-value]


class _LoopThread:
    """One event loop running forever on a daemon thread, with a heartbeat."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.calls: set[_Call] = set()
        self.running: tuple[_Call, float] | None = None
        self.beat = time.monotonic()
        self.abandoned = False
        self.thread = threading.Thread(target=self._main, name=name, daemon=True)
        self.thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._heartbeat)
        try:
            self.loop.run_forever()
        finally:
            try:
                self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            finally:
                self.loop.close()

    def _heartbeat(self) -> None:
        self.beat = time.monotonic()
        self.loop.call_later(_BEAT_S, self._heartbeat)

    async def _stop(self) -> None:
        tasks = [t for t in asyncio.all_tasks(self.loop) if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.loop.stop()

    def stop(self) -> None:
        """Cancel what runs there and stop the loop (once it gets control back)."""
        try:
            self.loop.call_soon_threadsafe(lambda: self.loop.create_task(self._stop()))
        except RuntimeError:  # already closed
            pass


class RewardLoop:
    """Runs async reward calls on an event loop in a daemon thread, watched for blocking.

    ``timeout_s``: a reward call whose single step (code between two awaits) runs this long
    fails with :class:`RewardLoopBlocked`, as does every other call of that loop, which is then
    replaced. ``warn_after_s``: a step this long logs a warning naming the reward.

    >>> import asyncio
    >>> rl = RewardLoop(timeout_s=5)
    >>> async def three(track):
    ...     return await track(asyncio.sleep(0, result=3))
    >>> asyncio.run(rl.run(three, "demo"))
    3
    >>> rl.close()
    """

    def __init__(self, timeout_s: float, warn_after_s: float = 1.0, name: str = "slime-rl-reward-loop") -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s={timeout_s} must be > 0")
        self.timeout_s = float(timeout_s)
        self.warn_after_s = min(float(warn_after_s), self.timeout_s)
        self._name = name
        self._lock = threading.Lock()
        self._current: _LoopThread | None = None
        self._closed = threading.Event()
        self._watchdog: threading.Thread | None = None

    def _loop_thread(self) -> _LoopThread:
        with self._lock:
            if self._closed.is_set():
                raise RuntimeError("the reward event loop was closed")
            if self._current is None:
                self._current = _LoopThread(self._name)
            if self._watchdog is None:
                self._watchdog = threading.Thread(target=self._watch, name=f"{self._name}-watchdog", daemon=True)
                self._watchdog.start()
            return self._current

    def submit(self, make_coro: Callable[[Callable[[Coroutine], Coroutine]], Awaitable[Any]], label: str) -> concurrent.futures.Future:
        """Start ``make_coro(track)`` on the reward loop; ``track(coro)`` wraps the reward's own
        coroutine so the watchdog can name it. Returns a thread-safe future of the result."""
        lt = self._loop_thread()
        call = _Call(label, concurrent.futures.Future())
        with self._lock:  # registered before it starts: an abandoned loop fails it either way
            lt.calls.add(call)

        def track(coro: Coroutine) -> Coroutine:
            return _Tracked(coro, call, lt)

        async def main() -> None:
            try:
                result = await make_coro(track)
            except asyncio.CancelledError:
                _settle(call.future, exc=RewardLoopBlocked(f"{label}: cancelled on the reward event loop"))
                raise
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                _settle(call.future, exc=e)
            else:
                _settle(call.future, result=result)
            finally:
                with self._lock:
                    lt.calls.discard(call)

        def start() -> None:
            if call.future.done():  # failed (abandoned) or cancelled before it started
                with self._lock:
                    lt.calls.discard(call)
                return
            call.task = lt.loop.create_task(main())

        def on_done(fut: concurrent.futures.Future) -> None:
            if fut.cancelled() and call.task is not None and not call.task.done():
                try:
                    lt.loop.call_soon_threadsafe(call.task.cancel)
                except RuntimeError:
                    pass

        call.future.add_done_callback(on_done)
        try:
            lt.loop.call_soon_threadsafe(start)
        except RuntimeError:  # the loop closed in between (abandoned, then returned)
            _settle(call.future, exc=RewardLoopBlocked(f"{label}: the reward event loop had stopped"))
        return call.future

    async def run(self, make_coro: Callable[[Callable[[Coroutine], Coroutine]], Awaitable[Any]], label: str) -> Any:
        """Await :meth:`submit`'s result from the caller's loop (cancelling it cancels the call)."""
        return await asyncio.wrap_future(self.submit(make_coro, label))

    def call_soon(self, coro: Coroutine, timeout_s: float) -> concurrent.futures.Future:
        """Run a plain coroutine there (e.g. a reward's ``aclose()``), untracked."""
        lt = self._loop_thread()
        return asyncio.run_coroutine_threadsafe(asyncio.wait_for(coro, timeout_s), lt.loop)

    @property
    def started(self) -> bool:
        return self._current is not None

    # -- watchdog --------------------------------------------------------------------------

    def _watch(self) -> None:
        while not self._closed.wait(_POLL_S):
            lt = self._current
            if lt is None:
                continue
            now = time.monotonic()
            running = lt.running
            if running is not None:
                call, since = running
                blocked = now - since
                if blocked >= self.warn_after_s and not call.warned:
                    call.warned = True
                    logger.warning(
                        "reward %s has blocked the reward event loop for %.1f s: an async reward must "
                        "not call blocking code (time.sleep, requests, heavy CPU work); await async "
                        "calls instead, or make it a plain `def` so it runs in a worker thread",
                        call.label, blocked,
                    )
                if blocked >= self.timeout_s:
                    self._abandon(lt, call, blocked)
            elif now - lt.beat >= self.timeout_s and lt.calls:
                self._abandon(lt, None, now - lt.beat)

    def _abandon(self, lt: _LoopThread, blocker: _Call | None, blocked_s: float) -> None:
        with self._lock:
            if lt.abandoned:
                return
            lt.abandoned = True
            if self._current is lt:
                self._current = None  # the next call starts a fresh loop
            pending = list(lt.calls)
        who = blocker.label if blocker is not None else "code outside any reward call (a task a reward started?)"
        if blocker is not None:
            _settle(blocker.future, exc=RewardLoopBlocked(
                f"blocked the reward event loop for {blocked_s:.1f} s without awaiting (reward.timeout_s="
                f"{self.timeout_s:g}): an async reward must not call blocking code (time.sleep, requests, "
                "heavy CPU work); await async calls instead, or make it a plain `def` so it runs in a "
                "worker thread"
            ))
        for call in pending:
            _settle(call.future, exc=RewardLoopBlocked(
                f"abandoned: the reward event loop it ran on was blocked by {who} for {blocked_s:.1f} s"
            ))
        logger.error(
            "reward event loop blocked by %s for %.1f s: its %d pending calls failed; new calls run on a "
            "fresh loop", who, blocked_s, len(pending),
        )
        lt.stop()  # takes effect if the blocking call ever returns

    def close(self) -> None:
        """Stop the loop and the watchdog; never waits for a blocked loop."""
        with self._lock:
            self._closed.set()
            lt, self._current = self._current, None
            pending = list(lt.calls) if lt is not None else []
        for call in pending:
            call.future.cancel()
        if lt is not None:
            lt.stop()
            lt.thread.join(timeout=1.0)


def _settle(future: concurrent.futures.Future, *, result: Any = None, exc: BaseException | None = None) -> None:
    """Set a future's outcome unless it already has one (the watchdog may have failed it)."""
    try:
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass
