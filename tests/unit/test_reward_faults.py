"""Rewards that hang or fail on some samples never stop a run: a call past its timeout gives its
capacity back (its thread abandoned and replaced, or its worker process killed), every group
still scores in arrival order, and injected faults (``faults.reward``) are counted per term."""

from __future__ import annotations

import asyncio
import logging
import textwrap
import threading
import time

import pytest
from slime_rl.buffers.schema import Sample
from slime_rl.rewards import (
    AllRewardsFailedError,
    RewardComponent,
    RewardComponentConfig,
    RewardConfig,
    RewardFaults,
    RewardFaultsConfig,
    RewardRunner,
    batched,
    load_reward,
)

pytestmark = pytest.mark.timeout(90)

TIMEOUT_S = 0.5


def _group(g: int, n: int = 8, label: str = "42") -> list[Sample]:
    return [Sample(f"g{g}-{i}", f"g{g}", [1], [2], response="the answer is 42", label=label) for i in range(n)]


def _comp(fn) -> RewardComponent:
    return RewardComponent(name=fn.__name__, ref=f"test:{fn.__name__}", fn=fn, kwargs={},
                           is_async=asyncio.iscoroutinefunction(fn))


async def _score_groups(runner: RewardRunner, groups: list[int]) -> tuple[list, list[float]]:
    """Score groups concurrently, as the rollout manager does; each group's finish time."""
    t0 = time.monotonic()

    async def one(g: int):
        out = await runner.score(_group(g))
        return out, time.monotonic() - t0

    results = await asyncio.gather(*(one(g) for g in groups))
    return [r[0] for r in results], [r[1] for r in results]


async def _score_flat(runner: RewardRunner, groups: list[int], check: bool = True) -> tuple[list, dict[str, float]]:
    """Every sample's outcome, in group order, and the step's metrics."""
    outcomes, _ = await _score_groups(runner, groups)
    return [o for group in outcomes for o in group], runner.end_step(check=check).metrics()


def _check_one_timeout_per_group(outcomes_per_group: list) -> None:
    for outcomes in outcomes_per_group:
        assert outcomes[0].failed and "timed out after 0.5 s (reward.timeout_s)" in outcomes[0].error
        assert [o.error for o in outcomes[1:]] == [None] * 7
        assert [o.score for o in outcomes[1:]] == [1.0] * 7


# -- the fault: a hanging sample used to take every reward thread ------------------------------


def test_a_reward_hanging_on_one_sample_per_group_never_starves_later_samples(caplog):
    release = threading.Event()

    def hangs_on_first(sample):
        if sample.sample_id.endswith("-0"):
            release.wait()  # "forever": until the test ends
        return 1.0

    runner = RewardRunner([_comp(hangs_on_first)], timeout_s=TIMEOUT_S, max_workers=4)

    async def go():
        steps = []
        for first in (0, 10):  # two steps of 10 groups: 20 hung calls, 4 worker threads
            outcomes, finished = await _score_groups(runner, list(range(first, first + 10)))
            steps.append((outcomes, finished, runner.end_step().metrics()))
        return steps

    try:
        with caplog.at_level(logging.WARNING):
            steps = asyncio.run(go())
    finally:
        release.set()
        runner.close()
    for outcomes, finished, metrics in steps:
        _check_one_timeout_per_group(outcomes)
        # 10 hung calls through 4 threads take ~1.5 s; before the fix, samples failed instead.
        assert max(finished) < 1.5 + 6.0
        assert metrics["reward/hangs_on_first/timeouts"] == 10.0
        assert metrics["reward/hangs_on_first/errors"] == 0.0
        assert metrics["reward/failed"] == 10.0 and metrics["reward/samples"] == 80.0
    assert steps[1][2]["reward/abandoned_threads"] == 20.0  # still hanging, each replaced
    assert "no free reward worker" not in caplog.text
    assert "its thread is abandoned (1 abandoned so far" in caplog.text
    assert "use reward.executor: process" in caplog.text


def test_past_max_abandoned_the_pool_fails_fast_and_recovers_when_calls_return():
    release = threading.Event()

    def hangs_on_label(sample):
        if sample.label == "hang":
            release.wait(10)
        return 1.0

    runner = RewardRunner([_comp(hangs_on_label)], timeout_s=0.3, max_workers=1, max_abandoned=1)
    hang = [Sample(f"h{i}-0", f"h{i}", [1], [2], response="r", label="hang") for i in range(2)]

    async def go():
        first = await runner.score(hang[:1])  # abandoned: a replacement thread serves on
        second = await runner.score(hang[1:])  # the bound is reached: keeps the only worker
        starved = await runner.score(_group(0, n=2))
        release.set()
        await asyncio.sleep(0.5)
        return first, second, starved, await runner.score(_group(1, n=2))

    try:
        first, second, starved, after = asyncio.run(go())
    finally:
        release.set()
        runner.close()
    assert "timed out" in first[0].error and "timed out" in second[0].error
    assert all("no free reward worker: all 1 (reward.max_workers)" in o.error for o in starved)
    assert "1 (reward.max_abandoned)" in starved[0].error and "reward.executor: process" in starved[0].error
    assert [o.score for o in after] == [1.0, 1.0]


HANGING_REWARD = """
import os, time

def hangs_on_first(sample, pid_dir):
    if sample.sample_id.endswith("-0"):
        with open(os.path.join(pid_dir, sample.sample_id), "w") as f:
            f.write(str(os.getpid()))
        time.sleep(3600)
    return 1.0
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


def test_process_executor_kills_hung_workers_and_serves_groups_in_arrival_order(tmp_path):
    path = tmp_path / "hanging_reward.py"
    path.write_text(textwrap.dedent(HANGING_REWARD))
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    comp = load_reward(f"{path}:hangs_on_first", {"pid_dir": str(pid_dir)})
    runner = RewardRunner([comp], executor="process", timeout_s=TIMEOUT_S, max_workers=4)

    async def go():
        await runner.score(_group(99)[1:])  # the pool has started (not part of what is checked)
        outcomes, finished = await _score_groups(runner, list(range(20)))
        return outcomes, finished, runner.end_step().metrics()

    try:
        outcomes, finished, metrics = asyncio.run(go())
    finally:
        runner.close()
    _check_one_timeout_per_group(outcomes)
    assert metrics["reward/workers_killed"] == 20.0 and metrics["reward/hangs_on_first/timeouts"] == 20.0
    # First come, first served: the first groups are not starved by later ones (they used to
    # lose every race for a freed worker and finish last), and none waits much past its share.
    assert max(finished[:4]) < min(finished[-4:])
    assert max(finished) < 20 * TIMEOUT_S / 4 + 8.0
    pids = [int(p.read_text()) for p in pid_dir.iterdir()]
    assert len(pids) == 20
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(p) for p in pids)


# -- fault injection ------------------------------------------------------------------------


def exact(sample):
    return float(sample.response.endswith(sample.label))


async def async_exact(sample):
    await asyncio.sleep(0)
    return float(sample.response.endswith(sample.label))


def test_injected_raise_and_nan_fail_the_picked_samples_and_are_counted_per_term():
    faults = RewardFaults(raise_frac=0.2, nan_frac=0.15, seed=7)
    runner = RewardRunner([_comp(exact), _comp(async_exact)], faults=faults)
    try:
        outcomes, metrics = asyncio.run(_score_flat(runner, list(range(6))))
    finally:
        runner.close()
    picks = [faults.pick(f"g{g}-{i}") for g in range(6) for i in range(8)]
    n_raise, n_nan = picks.count("raise"), picks.count("nan")
    assert n_raise > 0 and n_nan > 0 and picks.count(None) > 0  # the seed exercises every path
    for term in ("exact", "async_exact"):
        assert metrics[f"reward/{term}/errors"] == n_raise
        assert metrics[f"reward/{term}/nonfinite"] == n_nan
        assert metrics[f"reward/{term}/failed"] == n_raise + n_nan
        assert metrics[f"reward/{term}/timeouts"] == 0.0
    for outcome, pick in zip(outcomes, picks):
        assert outcome.failed == (pick is not None)
        if pick == "raise":
            assert "exact: InjectedRewardFault: injected by faults.reward.raise_frac" in outcome.error
        elif pick == "nan":
            assert "returned a non-finite score (nan)" in outcome.error
        else:
            assert outcome.score == 2.0


def test_a_batched_term_gets_nan_per_sample_and_raises_for_the_whole_group():
    @batched
    def ones(samples):
        return [1.0] * len(samples)

    nan_only = RewardFaults(nan_frac=0.3, seed=2)
    comp = RewardComponent(name="ones", ref="test:ones", fn=ones, kwargs={}, is_batched=True)
    runner = RewardRunner([comp], faults=nan_only)
    outcomes, metrics = asyncio.run(_score_flat(runner, [0, 1]))
    picks = [nan_only.pick(f"g{g}-{i}") for g in (0, 1) for i in range(8)]
    assert [o.failed for o in outcomes] == [p == "nan" for p in picks] and "nan" in picks
    assert metrics["reward/ones/nonfinite"] == picks.count("nan")
    raising = RewardFaults(raise_frac=0.3, seed=2)
    runner = RewardRunner([comp], faults=raising)
    outcomes, metrics = asyncio.run(_score_flat(runner, [0], check=False))  # all 8 failed
    hit = [raising.pick(f"g0-{i}") for i in range(8)]
    assert "raise" in hit and all(o.failed for o in outcomes)  # one call for the whole group
    assert metrics["reward/ones/errors"] == 8.0


def test_injected_hangs_time_out_with_every_executor_and_end_at_close(tmp_path):
    cfg = RewardConfig(combine=[RewardComponentConfig(fn="exact_match", name="em")], timeout_s=0.4)
    faults = RewardFaultsConfig(hang_frac=0.25, seed=1, terms=["em"])
    picked = [RewardFaults.from_config(faults).pick(f"g{g}-{i}") == "hang" for g in range(4) for i in range(8)]
    for executor in ("thread", "process"):
        cfg.executor = executor
        runner = RewardRunner.from_config(cfg, faults=faults)
        before = threading.active_count()
        try:
            outcomes, metrics = asyncio.run(_score_flat(runner, list(range(4))))
        finally:
            runner.close()
        assert [o.failed for o in outcomes] == picked, executor
        assert all("timed out after 0.4 s" in o.error for o in outcomes if o.failed)
        assert metrics["reward/em/timeouts"] == sum(picked)
        if executor == "process":
            assert metrics["reward/workers_killed"] == sum(picked)
        else:
            assert metrics["reward/abandoned_threads"] == sum(picked)
            deadline = time.monotonic() + 5  # close() released the injected hangs
            while threading.active_count() > before and time.monotonic() < deadline:
                time.sleep(0.05)
            assert threading.active_count() <= before


def test_a_term_failing_on_every_sample_still_stops_the_run_naming_it(caplog):
    cfg = RewardConfig(combine=[RewardComponentConfig(fn="exact_match", name="em"),
                                RewardComponentConfig(fn="exact_match", name="em2")])
    runner = RewardRunner.from_config(cfg, faults=RewardFaultsConfig(raise_frac=1.0, terms=["em2"]))
    outcomes = asyncio.run(runner.score(_group(0)))
    assert all("em2: InjectedRewardFault" in o.error for o in outcomes)
    with pytest.raises(AllRewardsFailedError, match=r"reward .em2. \(slime_rl.rewards.builtin[.\w]*:exact_match\) failed on all 8"):
        runner.end_step()
    runner.failure_policy = "warn"
    asyncio.run(runner.score(_group(1)))
    with caplog.at_level(logging.WARNING):
        metrics = runner.end_step().metrics()
    runner.close()
    assert "reward 'em2'" in caplog.text and "reward.failure_policy=warn" in caplog.text
    assert metrics["reward/em2/errors"] == 8.0 and metrics["reward/em/failed"] == 0.0


def test_fault_settings_are_checked_with_the_key_named():
    with pytest.raises(ValueError, match=r"faults.reward.raise_frac=1.5: must be in \[0, 1\]"):
        RewardFaults(raise_frac=1.5)
    with pytest.raises(ValueError, match="add up to at most 1"):
        RewardFaults(hang_frac=0.6, nan_frac=0.6)
    with pytest.raises(ValueError, match="add up to at most 1"):
        RewardFaultsConfig(hang_frac=0.6, nan_frac=0.6).validate()
    with pytest.raises(ValueError, match=r"faults.reward.terms: no reward term named \['nope'\]; terms: \['exact_match'\]"):
        RewardRunner.from_config(RewardConfig(fn="exact_match"), faults=RewardFaultsConfig(raise_frac=0.1, terms=["nope"]))
    off = RewardRunner.from_config(RewardConfig(fn="exact_match"), faults=RewardFaultsConfig())
    assert off.components[0].ref.endswith(":exact_match")  # nothing wrapped when every fraction is 0
    off.close()
