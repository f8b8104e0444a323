"""The multi-turn agent loop: exact loss masks, template consistency, tool errors, continuations.

A scripted engine (its turn k replies with script[k], tokenised) makes episodes deterministic; the
tokenizer is the tiny model's (its chat template renders tool calls and tool responses)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from slime_rl.buffers.schema import samples_to_batch
from slime_rl.buffers.validation import validate_batch
from slime_rl.rollout.agent import AgentLoop, AgentSettings
from slime_rl.rollout.data import Prompt
from slime_rl.rollout.engines.base import FinishReason, GenerateRequest, GenerateResult
from slime_rl.rollout.environments import (
    StepResult,
    ToolEnvironment,
    load_environment,
    tool_schema,
)
from slime_rl.rollout.envs_builtin.calculator import CalculatorEnvironment, evaluate_arithmetic
from slime_rl.rollout.plugins import PluginLoadError
from slime_rl.rollout.stats import RolloutStats
from slime_rl.rollout.trajectory import TurnClient

pytestmark = pytest.mark.timeout(120)

CALL = '<tool_call>\n{{"name": "calculator", "arguments": {{"expression": "{}"}}}}\n</tool_call>'
EOS = "<|im_end|>"


@pytest.fixture(scope="module")
def tok():
    from slime_rl.tiny import build_tokenizer

    return build_tokenizer()


class ScriptedEngine:
    """An `EngineClient` whose reply to turn k (k = assistant prompts in the request - 1) is `script[k]`."""

    name = "scripted"

    def __init__(self, tokenizer: Any, script: Sequence[str | list[int]], version: int = 0) -> None:
        self.tok, self.script, self.v = tokenizer, list(script), version
        self.requests: list[GenerateRequest] = []

    def reply(self, request: GenerateRequest) -> list[int]:
        text = self.tok.decode(list(request.prompt_token_ids), skip_special_tokens=False)
        k = text.count("<|im_start|>assistant") - 1
        item = self.script[min(k, len(self.script) - 1)]
        return list(item) if isinstance(item, list) else self.tok(item, add_special_tokens=False)["input_ids"]

    async def generate_group(self, requests: Sequence[GenerateRequest]) -> list[GenerateResult]:
        out = []
        for r in requests:
            self.requests.append(r)
            ids = self.reply(r)[: r.sampling.max_new_tokens]
            done = ids and ids[-1] == self.tok.eos_token_id
            reason = FinishReason.STOP if done else FinishReason.LENGTH
            out.append(GenerateResult(r.request_id, ids, [-0.25] * len(ids), reason, [self.v] * len(ids), self.v, self.v))
        return out

    async def update_weights(self, version: int, buckets: Any, mode: str | None) -> int:
        self.v = version
        return version

    async def version(self) -> int:
        return self.v

    async def info(self) -> dict[str, Any]:
        return {"max_model_len": 1024}


def make_prompt(tok: Any, question: str, mode: str = "non_think", tools: Any = None, label: str | None = None) -> Prompt:
    messages = ({"role": "user", "content": question},)
    text = tok.apply_chat_template(list(messages), tools=tools, tokenize=False, add_generation_prompt=True, enable_thinking=mode == "think")
    ids = tuple(tok(text, add_special_tokens=False)["input_ids"])
    return Prompt(1, "t-1", ids, text, messages, label, mode, tuple(tools) if tools else None, {}, None)


def run(loop: AgentLoop, engine: ScriptedEngine, prompt: Prompt, max_new_tokens: int = 128):
    from slime_rl.rollout.engines.base import SamplingParams

    return asyncio.run(loop.run_episode(TurnClient(engine, "g/0"), prompt, SamplingParams(max_new_tokens=max_new_tokens), group_id="g"))


def _segments(mask: list[int]) -> list[tuple[int, int, int]]:
    out, start = [], 0
    for i in range(1, len(mask) + 1):
        if i == len(mask) or mask[i] != mask[start]:
            out.append((mask[start], start, i))
            start = i
    return out


@pytest.mark.parametrize("mode", ["non_think", "think"])
def test_loss_mask_covers_exactly_the_model_tokens_of_a_two_call_episode(tok: Any, mode: str) -> None:
    think = "<think>\nuse the tool\n</think>\n\n" if mode == "think" else ""
    script = [
        think + CALL.format("23 * 47") + EOS,
        think + CALL.format("1081 + 5") + EOS,
        think + "The answer is 1086." + EOS,
    ]
    engine = ScriptedEngine(tok, script)
    loop = AgentLoop(tok, load_environment("calculator"), AgentSettings(max_turns=5))
    prompt = make_prompt(tok, "What is 23 * 47 + 5?", mode, label="1086")
    s = run(loop, engine, prompt)

    generated = [tok(t, add_special_tokens=False)["input_ids"] for t in script]
    segs = _segments(s.loss_mask)
    model_segs = [s.response_ids[a:b] for m, a, b in segs if m == 1]
    assert model_segs == generated  # exactly the engine's tokens carry mask 1, in order
    assert [m for m, _, _ in segs] == [1, 0, 1, 0, 1]
    glue = [tok.decode(s.response_ids[a:b], skip_special_tokens=False) for m, a, b in segs if m == 0]
    empty = "<think>\n\n</think>\n\n" if mode == "non_think" else ""
    assert glue == [f"\n<|im_start|>user\n<tool_response>\n{v}\n</tool_response><|im_end|>\n<|im_start|>assistant\n{empty}" for v in ("1081", "1086")]
    assert [lp for lp, m in zip(s.response_logprobs, s.loss_mask) if m] == [-0.25] * sum(s.loss_mask)
    assert all(lp == 0.0 for lp, m in zip(s.response_logprobs, s.loss_mask) if not m)
    assert s.status == "completed" and s.metadata["episode_reward"] == 1.0
    agent = s.metadata["agent"]
    assert agent["turns"] == 3 and agent["tool_calls"] == 2 and agent["tool_errors"] == {} and agent["format_violations"] == 0
    assert [c["function"]["name"] for c in s.tool_calls] == ["calculator", "calculator"]
    validate_batch(samples_to_batch([s]))
    # every turn's request is the sequence so far: generated tokens are never re-tokenised
    for req, k in zip(engine.requests, range(3)):
        n = len(s.prompt_ids) + sum(len(g) for g in generated[:k]) + sum(len(tok(x, add_special_tokens=False)["input_ids"]) for x in glue[:k])
        assert list(req.prompt_token_ids) == (list(s.prompt_ids) + s.response_ids)[:n]


@pytest.mark.parametrize("mode", ["non_think", "think"])
def test_sequence_equals_the_template_rendering_when_the_model_writes_canonical_turns(tok: Any, mode: str) -> None:
    think = "<think>\nstep\n</think>\n\n" if mode == "think" else ""
    script = [think + CALL.format("12 * 12") + EOS, think + "The answer is 144." + EOS]
    loop = AgentLoop(tok, load_environment("calculator"), AgentSettings(max_turns=4))
    prompt = make_prompt(tok, "What is 12 * 12?", mode, tools=CalculatorEnvironment.tools, label="144")
    s = run(loop, ScriptedEngine(tok, script), prompt)
    rendered = tok.apply_chat_template(s.messages, tools=CalculatorEnvironment.tools, tokenize=False, enable_thinking=mode == "think")
    ids = tok(rendered, add_special_tokens=False)["input_ids"]
    seq = list(s.prompt_ids) + s.response_ids
    assert ids[: len(seq)] == seq and tok.decode(ids[len(seq):]) == "\n"  # the template's newline after the last turn
    assert s.messages[-1] == {"role": "assistant", "content": think + "The answer is 144."}


def test_sequence_keeps_generated_tokens_where_the_template_differs(tok: Any) -> None:
    # The model spells "The answer" one character per token and writes its call on one line:
    # re-tokenising the text would give other ids; the rollout keeps the engine's.
    odd = [tok.convert_tokens_to_ids(c) for c in "The"] + tok(" answer is 144." + EOS, add_special_tokens=False)["input_ids"]
    call = '<tool_call>{"name":"calculator","arguments":{"expression":"12*12"}}</tool_call>' + EOS
    script = [call, odd]
    loop = AgentLoop(tok, load_environment("calculator"), AgentSettings(max_turns=4))
    s = run(loop, ScriptedEngine(tok, script), make_prompt(tok, "What is 12 * 12?", tools=CalculatorEnvironment.tools, label="144"))
    segs = [s.response_ids[a:b] for m, a, b in _segments(s.loss_mask) if m]
    assert segs == [tok(call, add_special_tokens=False)["input_ids"], odd]
    seq = list(s.prompt_ids) + s.response_ids
    rendered = tok(tok.apply_chat_template(s.messages, tools=CalculatorEnvironment.tools, tokenize=False, enable_thinking=False),
                   add_special_tokens=False)["input_ids"]
    assert rendered[: len(seq)] != seq  # the template would have written something else
    assert s.metadata["episode_reward"] == 1.0


class Tools(ToolEnvironment):
    tools = [tool_schema("slow", "Sleeps.", {}), tool_schema("boom", "Raises.", {}), tool_schema("echo", "Echo.", {"x": {"type": "string"}}, ["x"])]
    tool_methods = {"slow": "slow", "boom": "boom", "echo": "echo"}

    async def slow(self) -> str:
        await asyncio.sleep(5)
        return "late"

    def boom(self) -> str:
        raise RuntimeError("the tool broke")

    def echo(self, x: str) -> str:
        return x


def test_malformed_unknown_failing_and_slow_tools_become_counted_error_observations(tok: Any) -> None:
    turn1 = (
        '<tool_call>{"name": "echo", "arguments": {"x": "hi"}}</tool_call>'
        "<tool_call>{broken</tool_call>"
        '<tool_call>{"name": "nope", "arguments": {}}</tool_call>'
        '<tool_call>{"name": "boom", "arguments": {}}</tool_call>'
        '<tool_call>{"name": "slow", "arguments": {}}</tool_call>'
        '<tool_call>{"name": "echo", "arguments": {"y": 1}}</tool_call>' + EOS
    )
    loop = AgentLoop(tok, lambda: Tools(tool_timeout_s=0.3), AgentSettings(max_turns=3))
    s = run(loop, ScriptedEngine(tok, [turn1, "The answer is 1." + EOS]), make_prompt(tok, "Go"), max_new_tokens=256)
    tool_msgs = [m for m in s.messages if m["role"] == "tool"]
    assert [m["content"].split(":")[0] for m in tool_msgs] == ["hi", "Error", "Error", "Error", "Error", "Error"]
    assert "malformed tool call" in tool_msgs[1]["content"] and "unknown tool 'nope'" in tool_msgs[2]["content"]
    assert "the tool broke" in tool_msgs[3]["content"] and "timed out" in tool_msgs[4]["content"]
    assert "bad arguments" in tool_msgs[5]["content"]
    agent = s.metadata["agent"]
    assert agent["tool_calls"] == 6 and agent["turns"] == 2
    assert agent["tool_errors"] == {"malformed": 1, "unknown_tool": 1, "tool_error": 1, "timeout": 1, "bad_arguments": 1}
    assert "<tool_response>\nError: unknown tool" in s.response  # the model sees them
    stats = RolloutStats()
    stats.add_group([s], kept=True, reason="kept", zero_std=True, gen_s=1.0, reward_s=0.0)
    m = stats.reduce(0, [])
    assert m["agent/tool_errors/timeout"] == 1 and m["agent/tool_errors/too_many_calls"] == 0
    assert m["agent/turns_mean"] == 2 and m["agent/tool_calls_mean"] == 6 and m["agent/episodes"] == 1


def test_too_many_calls_and_turn_and_token_budgets(tok: Any) -> None:
    many = "".join(CALL.format("1 + 1") for _ in range(3)) + EOS
    loop = AgentLoop(tok, load_environment("calculator"), AgentSettings(max_turns=2, max_tool_calls_per_turn=2))
    s = run(loop, ScriptedEngine(tok, [many, CALL.format("2 + 2") + EOS]), make_prompt(tok, "Go"), max_new_tokens=256)
    assert s.metadata["agent"]["tool_errors"] == {"too_many_calls": 1}
    assert s.status == "truncated" and s.metadata["agent"]["stop"] == "max_turns"
    assert s.loss_mask[-1] == 1  # the last turn's calls are not run: no tool result after it

    turn = len(tok(CALL.format("1 + 1") + EOS, add_special_tokens=False)["input_ids"])
    loop = AgentLoop(tok, load_environment("calculator"), AgentSettings(max_turns=8, max_episode_tokens=turn + 5))
    s = run(loop, ScriptedEngine(tok, [CALL.format("1 + 1") + EOS]), make_prompt(tok, "Go"))
    assert s.status == "truncated" and len(s.response_ids) == turn and s.metadata["agent"]["stop"] == "token_budget"
    loop = AgentLoop(tok, load_environment("calculator"), AgentSettings(max_turns=8, max_episode_tokens=turn - 2))
    s = run(loop, ScriptedEngine(tok, [CALL.format("1 + 1") + EOS]), make_prompt(tok, "Go"))
    assert s.status == "truncated" and len(s.response_ids) == turn - 2 and s.metadata["agent"]["stop"] == "length"


def test_environment_failure_fails_only_the_episode(tok: Any) -> None:
    class Broken(ToolEnvironment):
        tools = CalculatorEnvironment.tools

        async def step(self, calls):  # type: ignore[override]
            raise RuntimeError("env crashed")

    loop = AgentLoop(tok, Broken, AgentSettings())
    s = run(loop, ScriptedEngine(tok, [CALL.format("1 + 1") + EOS]), make_prompt(tok, "Go"))
    assert s.status == "failed" and "env crashed" in s.metadata["env_error"] and s.metadata["agent"]["env_errors"] == 1


def test_environment_reset_observation_and_per_turn_rewards(tok: Any) -> None:
    class Game(CalculatorEnvironment):
        async def reset(self, prompt):  # type: ignore[override]
            return "Extra hint: use the calculator."

        async def step(self, calls):  # type: ignore[override]
            r = await super().step(calls)
            return StepResult(r.observations, done=True, reward=0.5)

    loop = AgentLoop(tok, Game, AgentSettings())
    s = run(loop, ScriptedEngine(tok, [CALL.format("3 * 3") + EOS]), make_prompt(tok, "Go", label="9"))
    assert "Extra hint" in s.prompt and "calculator" in s.prompt  # env tools rendered into the prompt
    assert s.metadata["turn_rewards"] == [0.5] and s.metadata["agent"]["stop"] == "env_done"
    assert s.loss_mask == [1] * len(s.response_ids)  # done after the step: no tool result appended


def test_turn_continues_after_a_weight_update_abort(tok: Any) -> None:
    class Aborting(ScriptedEngine):
        async def generate_group(self, requests):  # type: ignore[override]
            (r,) = requests
            self.requests.append(r)
            ids = self.reply(r)
            if len(self.requests) == 1:  # first piece: aborted after 3 tokens at version 0
                return [GenerateResult(r.request_id, ids[:3], [-0.1] * 3, FinishReason.ABORT, [0] * 3, 0, 0)]
            done = len(r.prompt_token_ids) - len(self.requests[0].prompt_token_ids)
            rest = ids[done:]
            return [GenerateResult(r.request_id, rest, [-0.2] * len(rest), FinishReason.STOP, [1] * len(rest), 1, 1)]

    eng = Aborting(tok, ["The answer is 4." + EOS])
    loop = AgentLoop(tok, load_environment("calculator"), AgentSettings())
    s = run(loop, eng, make_prompt(tok, "2+2?", label="4"))
    assert s.response_ids == tok("The answer is 4." + EOS, add_special_tokens=False)["input_ids"]
    assert s.token_versions[:3] == [0, 0, 0] and set(s.token_versions[3:]) == {1}
    assert s.policy_version == 0 and s.policy_version_end == 1 and s.metadata["pieces"] == 2
    assert list(eng.requests[1].prompt_token_ids) == list(s.prompt_ids) + s.response_ids[:3]
    assert eng.requests[1].sampling.max_new_tokens == 128 - 3


def test_calculator_is_safe_arithmetic() -> None:
    assert evaluate_arithmetic("23 * 47 + 5") == 1086 and evaluate_arithmetic("7 / 2") == 3.5 and evaluate_arithmetic("2^3") == 8
    for bad in ("__import__('os')", "x + 1", "2 ** 999999", "open('f')"):
        with pytest.raises(ValueError):
            evaluate_arithmetic(bad)


def test_retrieval_environment_and_loader_errors(tmp_path: Path) -> None:
    docs = tmp_path / "docs.jsonl"
    docs.write_text("\n".join(json.dumps({"text": t}) for t in ["Ana lives in Plim.", "Ana works as a baker.", "Tom lives in Zorb."]) + "\n")
    make = load_environment("retrieval", {"documents": "docs.jsonl", "top_k": 1}, base_dir=tmp_path)
    env = make()
    assert env.search("Where does Ana live") == "Ana lives in Plim."
    assert env.search("qqq") == "No document matches."
    with pytest.raises(PluginLoadError, match="missing.jsonl' is not a file"):
        load_environment("retrieval", {"documents": "missing.jsonl"}, base_dir=tmp_path)
    with pytest.raises(PluginLoadError, match="rollout.environment='nope:Env'"):
        load_environment("nope:Env")
    (tmp_path / "envs.py").write_text("class NotAnEnv:\n    def reset(self, p):\n        pass\n")
    with pytest.raises(PluginLoadError, match="async method"):
        load_environment("envs.py:NotAnEnv", base_dir=tmp_path)


def test_python_tool_runs_in_the_rewards_sandbox(tok: Any) -> None:
    from slime_rl.rollout.envs_builtin.python import PythonEnvironment

    try:
        make = load_environment("python", {"wall_s": 5.0})
    except PluginLoadError as e:  # no namespaces on this host: the sandbox refuses to start
        pytest.skip(f"sandbox unavailable: {e}")
    env = make()
    assert isinstance(env, PythonEnvironment)
    code = json.dumps({"name": "python", "arguments": {"code": "print(6 * 7)"}})
    loop = AgentLoop(tok, make, AgentSettings(max_turns=2))
    s = run(loop, ScriptedEngine(tok, [f"<tool_call>{code}</tool_call>" + EOS, "The answer is 42." + EOS]), make_prompt(tok, "6*7?", label="42"))
    assert [m["content"] for m in s.messages if m["role"] == "tool"] == ["42"]
    assert s.metadata["episode_reward"] == 1.0


def test_a_lost_engine_fails_the_group_and_stops_its_other_episodes(tok: Any) -> None:
    from slime_rl.rollout.engine_pool import EngineLostError
    from slime_rl.rollout.engines.base import SamplingParams
    from slime_rl.rollout.episodes import AgentLoopEpisodes

    started: list[str] = []
    cancelled: list[str] = []

    class Lost(ScriptedEngine):
        async def generate_group(self, requests):  # type: ignore[override]
            (r,) = requests
            started.append(r.request_id)
            if r.request_id.startswith("g/1/"):
                raise EngineLostError("engine-0 is gone")
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled.append(r.request_id)
                raise
            return await super().generate_group(requests)

    episodes = AgentLoopEpisodes(AgentLoop(tok, load_environment("calculator"), AgentSettings()), tok, lambda k: 0)

    async def main() -> None:
        with pytest.raises(EngineLostError):
            await asyncio.wait_for(episodes.run_group(Lost(tok, ["x"]), make_prompt(tok, "Go"), "g", 3, SamplingParams()), 10)

    asyncio.run(main())
    assert len(started) == 3 and sorted(cancelled) == ["g/0/0/0", "g/2/0/0"]
