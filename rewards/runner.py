"""Score groups of samples with one or several weighted reward terms, concurrently and safely.

    rollout manager ── await runner.score(group) ──► for each term × sample (or × group if batched):
                                                      async fn   -> the runner's reward event loop
                                                                    (own thread; wait_for timeout,
                                                                    @queued: from work_started();
                                                                    a watchdog fails a reward that
                                                                    blocks that loop, naming it)
                                                      blocking fn -> daemon thread pool (timeout from
                                                                    start) or warm process pool
                                                                    (executor=process; killed past
                                                                    the timeout)
                       ◄── list[RewardOutcome] ────── normalise, weighted sum, failures -> default
    rollout manager ── runner.end_step() ──► RewardStepStats (metrics; all-failed guard)

A term that raises, times out or returns NaN fails only its own sample: that sample gets
``default_score``, ``status="failed"`` and the error in ``metadata["reward_error"]``. Nothing a
reward does can stall the caller's event loop (async rewards run on a loop of their own) or keep
the process from exiting (reward threads are daemons, worker processes are killed at close).

>>> import asyncio
>>> from slime_rl.buffers.schema import Sample
>>> from slime_rl.rewards.loader import load_reward
>>> runner = RewardRunner([load_reward("math_answer")])
>>> s = Sample("g0-0", "g0", [1], [2], response="so the answer is 42", label="42")
>>> asyncio.run(runner.score([s]))[0].score
1.0
>>> runner.end_step().metrics()["reward/failed"]
0.0
>>> runner.close()
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from slime_rl.buffers.schema import Sample
from slime_rl.rewards.config import RewardConfig
from slime_rl.rewards.loader import RewardComponent, components_from_config
from slime_rl.rewards.outcome import FAILURE_POLICIES, RewardOutcome, RewardStepStats
from slime_rl.rewards.process_pool import RewardProcessPool, WorkerError
from slime_rl.rewards.protocol import _WORK_STARTED, normalize_result
from slime_rl.rewards.reward_loop import RewardLoop, RewardLoopBlocked
from slime_rl.rewards.thread_pool import DaemonThreadPool

logger = logging.getLogger(__name__)

_Term = tuple[float, dict[str, float], dict[str, Any]]
EXECUTORS = ("thread", "process")


class _NoFreeWorker(Exception):
    pass


class RewardRunner:
    """Runs reward terms on samples; the async API the rollout manager calls once per group."""

    def __init__(
        self,
        components: Sequence[RewardComponent],
        *,
        timeout_s: float = 30.0,
        default_score: float = 0.0,
        max_workers: int = 4,
        failure_policy: str = "raise",
        executor: str = "thread",
    ) -> None:
        if not components:
            raise ValueError("RewardRunner needs at least one reward component")
        names = [c.name for c in components]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"reward terms {dupes} share a name; give each a distinct `name` in reward.combine")
        if failure_policy not in FAILURE_POLICIES:
            raise ValueError(f"reward.failure_policy={failure_policy!r}; allowed: {FAILURE_POLICIES}")
        if timeout_s <= 0:
            raise ValueError(f"reward.timeout_s={timeout_s} must be > 0")
        if executor not in EXECUTORS:
            raise ValueError(f"reward.executor={executor!r}; allowed: {EXECUTORS}")
        for comp in components:
            own = getattr(comp.fn, "call_time_limit_s", None)
            if isinstance(own, (int, float)) and timeout_s < own:
                raise ValueError(
                    f"reward.timeout_s={timeout_s:g} is below the {own:g} s that reward "
                    f"'{comp.name}' may take for one unit of work (its own timeout_s), so it would "
                    f"time out calls that are still within their limit; raise reward.timeout_s "
                    f"to at least {own:g} or lower the reward's timeout_s"
                )
        self.components = list(components)
        self.timeout_s = float(timeout_s)
        self.default_score = float(default_score)
        self.max_workers = int(max_workers)
        self.failure_policy = failure_policy
        self.executor = executor
        self._pool: DaemonThreadPool | None = None
        self._procs: RewardProcessPool | None = None
        self._rloop = RewardLoop(self.timeout_s)
        self._stats = RewardStepStats()
        self._lock = threading.Lock()
        self._overdue = 0  # pool threads still running a call that timed out
        if executor == "process" and self._blocking():
            # Warm pool: workers load the rewards now, so no call's timeout pays for a start-up.
            self._procs = RewardProcessPool(self.max_workers, self._blocking())

    def _blocking(self) -> list[RewardComponent]:
        return [c for c in self.components if not c.is_async]

    @classmethod
    def from_config(cls, cfg: RewardConfig, base_dir: str | Path | None = None) -> RewardRunner:
        """Load and check every term of ``cfg`` (raises ``RewardLoadError``) and build a runner."""
        return cls(
            components_from_config(cfg, base_dir),
            timeout_s=cfg.timeout_s,
            default_score=cfg.default_score,
            max_workers=cfg.max_workers,
            failure_policy=cfg.failure_policy,
            executor=cfg.executor,
        )

    # -- scoring -------------------------------------------------------------------------

    async def score(self, samples: Sequence[Sample], *, apply: bool = True) -> list[RewardOutcome]:
        """Score ``samples`` (typically one group); with ``apply`` also write onto each sample."""
        samples = list(samples)
        if not samples:
            return []
        starts = time.monotonic()
        per_term = await asyncio.gather(*(self._run_term(c, samples) for c in self.components))
        outcomes = []
        for i, sample in enumerate(samples):
            outcome = self._combine(i, per_term, starts)
            outcomes.append(outcome)
            self._stats.record_sample(outcome)
            if apply:
                outcome.apply_to(sample)
        return outcomes

    def _combine(
        self, i: int, per_term: list[list[tuple[_Term | str, float]]], start: float
    ) -> RewardOutcome:
        total = 0.0
        metrics: dict[str, float] = {}
        info: dict[str, Any] = {}
        errors: list[str] = []
        seconds = 0.0
        for comp, results in zip(self.components, per_term):
            result, done_at = results[i]
            seconds = max(seconds, done_at - start)
            if isinstance(result, str):
                errors.append(f"{comp.name}: {result}")
                self._stats.record_term(comp.name, comp.ref, result)
                continue
            self._stats.record_term(comp.name, comp.ref, None)
            score, extra, extra_info = result
            total += comp.weight * score
            metrics[f"{comp.name}/score"] = score
            metrics.update({f"{comp.name}/{k}": v for k, v in extra.items()})
            info.update({f"{comp.name}/{k}": v for k, v in extra_info.items()})
        if errors:
            return RewardOutcome(self.default_score, metrics, True, "; ".join(errors), seconds, info)
        return RewardOutcome(total, metrics, False, None, seconds, info)

    async def _run_term(
        self, comp: RewardComponent, samples: list[Sample]
    ) -> list[tuple[_Term | str, float]]:
        """One ``(normalised result or error text, finish time)`` per sample."""
        if comp.is_batched:
            raw, err = await self._call(comp, samples)
            done = time.monotonic()
            if err is None and (not isinstance(raw, Sequence) or len(raw) != len(samples)):
                got = len(raw) if isinstance(raw, Sequence) else type(raw).__name__
                err = f"batched reward returned {got} results for {len(samples)} samples"
            if err is not None:
                return [(err, done)] * len(samples)
            return [(self._normalise(r), done) for r in raw]

        async def one(sample: Sample) -> tuple[_Term | str, float]:
            raw, err = await self._call(comp, sample)
            return (err if err is not None else self._normalise(raw)), time.monotonic()

        return list(await asyncio.gather(*(one(s) for s in samples)))

    @staticmethod
    def _normalise(raw: Any) -> _Term | str:
        try:
            return normalize_result(raw)
        except (TypeError, ValueError) as e:
            return str(e)

    async def _call(self, comp: RewardComponent, arg: Any) -> tuple[Any, str | None]:
        """Call one term with the timeout; return ``(result, None)`` or ``(None, error text)``."""
        try:
            if comp.is_async:
                result = await self._call_async(comp, arg)
            elif self.executor == "process":
                if self._procs is None:
                    self._procs = RewardProcessPool(self.max_workers, self._blocking())
                result = await self._procs.call(comp, arg, self.timeout_s)
            else:
                result = await self._call_blocking(comp, arg)
            if inspect.iscoroutine(result):  # a plain callable that returned a coroutine
                coro = result
                result = await self._rloop.run(
                    lambda track: asyncio.wait_for(track(coro), self.timeout_s), _label(comp, arg)
                )
            elif inspect.isawaitable(result):
                result = await asyncio.wait_for(result, self.timeout_s)
            return result, None
        except asyncio.TimeoutError:
            return None, f"timed out after {self.timeout_s:g} s (reward.timeout_s)"
        except RewardLoopBlocked as e:
            return None, str(e)
        except _NoFreeWorker:
            return None, (
                f"no free reward worker: all {self.max_workers} (reward.max_workers) are still "
                "running calls that overran reward.timeout_s"
            )
        except asyncio.CancelledError:
            raise
        except WorkerError as e:
            return None, str(e)
        except Exception as e:
            logger.debug("reward %s raised", comp.name, exc_info=True)
            return None, f"{type(e).__name__}: {e}"

    async def _call_async(self, comp: RewardComponent, arg: Any) -> Any:
        """Run an async term on the reward event loop (never the caller's): a reward that blocks
        there cannot stall generation, and the loop's watchdog fails it past ``timeout_s``.
        For a ``@queued`` term the timeout starts at ``work_started()``."""
        timeout_s = self.timeout_s

        async def on_reward_loop(track: Any) -> Any:
            coro = track(comp.fn(arg, **comp.kwargs))
            if not comp.is_queued:
                return await asyncio.wait_for(coro, timeout_s)
            started = asyncio.Event()

            async def run() -> Any:
                _WORK_STARTED.set(started.set)  # a task has its own context copy
                return await coro

            task = asyncio.ensure_future(run())
            signal = asyncio.ensure_future(started.wait())
            try:
                await asyncio.wait({task, signal}, return_when=asyncio.FIRST_COMPLETED)
                return await asyncio.wait_for(task, timeout_s)
            finally:
                signal.cancel()
                if not task.done():
                    task.cancel()

        return await self._rloop.run(on_reward_loop, _label(comp, arg))

    async def _call_blocking(self, comp: RewardComponent, arg: Any) -> Any:
        """Run a blocking term in the pool; its timeout starts when a worker picks it up.

        A thread cannot be killed: a call that overruns its timeout keeps its worker until it
        returns. Waiting calls fail at once when every worker is held by such a call.
        """
        if self._pool is None:
            self._pool = DaemonThreadPool(self.max_workers, thread_name_prefix="slime-rl-reward")
        loop = asyncio.get_running_loop()
        started = asyncio.Event()
        state = {"done": False, "overdue": False}

        def work() -> Any:
            try:
                loop.call_soon_threadsafe(started.set)
            except RuntimeError:  # loop already closed: nobody waits for this result
                return None
            try:
                return comp.fn(arg, **comp.kwargs)
            finally:
                with self._lock:
                    state["done"] = True
                    if state["overdue"]:
                        self._overdue -= 1

        fut = loop.run_in_executor(self._pool, work)
        while not started.is_set():
            if self._overdue >= self.max_workers:
                fut.cancel()
                raise _NoFreeWorker()
            try:
                await asyncio.wait_for(started.wait(), 0.1)
            except asyncio.TimeoutError:
                pass
        try:
            return await asyncio.wait_for(fut, self.timeout_s)
        except asyncio.TimeoutError:
            with self._lock:
                if not state["done"]:
                    state["overdue"] = True
                    self._overdue += 1
            raise

    # -- per-step accounting -------------------------------------------------------------

    def end_step(self, check: bool = True) -> RewardStepStats:
        """Close the step: return its counts and reset them.

        With ``check`` the all-failed guard runs with ``failure_policy``: a term that failed
        on every sample of the step raises ``AllRewardsFailedError`` (``"raise"``) or logs.
        A caller that merges several workers' stats passes ``check=False`` and calls
        ``RewardStepStats.check`` on the merged stats instead.
        """
        stats, self._stats = self._stats, RewardStepStats()
        if stats.samples_failed:
            logger.warning(
                "rewards failed on %d of %d samples this step; first errors: %s",
                stats.samples_failed, stats.samples, stats.first_error,
            )
        if check:
            stats.check(self.failure_policy)
        return stats

    # -- shutdown ------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close stateful terms (``aclose`` on the reward event loop, where their sessions live,
        or ``close``), then the pools and the loop. Never hangs: a closer gets ``timeout_s``."""
        for comp in self.components:
            if inspect.isfunction(comp.fn):
                continue
            closer = getattr(comp.fn, "aclose", None)
            if closer is not None:
                try:
                    if self._rloop.started:
                        await asyncio.wrap_future(self._rloop.call_soon(closer(), self.timeout_s))
                    else:
                        await asyncio.wait_for(closer(), self.timeout_s)
                except Exception as e:  # shutting down: report and go on closing the rest
                    logger.warning("closing reward %s failed: %s: %s", comp.name, type(e).__name__, e)
                continue
            closer = getattr(comp.fn, "close", None)
            if closer is not None:
                closer()
        self.close()

    def close(self) -> None:
        """Shut the thread pool down without waiting for calls that overran their timeout, kill
        the reward worker processes and stop the reward event loop. The runner can be used
        again afterwards (pools and loop start anew)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        if self._procs is not None:
            self._procs.close()
            self._procs = None
        self._rloop.close()
        self._rloop = RewardLoop(self.timeout_s)


def _label(comp: RewardComponent, arg: Any) -> str:
    """How logs and errors name one call: the term and its sample (or group)."""
    if isinstance(arg, Sample):
        return f"'{comp.name}' (sample {arg.sample_id})"
    if isinstance(arg, Sequence) and arg and isinstance(arg[0], Sample):
        return f"'{comp.name}' (group {arg[0].group_id}, {len(arg)} samples)"
    return f"'{comp.name}'"
