"""Score groups of samples with one or several weighted reward terms, concurrently and safely.

    rollout manager ── await runner.score(group) ──► for each term × sample (or × group if batched):
                                                      async fn   -> the runner's reward event loop
                                                                    (own thread; wait_for timeout,
                                                                    @queued: from work_started();
                                                                    a watchdog fails a reward that
                                                                    blocks that loop, naming it)
                                                      blocking fn -> daemon thread pool (timeout from
                                                                    start; past it the thread is
                                                                    abandoned and replaced) or warm
                                                                    process pool (executor=process;
                                                                    killed past the timeout)
                       ◄── list[RewardOutcome] ────── normalise, weighted sum, failures -> default
    rollout manager ── runner.end_step() ──► RewardStepStats (metrics; all-failed guard)

A term that raises, times out or returns NaN fails only its own sample: that sample gets
``default_score``, ``status="failed"`` and the error in ``metadata["reward_error"]``, and the
failure is counted by kind (``reward/<term>/timeouts``, ``errors``, ``nonfinite``). A call
that overruns its timeout gives its capacity back at once (a replacement thread, or a fresh
worker process), so one hanging input never starves the samples after it. Nothing a reward does
can stall the caller's event loop (async rewards run on a loop of their own) or keep the
process from exiting (reward threads are daemons, worker processes are killed at close).
``faults`` (:class:`~slime_rl.rewards.faults.RewardFaults`) injects hangs, raises and NaNs.

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
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from slime_rl.buffers.schema import Sample
from slime_rl.rewards.config import RewardConfig, RewardFaultsConfig
from slime_rl.rewards.faults import FaultyReward, RewardFaults
from slime_rl.rewards.loader import RewardComponent, components_from_config
from slime_rl.rewards.outcome import FAILURE_KINDS, FAILURE_POLICIES, RewardOutcome, RewardStepStats
from slime_rl.rewards.process_pool import RewardProcessPool, WorkerError
from slime_rl.rewards.protocol import _WORK_STARTED, normalize_result
from slime_rl.rewards.reward_loop import RewardLoop, RewardLoopBlocked
from slime_rl.rewards.thread_pool import DaemonThreadPool, NoFreeWorker

logger = logging.getLogger(__name__)

_Term = tuple[float, dict[str, float], dict[str, Any]]
EXECUTORS = ("thread", "process")


class _Failure(NamedTuple):
    """A term's failure on one sample: its kind (``outcome.FAILURE_KINDS``) and error text."""

    kind: str
    text: str


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
        max_abandoned: int = 64,
        faults: RewardFaults | None = None,
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
        if max_abandoned < 0:
            raise ValueError(f"reward.max_abandoned={max_abandoned} must be >= 0")
        for comp in components:
            own = getattr(comp.fn, "call_time_limit_s", None)
            if isinstance(own, (int, float)) and timeout_s < own:
                raise ValueError(
                    f"reward.timeout_s={timeout_s:g} is below the {own:g} s that reward "
                    f"'{comp.name}' may take for one unit of work (its own timeout_s), so it would "
                    f"time out calls that are still within their limit; raise reward.timeout_s "
                    f"to at least {own:g} or lower the reward's timeout_s"
                )
        self.faults = faults
        self.components = faults.wrap_all(components) if faults is not None else list(components)
        self.timeout_s = float(timeout_s)
        self.default_score = float(default_score)
        self.max_workers = int(max_workers)
        self.failure_policy = failure_policy
        self.executor = executor
        self.max_abandoned = int(max_abandoned)
        self._pool: DaemonThreadPool | None = None
        self._procs: RewardProcessPool | None = None
        self._killed_mark = 0  # self._procs.killed_total at the last end_step
        self._rloop = RewardLoop(self.timeout_s)
        self._stats = RewardStepStats()
        if executor == "process" and self._blocking():
            # Warm pool: workers load the rewards now, so no call's timeout pays for a start-up.
            self._procs = RewardProcessPool(self.max_workers, self._blocking())

    def _blocking(self) -> list[RewardComponent]:
        return [c for c in self.components if not c.is_async]

    @classmethod
    def from_config(
        cls,
        cfg: RewardConfig,
        base_dir: str | Path | None = None,
        faults: RewardFaultsConfig | RewardFaults | None = None,
    ) -> RewardRunner:
        """Load and check every term of ``cfg`` (raises ``RewardLoadError``) and build a runner;
        ``faults`` (config ``faults.reward``) injects reward faults when any fraction is > 0."""
        if faults is not None and not isinstance(faults, RewardFaults):
            faults = RewardFaults.from_config(faults)
        return cls(
            components_from_config(cfg, base_dir),
            timeout_s=cfg.timeout_s,
            default_score=cfg.default_score,
            max_workers=cfg.max_workers,
            failure_policy=cfg.failure_policy,
            executor=cfg.executor,
            max_abandoned=getattr(cfg, "max_abandoned", 64),
            faults=faults,
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
        self, i: int, per_term: list[list[tuple[_Term | _Failure, float]]], start: float
    ) -> RewardOutcome:
        total = 0.0
        metrics: dict[str, float] = {}
        info: dict[str, Any] = {}
        errors: list[str] = []
        seconds = 0.0
        for comp, results in zip(self.components, per_term):
            result, done_at = results[i]
            seconds = max(seconds, done_at - start)
            ref = getattr(comp.fn, "inner_ref", comp.ref)  # a fault-injecting wrapper names its term's
            if isinstance(result, _Failure):
                errors.append(f"{comp.name}: {result.text}")
                self._stats.record_term(comp.name, ref, result.text, result.kind)
                continue
            self._stats.record_term(comp.name, ref, None)
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
    ) -> list[tuple[_Term | _Failure, float]]:
        """One ``(normalised result or failure, finish time)`` per sample."""
        if comp.is_batched:
            raw, err = await self._call(comp, samples)
            done = time.monotonic()
            if err is None and (not isinstance(raw, Sequence) or len(raw) != len(samples)):
                got = len(raw) if isinstance(raw, Sequence) else type(raw).__name__
                err = _Failure("error", f"batched reward returned {got} results for {len(samples)} samples")
            if err is not None:
                return [(err, done)] * len(samples)
            return [(self._normalise(r), done) for r in raw]

        async def one(sample: Sample) -> tuple[_Term | _Failure, float]:
            raw, err = await self._call(comp, sample)
            return (err if err is not None else self._normalise(raw)), time.monotonic()

        return list(await asyncio.gather(*(one(s) for s in samples)))

    @staticmethod
    def _normalise(raw: Any) -> _Term | _Failure:
        try:
            return normalize_result(raw)
        except TypeError as e:
            return _Failure("error", str(e))
        except ValueError as e:  # NaN or inf
            return _Failure("nonfinite", str(e))

    async def _call(self, comp: RewardComponent, arg: Any) -> tuple[Any, _Failure | None]:
        """Call one term with the timeout; return ``(result, None)`` or ``(None, failure)``."""
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
            return None, _Failure("timeout", f"timed out after {self.timeout_s:g} s (reward.timeout_s)")
        except RewardLoopBlocked as e:  # the blocker timed out; calls abandoned with its loop did not
            return None, _Failure("timeout" if str(e).startswith("blocked") else "error", str(e))
        except NoFreeWorker:
            return None, _Failure("error", (
                f"no free reward worker: all {self.max_workers} (reward.max_workers) threads are "
                f"running calls past reward.timeout_s and {self.max_abandoned} (reward.max_abandoned) "
                "more such calls run in abandoned threads; a thread cannot be stopped: use "
                "reward.executor: process, which kills overdue calls"
            ))
        except asyncio.CancelledError:
            raise
        except WorkerError as e:
            return None, _Failure("error", str(e))
        except Exception as e:
            logger.debug("reward %s raised", comp.name, exc_info=True)
            return None, _Failure("error", f"{type(e).__name__}: {e}")

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
        """Run a blocking term in the thread pool (see ``DaemonThreadPool.call``)."""
        if self._pool is None:
            self._pool = DaemonThreadPool(
                self.max_workers, thread_name_prefix="slime-rl-reward", max_abandoned=self.max_abandoned
            )
        return await self._pool.call(lambda: comp.fn(arg, **comp.kwargs), self.timeout_s, _label(comp, arg))

    # -- per-step accounting -------------------------------------------------------------

    def end_step(self, check: bool = True) -> RewardStepStats:
        """Close the step: return its counts and reset them.

        With ``check`` the all-failed guard runs with ``failure_policy``: a term that failed
        on every sample of the step raises ``AllRewardsFailedError`` (``"raise"``) or logs.
        A caller that merges several workers' stats passes ``check=False`` and calls
        ``RewardStepStats.check`` on the merged stats instead.
        """
        stats, self._stats = self._stats, RewardStepStats()
        stats.abandoned_threads = self._pool.abandoned if self._pool is not None else 0
        if self._procs is not None:
            stats.workers_killed = self._procs.killed_total - self._killed_mark
            self._killed_mark = self._procs.killed_total
        if stats.samples_failed:
            kinds = {k: 0 for k in FAILURE_KINDS}
            for key, n in stats.failed_kinds.items():
                kind = key.rsplit("/", 1)[1]
                kinds[kind] = kinds.get(kind, 0) + n
            logger.warning(
                "rewards failed on %d of %d samples this step (term failures: %d timeouts, %d "
                "errors, %d non-finite; %d reward threads abandoned still running, %d worker "
                "processes killed); first errors: %s",
                stats.samples_failed, stats.samples, kinds["timeout"], kinds["error"],
                kinds["nonfinite"], stats.abandoned_threads, stats.workers_killed, stats.first_error,
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
        for comp in self.components:  # injected hangs end (their abandoned threads with them)
            if isinstance(comp.fn, FaultyReward):
                comp.fn.release()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        if self._procs is not None:
            self._procs.close()
            self._procs = None
            self._killed_mark = 0
        self._rloop.close()
        self._rloop = RewardLoop(self.timeout_s)


def _label(comp: RewardComponent, arg: Any) -> str:
    """How logs and errors name one call: the term and its sample (or group)."""
    if isinstance(arg, Sample):
        return f"'{comp.name}' (sample {arg.sample_id})"
    if isinstance(arg, Sequence) and arg and isinstance(arg[0], Sample):
        return f"'{comp.name}' (group {arg[0].group_id}, {len(arg)} samples)"
    return f"'{comp.name}'"
