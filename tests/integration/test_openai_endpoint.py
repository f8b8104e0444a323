"""An agent written with the real `openai` SDK runs through the rollout side's endpoint: several
calls (with OpenAI-format tool calls) become one trajectory whose loss mask covers exactly the
tokens the engine generated."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any

import pytest
from slime_rl.buffers.schema import samples_to_batch
from slime_rl.buffers.validation import validate_batch
from slime_rl.rollout.data import Prompt
from slime_rl.rollout.engine_pool import EnginePool
from slime_rl.rollout.engines.base import (
    FinishReason,
    GenerateRequest,
    GenerateResult,
    SamplingParams,
)
from slime_rl.rollout.episodes import AgentFnEpisodes
from slime_rl.rollout.openai_server import AgentEndpoint

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.timeout(120)

EOS = "<|im_end|>"
CALL = '<tool_call>\n{{"name": "calculator", "arguments": {{"expression": "{}"}}}}\n</tool_call>'
TOOLS = [{"type": "function", "function": {"name": "calculator", "description": "Evaluate arithmetic.",
                                           "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}}}}]


class ScriptedEngine:
    """Reply k (k = assistant prompts in the request - 1) is `script[k]`, tokenised."""

    name = "scripted"

    def __init__(self, tok: Any, script: Sequence[str]) -> None:
        self.tok, self.script, self.requests = tok, list(script), []

    async def generate_group(self, requests: Sequence[GenerateRequest]) -> list[GenerateResult]:
        out = []
        for r in requests:
            self.requests.append(r)
            k = self.tok.decode(list(r.prompt_token_ids), skip_special_tokens=False).count("<|im_start|>assistant") - 1
            ids = self.tok(self.script[min(k, len(self.script) - 1)], add_special_tokens=False)["input_ids"]
            out.append(GenerateResult(r.request_id, ids, [-0.5] * len(ids), FinishReason.STOP, [3] * len(ids), 3, 3))
        return out

    async def update_weights(self, version, buckets, mode):  # pragma: no cover - not used
        return version

    async def version(self) -> int:
        return 3

    async def info(self) -> dict[str, Any]:
        return {"max_model_len": 1024}


def agent(base_url: str, episode_id: str, task: dict) -> dict:
    """A plain openai-SDK tool-using agent (what a user already has)."""
    client = openai.OpenAI(base_url=base_url, api_key="unused")
    messages = list(task["messages"])
    for _ in range(4):
        resp = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, logprobs=True)
        msg = resp.choices[0].message
        messages.append(msg.model_dump(exclude_none=True))
        if not msg.tool_calls:
            break
        for call in msg.tool_calls:
            expr = json.loads(call.function.arguments)["expression"]
            messages.append({"role": "tool", "tool_call_id": call.id, "content": str(eval(expr, {"__builtins__": {}}))})
    answer = messages[-1]["content"]
    return {"reward": float(answer.strip().endswith(task["label"] + ".")), "calls": len(messages)}


@pytest.fixture(scope="module")
def tok():
    from slime_rl.tiny import build_tokenizer

    return build_tokenizer()


def test_openai_sdk_agent_yields_one_trajectory_with_the_right_mask(tok: Any) -> None:
    script = [CALL.format("23 * 47") + EOS, CALL.format("1081 + 5") + EOS, "The answer is 1086." + EOS]
    engine = ScriptedEngine(tok, script)
    msgs = ({"role": "user", "content": "What is 23 * 47 + 5?"},)
    text = tok.apply_chat_template(list(msgs), tools=TOOLS, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    prompt = Prompt(1, "train-1", tuple(tok(text, add_special_tokens=False)["input_ids"]), text, msgs, "1086", "non_think", tuple(TOOLS), {}, None)

    async def main():
        pool = EnginePool([engine], max_in_flight=8, weight_timeout_s=10)
        ep = AgentEndpoint(pool, tok, SamplingParams(max_new_tokens=64), seed_fn=lambda k: 7)
        await ep.start()
        try:
            runner = AgentFnEpisodes(agent, "test:agent", tok, lambda k: 7, ep, timeout_s=60)
            samples = await runner.run_group(engine, prompt, "train-1-e0", 2, SamplingParams(max_new_tokens=64))
            # outside an episode: served, not recorded
            plain = await asyncio.to_thread(
                lambda: openai.OpenAI(base_url=ep.base_url + "/v1", api_key="-").completions.create(model="tiny", prompt="Hello", max_tokens=5))
            missing = None
            try:
                await asyncio.to_thread(lambda: openai.OpenAI(base_url=ep.url_for("nope"), api_key="-", max_retries=0)
                                        .chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}]))
            except openai.NotFoundError as e:
                missing = str(e)
            return samples, plain, missing
        finally:
            await ep.stop()

    samples, plain, missing = asyncio.run(main())
    assert len(samples) == 2 and plain.choices[0].text and "no open episode 'nope'" in missing
    generated = [tok(t, add_special_tokens=False)["input_ids"] for t in script]
    for s in samples:
        assert s.metadata["episode_reward"] == 1.0 and s.metadata["agent_info"]["calls"] == 6
        assert s.metadata["agent"]["turns"] == 3 and s.metadata["agent"]["endpoint_rebases"] == 0
        assert list(s.prompt_ids) == list(prompt.prompt_ids)  # the first call's prompt
        mask, ids = s.loss_mask, s.response_ids
        runs, start = [], 0
        for i in range(1, len(mask) + 1):
            if i == len(mask) or mask[i] != mask[start]:
                runs.append((mask[start], ids[start:i]))
                start = i
        assert [m for m, _ in runs] == [1, 0, 1, 0, 1]
        assert [r for m, r in runs if m] == generated  # exactly the engine's tokens, as generated
        glue = tok.decode(runs[1][1], skip_special_tokens=False)
        assert glue == "\n<|im_start|>user\n<tool_response>\n1081\n</tool_response><|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
        assert set(s.token_versions) == {3} and s.status == "completed"
        assert [c["function"]["name"] for c in s.tool_calls] == ["calculator", "calculator"]
        validate_batch(samples_to_batch([s]))
    # each call's prompt was the trajectory so far (the agent's history joined at token level)
    seq = list(samples[0].prompt_ids) + samples[0].response_ids
    for r in engine.requests[:3]:
        assert list(r.prompt_token_ids) == seq[: len(r.prompt_token_ids)]


def test_rewritten_history_restarts_the_sequence(tok: Any) -> None:
    engine = ScriptedEngine(tok, ["Hi there." + EOS, "Second." + EOS])

    def rewriting_agent(base_url: str, episode_id: str) -> float:
        client = openai.OpenAI(base_url=base_url, api_key="-")
        first = client.chat.completions.create(model="t", messages=[{"role": "user", "content": "hello"}])
        assert first.choices[0].finish_reason == "stop"
        client.chat.completions.create(model="t", messages=[{"role": "user", "content": "hello"},
                                                            {"role": "assistant", "content": "something else"},
                                                            {"role": "user", "content": "again"}])
        return 0.0

    msgs = ({"role": "user", "content": "hello"},)
    text = tok.apply_chat_template(list(msgs), tokenize=False, add_generation_prompt=True, enable_thinking=False)
    prompt = Prompt(1, "t-1", tuple(tok(text, add_special_tokens=False)["input_ids"]), text, msgs, None, "non_think", None, {}, None)

    async def main():
        pool = EnginePool([engine], max_in_flight=8, weight_timeout_s=10)
        ep = AgentEndpoint(pool, tok, SamplingParams(max_new_tokens=32))
        await ep.start()
        try:
            runner = AgentFnEpisodes(rewriting_agent, "t:a", tok, lambda k: 1, ep, timeout_s=60)
            return await runner.run_group(engine, prompt, "g", 1, SamplingParams(max_new_tokens=32))
        finally:
            await ep.stop()

    (s,) = asyncio.run(main())
    assert s.metadata["agent"]["endpoint_rebases"] == 1 and s.metadata["episode_reward"] == 0.0
    # the first reply is context now (not trained on); only the second reply carries loss
    second = tok("Second." + EOS, add_special_tokens=False)["input_ids"]
    assert [t for t, m in zip(s.response_ids, s.loss_mask) if m] == second
    assert tok.decode(s.response_ids, skip_special_tokens=False).startswith("<|im_end|>") is False
    assert "something else" in s.response and s.response.endswith("Second.")
