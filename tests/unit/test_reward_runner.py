"""RewardRunner: call forms (sync, async, batched), timeouts, failures, weights, the all-failed guard."""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time

import pytest
from slime_rl.buffers.schema import Sample
from slime_rl.rewards import (
    AllRewardsFailedError,
    RewardComponent,
    RewardRunner,
    RewardStepStats,
    batched,
    is_queued,
    queued,
    work_started,
)

pytestmark = pytest.mark.timeout(60)


def _samples(n: int, response: str = "the answer is 42", label: str = "42") -> list[Sample]:
    return [Sample(f"g0-{i}", "g0", [1], [2, 3], response=response, label=label) for i in range(n)]


def _comp(fn, name=None, weight=1.0, **kwargs) -> RewardComponent:
    return RewardComponent(
        name=name or fn.__name__, ref=f"test:{fn.__name__}", fn=fn, kwargs=kwargs, weight=weight,
        is_async=asyncio.iscoroutinefunction(fn), is_batched=getattr(fn, "__slime_rl_batched__", False),
        is_queued=is_queued(fn),
    )


def _run(runner: RewardRunner, samples: list[Sample]):
    async def go():
        try:
            return await runner.score(samples)
        finally:
            await runner.aclose()

    return asyncio.run(go())


def test_sync_reward_runs_in_worker_threads_and_applies_to_samples():
    seen_threads = set()

    def thread_reward(sample):
        seen_threads.add(threading.current_thread().name)
        return {"score": 0.5, "length": len(sample.response), "note": "hi"}

    samples = _samples(3)
    outcomes = _run(RewardRunner([_comp(thread_reward)]), samples)
    assert [o.score for o in outcomes] == [0.5, 0.5, 0.5]
    assert all(name.startswith("slime-rl-reward") for name in seen_threads)
    assert outcomes[0].metrics == {"thread_reward/score": 0.5, "thread_reward/length": 16.0}
    assert samples[0].reward == 0.5 and samples[0].status == "completed"
    assert samples[0].metadata["reward_info"] == {"thread_reward/note": "hi"}


def test_async_rewards_run_concurrently():
    running = 0
    peak = 0

    async def slow_async(sample):
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.05)
        running -= 1
        return 1.0

    outcomes = _run(RewardRunner([_comp(slow_async)]), _samples(8))
    assert [o.score for o in outcomes] == [1.0] * 8
    assert peak == 8


def test_blocking_rewards_do_not_block_the_event_loop():
    def blocking(sample):
        time.sleep(0.3)
        return 1.0

    ticks = 0

    async def go():
        nonlocal ticks
        runner = RewardRunner([_comp(blocking)], max_workers=2)
        task = asyncio.ensure_future(runner.score(_samples(2)))
        while not task.done():
            ticks += 1
            await asyncio.sleep(0.01)
        runner.close()
        return task.result()

    outcomes = asyncio.run(go())
    assert [o.score for o in outcomes] == [1.0, 1.0]
    assert ticks >= 5  # the loop kept running while the rewards slept in threads


def test_batched_reward_called_once_per_group():
    calls = []

    @batched
    def by_rank(samples, bonus=0.0):
        calls.append(len(samples))
        return [i + bonus for i in range(len(samples))]

    comp = _comp(by_rank, bonus=0.5)
    outcomes = _run(RewardRunner([comp]), _samples(4))
    assert calls == [4]
    assert [o.score for o in outcomes] == [0.5, 1.5, 2.5, 3.5]


def test_async_batched_reward_and_wrong_length_fails_whole_group():
    @batched
    async def short(samples):
        return [1.0] * (len(samples) - 1)

    outcomes = _run(RewardRunner([_comp(short)], default_score=-1.0), _samples(3))
    assert all(o.failed and o.score == -1.0 for o in outcomes)
    assert "batched reward returned 2 results for 3 samples" in outcomes[0].error


def test_exceptions_nan_and_bad_types_fail_only_their_sample():
    def picky(sample):
        if sample.sample_id == "g0-0":
            raise KeyError("missing field")
        if sample.sample_id == "g0-1":
            return math.nan
        if sample.sample_id == "g0-2":
            return "high"
        return 1.0

    samples = _samples(4)
    outcomes = _run(RewardRunner([_comp(picky)], default_score=-0.5), samples)
    assert [o.failed for o in outcomes] == [True, True, True, False]
    assert [o.score for o in outcomes] == [-0.5, -0.5, -0.5, 1.0]
    assert outcomes[0].error == "picky: KeyError: 'missing field'"
    assert "non-finite score (nan)" in outcomes[1].error
    assert "returned str 'high'" in outcomes[2].error
    assert samples[0].status == "failed" and samples[0].reward == -0.5
    assert samples[0].metadata["reward_error"] == "picky: KeyError: 'missing field'"
    assert samples[3].status == "completed" and "reward_error" not in samples[3].metadata


def test_async_and_sync_timeouts_mark_failed():
    async def hangs(sample):
        await asyncio.sleep(30)

    def sleeps(sample):
        time.sleep(1.0)
        return 1.0

    runner = RewardRunner([_comp(hangs), _comp(sleeps)], timeout_s=0.2, default_score=0.0)
    outcomes = _run(runner, _samples(2))
    assert all(o.failed for o in outcomes)
    assert "hangs: timed out after 0.2 s (reward.timeout_s)" in outcomes[0].error
    assert "sleeps: timed out after 0.2 s" in outcomes[0].error


def test_sync_timeout_starts_when_a_worker_picks_the_call_up():
    def quick(sample):
        time.sleep(0.15)
        return 1.0

    # 6 calls x 0.15 s on one worker take ~0.9 s in all, longer than the 0.5 s timeout:
    # queueing must not count against a call.
    outcomes = _run(RewardRunner([_comp(quick)], timeout_s=0.5, max_workers=1), _samples(6))
    assert [o.failed for o in outcomes] == [False] * 6


def test_weighted_combination_and_metrics():
    def correct(sample):
        return 1.0

    async def fmt(sample):
        return {"score": 0.5, "ok": True}

    runner = RewardRunner([_comp(correct, weight=2.0), _comp(fmt, weight=-0.4)])
    outcomes = _run(runner, _samples(2))
    assert outcomes[0].score == pytest.approx(2.0 * 1.0 - 0.4 * 0.5)
    assert outcomes[0].metrics == {"correct/score": 1.0, "fmt/score": 0.5, "fmt/ok": 1.0}
    m = runner.end_step().metrics()
    assert m["reward/score_mean"] == pytest.approx(1.8)
    assert m["reward/fmt/score_mean"] == 0.5 and m["reward/fmt/ok_mean"] == 1.0


def test_one_failing_term_fails_the_sample_but_keeps_other_metrics():
    def good(sample):
        return 1.0

    def bad(sample):
        raise RuntimeError("boom")

    outcomes = _run(RewardRunner([_comp(good), _comp(bad)], default_score=0.25), _samples(1))
    assert outcomes[0].failed and outcomes[0].score == 0.25
    assert outcomes[0].error == "bad: RuntimeError: boom"
    assert outcomes[0].metrics == {"good/score": 1.0}


def test_all_failed_guard_raises_naming_the_reward():
    def always_broken(sample):
        raise ValueError("cannot parse label")

    def sometimes(sample):
        if sample.sample_id.endswith("0"):
            raise ValueError("flaky")
        return 1.0

    runner = RewardRunner([_comp(always_broken), _comp(sometimes)])
    _run(runner, _samples(3))
    with pytest.raises(AllRewardsFailedError) as e:
        runner.end_step()
    msg = str(e.value)
    assert "reward 'always_broken' (test:always_broken) failed on all 3 samples of this step" in msg
    assert "ValueError: cannot parse label" in msg
    assert "sometimes" not in msg and "failure_policy=warn" in msg
    # The step's counts were reset: the next step starts clean.
    assert runner.end_step().samples == 0


def test_all_failed_guard_warn_policy_and_metrics(caplog):
    def broken(sample):
        raise ValueError("nope")

    runner = RewardRunner([_comp(broken)], failure_policy="warn")
    _run(runner, _samples(2))
    with caplog.at_level(logging.WARNING):
        stats = runner.end_step()
    assert "reward 'broken' (test:broken) failed on all 2 samples" in caplog.text
    m = stats.metrics()
    assert m["reward/failed"] == 2.0 and m["reward/failed_frac"] == 1.0
    assert m["reward/broken/failed"] == 2.0 and m["reward/samples"] == 2.0


def test_step_stats_merge_across_workers_then_check():
    def ok_on_a(sample):
        if sample.group_id == "b":
            raise ValueError("b fails")
        return 1.0

    runner = RewardRunner([_comp(ok_on_a)])
    a = [Sample("a-0", "a", [1], [2], response="x")]
    b = [Sample("b-0", "b", [1], [2], response="x")]
    _run(runner, a)
    stats_a = runner.end_step(check=False)
    _run(runner, b)
    stats_b = runner.end_step(check=False)
    with pytest.raises(AllRewardsFailedError):
        stats_b.check("raise")
    merged = RewardStepStats().merge(stats_a).merge(stats_b)
    merged.check("raise")  # one worker's successes clear the guard for the whole step
    assert merged.metrics()["reward/failed"] == 1.0 and merged.metrics()["reward/score_mean"] == 0.5


def test_runner_rejects_bad_settings():
    def f(sample):
        return 1.0

    with pytest.raises(ValueError, match="share a name"):
        RewardRunner([_comp(f), _comp(f)])
    with pytest.raises(ValueError, match=r"reward.failure_policy='stop'; allowed: \('raise', 'warn'\)"):
        RewardRunner([_comp(f)], failure_policy="stop")


def test_waiting_calls_fail_fast_when_every_worker_is_stuck_and_none_may_be_abandoned():
    release = threading.Event()

    def stuck_first(sample):
        if sample.sample_id == "g0-0":
            release.wait(5)
        return 1.0

    try:
        runner = RewardRunner([_comp(stuck_first)], timeout_s=0.3, max_workers=1, max_abandoned=0)
        outcomes = _run(runner, _samples(3))
    finally:
        release.set()
    assert [o.failed for o in outcomes] == [True, True, True]
    assert "timed out after 0.3 s" in outcomes[0].error
    assert "no free reward worker: all 1 (reward.max_workers) threads are running calls past" in outcomes[1].error
    # By default the stuck thread is abandoned and replaced: the other samples score.
    release.clear()
    try:
        outcomes = _run(RewardRunner([_comp(stuck_first)], timeout_s=0.3, max_workers=1), _samples(3))
    finally:
        release.set()
    assert [o.failed for o in outcomes] == [True, False, False]


def test_queued_async_reward_timeout_starts_when_it_gets_its_slot():
    slot = asyncio.Semaphore(1)

    @queued
    async def one_at_a_time(sample):
        async with slot:
            work_started()
            await asyncio.sleep(0.15)
        return 1.0

    async def hangs_after_start(sample):
        work_started()  # harmless outside a @queued reward
        await asyncio.sleep(5)

    # 6 calls x 0.15 s through one slot take ~0.9 s, longer than the 0.5 s timeout.
    outcomes = _run(RewardRunner([_comp(one_at_a_time)], timeout_s=0.5), _samples(6))
    assert [o.error for o in outcomes] == [None] * 6
    outcomes = _run(RewardRunner([_comp(hangs_after_start)], timeout_s=0.2), _samples(1))
    assert "timed out after 0.2 s" in outcomes[0].error
