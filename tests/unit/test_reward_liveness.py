"""Rewards that hang or block never stall a run: the process can always exit, async rewards that
block cannot freeze the caller's event loop (a watchdog names them and fails their sample), and
a process pool's worker start-up never counts against a call's timeout."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import textwrap
import time

import pytest
from slime_rl.buffers.schema import Sample
from slime_rl.rewards import RewardComponent, RewardRunner, load_reward

pytestmark = pytest.mark.timeout(90)


def _samples(n: int, label: str = "1") -> list[Sample]:
    return [Sample(f"g0-{i}", "g0", [1], [2], response="r", label=label) for i in range(n)]


def _comp(fn, **kwargs) -> RewardComponent:
    return RewardComponent(
        name=fn.__name__, ref=f"test:{fn.__name__}", fn=fn, kwargs=kwargs, is_async=asyncio.iscoroutinefunction(fn)
    )


# -- item 9: a reward that never returns cannot keep the process alive --------------------------

EXIT_SCRIPT = """
import asyncio, sys, threading, time
from slime_rl.buffers.schema import Sample
from slime_rl.rewards import RewardComponent, RewardRunner

def hangs_forever(sample):
    threading.Event().wait()

async def blocks_its_loop_forever(sample):
    threading.Event().wait()

fn = hangs_forever if sys.argv[1] == "thread" else blocks_its_loop_forever
comp = RewardComponent(name=fn.__name__, ref="test", fn=fn, kwargs={}, is_async=sys.argv[1] == "async")
runner = RewardRunner([comp], timeout_s=0.3)

async def main():
    out = await runner.score([Sample("g0-0", "g0", [1], [2], response="r", label="1")])
    await runner.aclose()
    print("closed", time.time(), out[0].failed, out[0].error, flush=True)

asyncio.run(main())
"""


@pytest.mark.parametrize("kind", ["thread", "async"])
def test_a_run_exits_after_aclose_even_when_a_reward_never_returns(kind):
    proc = subprocess.Popen([sys.executable, "-c", EXIT_SCRIPT, kind], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=45)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"the process did not exit after runner.aclose(); stdout={out!r}")
    exited = time.time()
    assert proc.returncode == 0, err
    _, closed_at, failed, *error = out.split()
    assert failed == "True"
    assert exited - float(closed_at) < 5.0, "exit waited for the hung reward"
    expected = "timed out after 0.3 s" if kind == "thread" else "blocked the reward event loop"
    assert expected in " ".join(error)


# -- item 11: an async reward that blocks runs on its own loop, watched -------------------------


async def blocks_on_first(sample):
    if sample.sample_id == "g0-0":
        time.sleep(6.0)  # the bug this guards against: blocking code in an async reward
    await asyncio.sleep(0.01)
    return 1.0


def test_a_blocking_async_reward_neither_freezes_the_callers_loop_nor_escapes_its_timeout(caplog):
    runner = RewardRunner([_comp(blocks_on_first)], timeout_s=0.5)

    async def go():
        ticks = [time.monotonic()]

        async def ticker():  # stands for generation on the rollout manager's loop
            while True:
                await asyncio.sleep(0.01)
                ticks.append(time.monotonic())

        tick_task = asyncio.ensure_future(ticker())
        t0 = time.monotonic()
        first = await runner.score(_samples(2))
        elapsed = time.monotonic() - t0
        later = await runner.score([Sample("g1-0", "g1", [1], [2], response="r", label="1")])
        tick_task.cancel()
        await runner.aclose()
        return first, later, elapsed, max(b - a for a, b in zip(ticks, ticks[1:])), len(ticks)

    with caplog.at_level(logging.WARNING):
        first, later, elapsed, worst_gap, n_ticks = asyncio.run(go())
    # Blocking the caller's loop would show as one 6 s gap; margins are wide for a busy machine.
    assert worst_gap < 1.5 and n_ticks > 20, "the caller's loop stalled while the reward blocked"
    assert elapsed < 3.5, "the timeout did not fire while the reward loop was blocked"
    assert first[0].failed and first[0].error.startswith("blocks_on_first: blocked the reward event loop for")
    assert "make it a plain `def`" in first[0].error
    # The other call of that loop is failed with it, naming the culprit; the next call gets a fresh loop.
    assert first[1].failed and "blocked by 'blocks_on_first' (sample g0-0)" in first[1].error
    assert later[0].error is None and later[0].score == 1.0
    assert "reward 'blocks_on_first' (sample g0-0) has blocked the reward event loop" in caplog.text


def test_async_rewards_run_off_the_callers_loop_and_keep_their_state_there():
    import threading

    seen = set()

    async def where(sample):
        seen.add(threading.current_thread().name)
        await asyncio.sleep(0)
        return 1.0

    runner = RewardRunner([_comp(where)])

    async def go():
        try:
            return await runner.score(_samples(3))
        finally:
            await runner.aclose()

    outcomes = asyncio.run(go())
    assert [o.score for o in outcomes] == [1.0] * 3
    assert seen == {"slime-rl-reward-loop"}


# -- item 10: worker start-up is not part of a call's timeout -----------------------------------

SLOW_IMPORT = """
import multiprocessing, os, time
time.sleep(1.5)  # a heavy import (torch, sympy, a tokenizer): longer than reward.timeout_s below

if os.path.exists(__file__ + ".broken") and multiprocessing.parent_process() is not None:
    raise ImportError("only importable in the driver")

def quick(sample):
    return 1.0

def hang_on_label(sample):
    while sample.label == "hang":
        pass
    return 1.0
"""


@pytest.fixture()
def slow_import(tmp_path):
    path = tmp_path / "slow_import_reward.py"
    path.write_text(textwrap.dedent(SLOW_IMPORT))
    return path


def test_process_pool_start_up_does_not_count_against_the_timeout(slow_import):
    runner = RewardRunner([load_reward(f"{slow_import}:quick")], executor="process", timeout_s=0.75, max_workers=2)

    async def go():
        try:
            return await runner.score(_samples(6))
        finally:
            await runner.aclose()

    outcomes = asyncio.run(go())
    assert [o.error for o in outcomes] == [None] * 6


def test_a_killed_worker_is_replaced_warm_and_the_next_call_is_not_charged_for_it(slow_import):
    comp = load_reward(f"{slow_import}:hang_on_label")
    runner = RewardRunner([comp], executor="process", timeout_s=0.75, max_workers=1)

    async def go():
        try:
            return await runner.score([*_samples(1, label="hang"), *_samples(2)])
        finally:
            await runner.aclose()

    outcomes = asyncio.run(go())
    assert "timed out after 0.75 s" in outcomes[0].error
    assert [o.error for o in outcomes[1:]] == [None, None]


def test_a_reward_that_cannot_load_in_a_worker_fails_fast_with_the_workers_error(slow_import):
    comp = load_reward(f"{slow_import}:quick")  # loads in the driver ...
    slow_import.with_name(slow_import.name + ".broken").touch()  # ... but not in a worker (verl #2680)
    runner = RewardRunner([comp], executor="process", timeout_s=30, max_workers=1)

    async def go():
        try:
            t0 = time.monotonic()
            return await runner.score(_samples(2)), time.monotonic() - t0
        finally:
            await runner.aclose()

    outcomes, seconds = asyncio.run(go())
    assert all(o.failed for o in outcomes) and seconds < 20
    assert "loading the reward in a worker process failed" in outcomes[0].error
    assert "only importable in the driver" in outcomes[0].error
