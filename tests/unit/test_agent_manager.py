"""Episodes inside the rollout manager (one process, no Ray): the agent loop, `rollout.generate_fn`,
the OpenAI endpoint with `rollout.agent_fn`; per-mode metrics and eval; hybrid mode rendering;
per-mode rewards; the config rules of the new keys."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from slime_rl.buffers import BufferConfig, ReplayBuffer, batch_to_samples, validate_batch
from slime_rl.buffers.schema import Sample
from slime_rl.rewards.config import RewardConfig
from slime_rl.rollout.agent_rewards import (
    check_overlong_penalty_by_mode,
    episode_reward,
    overlong_penalty_by_mode,
)
from slime_rl.rollout.clients import LocalBufferClient, LocalEngineClient
from slime_rl.rollout.config import DataConfig, EvalConfig, RolloutConfig
from slime_rl.rollout.data import PromptDataset
from slime_rl.rollout.manager import ManagerSpec, RolloutManager
from slime_rl.rollout.modes import format_violation
from slime_rl.rollout.plugins import PluginLoadError
from slime_rl.rollout.stats import RolloutStats

from slime_rl.config import ConfigError, load_config

pytestmark = pytest.mark.timeout(300)

EOS = "<|im_end|>"
CALL = '<tool_call>\n{{"name": "calculator", "arguments": {{"expression": "{}"}}}}\n</tool_call>'

GENERATE_FN = '''
from slime_rl.rollout.trajectory import TokenTrajectory

async def generate(client, tokenizer, prompt, sampling):
    """Two requests per sample: a reply, then a second reply to "Again" (mask 0 between)."""
    traj = TokenTrajectory(list(prompt.prompt_ids))
    traj.add_generated(await client.generate(traj.all_ids(), sampling))
    traj.add_context(tokenizer("\\n<|im_start|>user\\nAgain<|im_end|>\\n<|im_start|>assistant\\n", add_special_tokens=False)["input_ids"])
    traj.add_generated(await client.generate(traj.all_ids(), sampling))
    return traj.to_sample(prompt, tokenizer=tokenizer, metadata={"custom": True})

def broken(client, tokenizer, prompt, sampling):
    raise RuntimeError("user bug")
'''

AGENT = '''
import openai

def agent(base_url, episode_id, task):
    c = openai.OpenAI(base_url=base_url, api_key="-", max_retries=0)
    r = c.chat.completions.create(model="m", messages=task["messages"], max_tokens=4)
    r2 = c.chat.completions.create(model="m", messages=task["messages"] + [r.choices[0].message.model_dump(exclude_none=True),
                                   {"role": "user", "content": "more"}], max_tokens=4)
    return 0.25
'''


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("agent_data")
    rows = [{"prompt": f"What is {i} * {i + 10}?", "label": str(i * (i + 10))} for i in range(12)]
    (d / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (d / "gen.py").write_text(GENERATE_FN)
    (d / "agent.py").write_text(AGENT)
    return d


class ScriptedClient(LocalEngineClient):
    """The hf engine's bookkeeping, but each turn answers with the calculator script."""

    def __init__(self, engine, tok, script):
        super().__init__(engine)
        self.tok, self.script = tok, script

    async def generate_group(self, requests):
        from slime_rl.rollout.engines.base import FinishReason, GenerateResult

        out = []
        for r in requests:
            k = self.tok.decode(list(r.prompt_token_ids), skip_special_tokens=False).count("<|im_start|>assistant") - 1
            ids = self.tok(self.script[min(k, len(self.script) - 1)], add_special_tokens=False)["input_ids"]
            v = self.engine.version
            out.append(GenerateResult(r.request_id, ids, [-0.3] * len(ids), FinishReason.STOP, [v] * len(ids), v, v))
        return out


def _spec(data_dir: Path, model_dir: Path, reward: RewardConfig, **rollout) -> ManagerSpec:
    r = RolloutConfig(engine="hf", n_samples_per_prompt=2, max_new_tokens=rollout.pop("max_new_tokens", 48), cpu_threads=1, **rollout)
    data = DataConfig(train_path=str(data_dir / "train.jsonl"), eval_path=str(data_dir / "train.jsonl"), mode_mix=0.5)
    return ManagerSpec(rollout=r, data=data, reward=reward, eval=EvalConfig(max_prompts=4, max_new_tokens=48),
                       model_path=str(model_dir), global_batch_groups=2, max_staleness=0, seed=0, base_dir=str(data_dir))


async def _run(spec: ManagerSpec, model_dir: Path, script=None, groups: int = 2):
    from slime_rl.rollout.engines import create_engine

    engine = create_engine("hf", model_dir, num_threads=1, max_batch_size=16)
    buf = ReplayBuffer(BufferConfig(capacity_groups=16, max_staleness=0), group_size=spec.rollout.n_samples_per_prompt)
    client = LocalEngineClient(engine)
    if script is not None:
        from transformers import AutoTokenizer

        client = ScriptedClient(engine, AutoTokenizer.from_pretrained(model_dir), script)
    m = RolloutManager(spec, [client], LocalBufferClient(buf))
    try:
        await m.setup()
        await m.start()
        deadline = asyncio.get_running_loop().time() + 120
        while len(buf) < groups:
            assert asyncio.get_running_loop().time() < deadline, "the buffer did not fill"
            await asyncio.sleep(0.05)
        metrics = await m.metrics()
        evaluation = await m.evaluate()
        table = buf.get_batch(groups, trainer_version=0, timeout=1)
        validate_batch(table)
        return batch_to_samples(table), metrics, evaluation
    finally:
        await m.stop()
        await engine.shutdown()


def test_agent_loop_in_the_manager(data_dir: Path, tiny_model_dir: Path) -> None:
    script = [CALL.format("3 * 13") + EOS, "The answer is 39." + EOS]
    reward = RewardConfig(fn="slime_rl.rollout.agent_rewards:episode_reward")
    spec = _spec(data_dir, tiny_model_dir, reward, environment="calculator", max_turns=3)
    samples, metrics, ev = asyncio.run(_run(spec, tiny_model_dir, script))
    for s in samples:
        assert s.metadata["agent"]["turns"] == 2 and s.metadata["agent"]["tool_calls"] == 1
        assert 0 < sum(s.loss_mask) < len(s.response_ids) and s.metadata["engine"] == "engine-0"
        assert s.reward == float(s.label == "39")  # the environment's final reward, through reward.fn
    assert metrics["agent/turns_mean"] == 2 and metrics["agent/tool_calls_mean"] == 1
    assert metrics["agent/tool_errors/malformed"] == 0 and "rollout/format_violation_frac" in metrics
    assert ev["eval/num_prompts"] == 4 and ev["eval/accuracy"] == pytest.approx(0.25)  # only "3 * 13" is 39
    eval_modes = {k.rsplit("/", 1)[1] for k in ev if k.startswith("eval/format_violation_frac/")}
    assert eval_modes and eval_modes <= {"think", "non_think"} and ev["eval/format_violation_frac"] >= 0
    for mode in eval_modes:
        assert {f"eval/reward_mean/{mode}", f"eval/truncated_frac/{mode}", f"eval/response_len_mean/{mode}", f"eval/accuracy/{mode}"} <= set(ev)


def test_generate_fn_replaces_generation(data_dir: Path, tiny_model_dir: Path) -> None:
    spec = _spec(data_dir, tiny_model_dir, RewardConfig(fn="math_answer"), generate_fn="gen.py:generate", max_new_tokens=6)
    samples, metrics, _ = asyncio.run(_run(spec, tiny_model_dir))
    from transformers import AutoTokenizer

    ctx = AutoTokenizer.from_pretrained(tiny_model_dir)("\n<|im_start|>user\nAgain<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    for s in samples:
        assert s.metadata["custom"] is True and s.sample_id.startswith(s.group_id + "/")
        assert s.loss_mask.count(0) == len(ctx)  # the context between the two replies
        assert s.metadata["pieces"] == 2 and all(lp <= 0 for lp in s.response_logprobs)
    assert metrics["rollout/samples"] == 4


def test_generate_fn_errors_fail_samples_and_bad_references_fail_setup(data_dir: Path, tiny_model_dir: Path) -> None:
    spec = _spec(data_dir, tiny_model_dir, RewardConfig(fn="math_answer"), generate_fn="gen.py:broken", max_new_tokens=4)
    samples, _, _ = asyncio.run(_run(spec, tiny_model_dir))
    assert all(s.status == "failed" and "user bug" in s.metadata["generate_fn_error"] for s in samples)
    with pytest.raises(PluginLoadError, match="rollout.generate_fn='gen.py:missing'"):
        asyncio.run(_run(_spec(data_dir, tiny_model_dir, RewardConfig(fn="math_answer"), generate_fn="gen.py:missing"), tiny_model_dir))


def test_agent_fn_through_the_endpoint_in_the_manager(data_dir: Path, tiny_model_dir: Path) -> None:
    pytest.importorskip("openai")
    reward = RewardConfig(fn="slime_rl.rollout.agent_rewards:episode_reward")
    spec = _spec(data_dir, tiny_model_dir, reward, agent_fn="agent.py:agent", agent_endpoint=True)
    samples, metrics, _ = asyncio.run(_run(spec, tiny_model_dir))
    for s in samples:
        assert s.reward == 0.25 and s.metadata["agent"]["turns"] == 2
        assert 2 <= sum(s.loss_mask) <= 8 and s.loss_mask.count(0) > 0  # two replies of <= 4 tokens, context between
    assert metrics["agent/episodes"] == 4


def test_mode_rendering_and_per_mode_metrics(data_dir: Path, tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ds = PromptDataset.load(data_dir / "train.jsonl", DataConfig(train_path="x", mode_mix=0.5), tok, seed=0)
    modes = {p.mode for p in ds}
    assert modes == {"think", "non_think"}
    for p in ds:
        assert p.text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n") == (p.mode == "non_think")

    def sample(mode: str, response: str, status: str = "completed", reward: float = 1.0) -> Sample:
        return Sample(sample_id="s", group_id="g", prompt_ids=[1], response_ids=[1] * len(response), mode=mode,
                      response=response, status=status, reward=reward)

    group = [
        sample("think", "<think>\n2+2=4\n</think>\n\nThe answer is 4."),
        sample("think", "The answer is 4.", reward=0.0),  # no reasoning block: a violation
        sample("non_think", "The answer is 4."),
        sample("non_think", "<think>\nhmm\n</think>\n\n4", "truncated", 0.0),  # reasoning in non-think
    ]
    assert [format_violation(s) for s in group] == [False, True, False, True]
    stats = RolloutStats()
    stats.add_group(group, kept=True, reason="kept", zero_std=False, gen_s=1.0, reward_s=0.1)
    m = stats.reduce(0, [])
    assert m["rollout/format_violation_frac"] == 0.5
    assert m["rollout/format_violation_frac/think"] == 0.5 == m["rollout/format_violation_frac/non_think"]
    assert m["rollout/truncated_frac/non_think"] == 0.5 and m["rollout/truncated_frac/think"] == 0.0
    assert m["rollout/reward_mean/think"] == 0.5 and "agent/turns_mean" not in m


def test_per_mode_overlong_penalty_and_episode_reward() -> None:
    kw = {"max_response_len": {"think": 20, "non_think": 8}, "overlong_buffer": {"think": 10, "non_think": 4}}
    check_overlong_penalty_by_mode(**kw)

    def s(mode: str, n: int, mask: list[int] | None = None) -> Sample:
        return Sample(sample_id="s", group_id="g", prompt_ids=[1], response_ids=[1] * n, mode=mode, loss_mask=mask)

    assert overlong_penalty_by_mode(s("think", 10), **kw)["score"] == 0.0
    assert overlong_penalty_by_mode(s("think", 15), **kw)["score"] == -0.5
    assert overlong_penalty_by_mode(s("non_think", 6), **kw)["score"] == -0.5  # same length, other budget
    assert overlong_penalty_by_mode(s("non_think", 30), **kw)["score"] == -1.0
    assert overlong_penalty_by_mode(s("non_think", 30, [1] * 4 + [0] * 26), **kw)["score"] == 0.0  # tool tokens do not count
    with pytest.raises(ValueError, match=r"overlong_buffer\[non_think\]=9"):
        check_overlong_penalty_by_mode(max_response_len={"think": 20, "non_think": 8}, overlong_buffer={"think": 4, "non_think": 9})
    with pytest.raises(ValueError, match="keys must be"):
        check_overlong_penalty_by_mode(max_response_len={"thinking": 20}, overlong_buffer=4)

    ep = Sample(sample_id="s", group_id="g", prompt_ids=[1], response_ids=[1],
                metadata={"episode_reward": 1.0, "turn_rewards": [0.5, 0.5], "agent": {"turns": 2, "tool_calls": 1}})
    assert episode_reward(ep, turn_reward_weight=0.1)["score"] == pytest.approx(1.1)
    with pytest.raises(ValueError, match="no metadata\\['episode_reward'\\]"):
        episode_reward(Sample(sample_id="x", group_id="g", prompt_ids=[1], response_ids=[]))
    assert episode_reward(Sample(sample_id="x", group_id="g", prompt_ids=[1], response_ids=[]), missing=0.0)["score"] == 0.0


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["rollout.environment=calculator", "rollout.generate_fn=a:b"], "rollout.environment and rollout.generate_fn exclude each other"),
        (["rollout.agent_fn=a:b"], "rollout.agent_fn needs rollout.agent_endpoint=true"),
        (["rollout.max_new_tokens_by_mode={thinking: 5}"], "max_new_tokens_by_mode has key 'thinking'"),
        (["rollout.max_turns=0"], "rollout.max_turns=0 is out of range"),
        (["rollout.engine=sglang", "rollout.recompute_kv_on_update=false"], "recompute_kv_on_update=false is implemented for the vllm and hf"),
    ],
)
def test_config_rules_of_the_episode_keys(overrides: list[str], expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        load_config(None, ["model.path=m", "data.train_path=t", *overrides], check_paths=False)
