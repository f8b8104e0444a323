"""reward.executor=process: blocking rewards run in worker processes, a call past its timeout
is killed (not left pinning a worker), and the pool keeps serving afterwards."""

from __future__ import annotations

import asyncio
import os
import textwrap
import time

import pytest
from slime_rl.buffers.schema import Sample
from slime_rl.rewards import RewardConfig, RewardRunner, load_reward

pytestmark = pytest.mark.timeout(60)

REWARDS = """
import os, time

def pid_reward(sample):
    return {"score": 1.0, "pid": float(os.getpid())}

def spins_forever_on_label_hang(sample):
    if sample.label.startswith("hang:"):
        with open(sample.label[len("hang:"):], "w") as f:
            f.write(str(os.getpid()))
        while True:  # a CPU-bound call that never returns (think runaway sympy)
            pass
    return 1.0

def raises(sample):
    raise KeyError("no such field")
"""


def _samples(labels: list[str]) -> list[Sample]:
    return [Sample(f"g0-{i}", "g0", [1], [2], response="r", label=lab) for i, lab in enumerate(labels)]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


@pytest.fixture()
def reward_file(tmp_path):
    path = tmp_path / "proc_rewards.py"
    path.write_text(textwrap.dedent(REWARDS))
    return path


def test_process_executor_runs_blocking_rewards_in_other_processes(reward_file):
    runner = RewardRunner([load_reward(f"{reward_file}:pid_reward")], executor="process", max_workers=2)

    async def go():
        try:
            return await runner.score(_samples(["a", "b", "c"]))
        finally:
            await runner.aclose()

    outcomes = asyncio.run(go())
    pids = {o.metrics["pid_reward/pid"] for o in outcomes}
    assert [o.score for o in outcomes] == [1.0] * 3
    assert os.getpid() not in pids and 1 <= len(pids) <= 2


def test_process_executor_kills_a_call_past_its_timeout_and_keeps_serving(reward_file, tmp_path):
    pid_file = tmp_path / "hung.pid"
    comp = load_reward(f"{reward_file}:spins_forever_on_label_hang")
    runner = RewardRunner([comp], executor="process", max_workers=1, timeout_s=2.0)

    async def go():
        try:
            first = await runner.score(_samples([f"hang:{pid_file}", "ok"]))
            hung_pid = int(pid_file.read_text())
            deadline = time.monotonic() + 5
            while _alive(hung_pid) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            second = await runner.score(_samples(["ok", "ok"]))
            return first, second, hung_pid
        finally:
            await runner.aclose()

    first, second, hung_pid = asyncio.run(go())
    assert "timed out after 2 s" in first[0].error
    # One worker: the second call waited for it, and ran after the hung call was killed.
    assert first[1].error is None and first[1].score == 1.0
    assert not _alive(hung_pid)
    assert [o.score for o in second] == [1.0, 1.0]


def test_process_executor_reports_the_reward_error_and_config_choice(reward_file):
    runner = RewardRunner([load_reward(f"{reward_file}:raises")], executor="process", max_workers=1)

    async def go():
        try:
            return await runner.score(_samples(["a"]))
        finally:
            await runner.aclose()

    (outcome,) = asyncio.run(go())
    assert outcome.error == "raises: KeyError: 'no such field'"
    from_config = RewardRunner.from_config(RewardConfig(executor="process"))
    assert from_config.executor == "process"
    from_config.close()
    with pytest.raises(ValueError, match=r"reward.executor='fork'; allowed: \('thread', 'process'\)"):
        RewardRunner([load_reward("exact_match")], executor="fork")


def test_process_executor_rebuilds_a_class_reward_with_its_constructor_kwargs(tmp_path):
    path = tmp_path / "class_reward.py"
    path.write_text(textwrap.dedent("""
        class Scaled:
            def __init__(self, scale):
                self.scale = scale

            def __call__(self, sample):
                return self.scale * len(sample.response)
    """))
    runner = RewardRunner([load_reward(f"{path}:Scaled", {"scale": 3.0})], executor="process", max_workers=1)
    outcomes = asyncio.run(runner.score(_samples(["a"])))  # response "r": 3.0 * 1
    asyncio.run(runner.score(_samples(["b"])))  # a second event loop reuses the pool
    runner.close()
    assert outcomes[0].error is None and outcomes[0].score == 3.0
