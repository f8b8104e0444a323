"""HTTP rewards against a local aiohttp server on 127.0.0.1: remote reward model and LLM judge."""

from __future__ import annotations

import asyncio
import contextlib
import json

import pytest
from aiohttp import web
from slime_rl.buffers.schema import Sample
from slime_rl.rewards import RewardRunner, load_reward
from slime_rl.rewards.builtin.http_client import HttpError
from slime_rl.rewards.builtin.judge import LLMJudge
from slime_rl.rewards.builtin.remote import RemoteRewardModel

pytestmark = pytest.mark.timeout(60)


@contextlib.asynccontextmanager
async def serve(handler, path: str):
    app = web.Application()
    app.router.add_post(path, handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def _samples(n: int) -> list[Sample]:
    return [Sample(f"g0-{i}", "g0", [1], [2], prompt=f"q{i}", response="r" * i, label=str(i)) for i in range(n)]


def test_remote_reward_model_sends_batches_and_returns_scores():
    batches = []

    async def handler(request):
        body = await request.json()
        assert all("tool_calls" in x for x in body["inputs"])
        batches.append([x["prompt"] for x in body["inputs"]])
        return web.json_response({"scores": [{"score": len(x["response"]), "conf": 0.9} for x in body["inputs"]]})

    async def go():
        async with serve(handler, "/score") as base:
            rm = RemoteRewardModel(url=f"{base}/score", batch_size=2)
            runner = RewardRunner([load_reward("remote_reward_model", {"url": f"{base}/score", "batch_size": 2})])
            direct = await rm(_samples(5))
            outcomes = await runner.score(_samples(3))
            await rm.aclose()
            await runner.aclose()
            return direct, outcomes

    direct, outcomes = asyncio.run(go())
    assert [d["score"] for d in direct] == [0, 1, 2, 3, 4]
    assert sorted(batches[:3]) == [["q0", "q1"], ["q2", "q3"], ["q4"]]
    assert [o.score for o in outcomes] == [0.0, 1.0, 2.0]
    assert outcomes[2].metrics == {"remote_reward_model/score": 2.0, "remote_reward_model/conf": 0.9}


def test_remote_reward_model_retries_transient_errors():
    attempts = 0

    async def flaky(request):
        nonlocal attempts
        attempts += 1
        if attempts <= 2:
            return web.Response(status=503, text="warming up")
        body = await request.json()
        return web.json_response([1.0] * len(body["inputs"]))

    async def go():
        async with serve(flaky, "/score") as base:
            rm = RemoteRewardModel(url=f"{base}/score", max_retries=3, backoff_s=0.01)
            try:
                return await rm(_samples(2))
            finally:
                await rm.aclose()

    assert asyncio.run(go()) == [1.0, 1.0]
    assert attempts == 3


def test_remote_reward_model_gives_up_with_a_clear_error():
    attempts = 0

    async def always_500(request):
        nonlocal attempts
        attempts += 1
        return web.Response(status=500, text="model crashed")

    async def bad_request(request):
        nonlocal attempts
        attempts += 1
        return web.Response(status=400, text="missing field inputs")

    async def go(handler):
        async with serve(handler, "/score") as base:
            rm = RemoteRewardModel(url=f"{base}/score", max_retries=2, backoff_s=0.01)
            try:
                await rm(_samples(1))
            finally:
                await rm.aclose()

    with pytest.raises(HttpError, match=r"failed after 3 attempts; last error: HTTP 500: model crashed"):
        asyncio.run(go(always_500))
    assert attempts == 3
    attempts = 0
    with pytest.raises(HttpError, match=r"HTTP 400: missing field inputs"):
        asyncio.run(go(bad_request))
    assert attempts == 1  # a client error is not retried


def test_remote_reward_model_timeout_marks_group_failed():
    async def slow(request):
        await asyncio.sleep(1.0)
        return web.json_response({"scores": [1.0, 1.0]})

    async def go():
        async with serve(slow, "/score") as base:
            comp = load_reward("remote_reward_model", {"url": f"{base}/score", "timeout_s": 0.2, "max_retries": 1, "backoff_s": 0.01})
            runner = RewardRunner([comp], timeout_s=10, default_score=-1.0)
            try:
                return await runner.score(_samples(2))
            finally:
                await runner.aclose()

    outcomes = asyncio.run(go())
    assert all(o.failed and o.score == -1.0 for o in outcomes)
    assert "failed after 2 attempts; last error: " in outcomes[0].error
    assert "Timeout" in outcomes[0].error


def _judge_handler(seen: list, reply_for):
    async def handler(request):
        body = await request.json()
        seen.append({"auth": request.headers.get("Authorization"), **body})
        content = reply_for(body["messages"][-1]["content"])
        return web.json_response({"choices": [{"message": {"role": "assistant", "content": content}}]})

    return handler


def test_llm_judge_scores_and_sends_openai_chat_request():
    seen: list = []

    def reply(prompt: str) -> str:
        return "Correct and clear.\nScore: 8" if "Response:\n42" in prompt else "Wrong.\nScore: **2**"

    async def go():
        async with serve(_judge_handler(seen, reply), "/v1/chat/completions") as base:
            judge = LLMJudge(base_url=f"{base}/v1", model="judge-model", api_key="sk-test", system_prompt="Be strict.")
            samples = [
                Sample("a", "g", [1], [2], prompt="6*7?", response="<think>6*7</think>42", label="42", mode="think"),
                Sample("b", "g", [1], [2], prompt="6*7?", response="41", label="42"),
            ]
            try:
                return [await judge(s) for s in samples]
            finally:
                await judge.aclose()

    good, bad = asyncio.run(go())
    assert good["score"] == pytest.approx(0.8) and good["raw_score"] == 8.0
    assert bad["score"] == pytest.approx(0.2)
    assert good["judge_reply"].startswith("Correct")
    req = seen[0]
    assert req["model"] == "judge-model" and req["temperature"] == 0.0
    assert req["auth"] == "Bearer sk-test"
    assert req["messages"][0] == {"role": "system", "content": "Be strict."}
    user = req["messages"][1]["content"]
    assert "Question:\n6*7?" in user and "Reference answer:\n42" in user and "<think>" not in user


def test_llm_judge_unparseable_reply_fails_the_sample():
    seen: list = []

    async def go():
        async with serve(_judge_handler(seen, lambda p: "I refuse to grade this."), "/v1/chat/completions") as base:
            comp = load_reward("llm_judge", {"base_url": f"{base}/v1", "model": "m"})
            runner = RewardRunner([comp])
            try:
                return await runner.score(_samples(1))
            finally:
                await runner.aclose()

    (outcome,) = asyncio.run(go())
    assert outcome.failed
    assert "judge reply has no score matching" in outcome.error and "I refuse" in outcome.error


def test_llm_judge_config_errors_at_load_time():
    with pytest.raises(ValueError, match=r"unknown field 'answer'"):
        load_reward("llm_judge", {"base_url": "http://127.0.0.1:1/v1", "model": "m", "prompt_template": "{answer}"})
    with pytest.raises(ValueError, match="needs one capture group"):
        load_reward("llm_judge", {"base_url": "http://127.0.0.1:1/v1", "model": "m", "score_regex": "score"})


def test_sample_payload_is_json_serialisable_and_carries_tool_calls():
    from slime_rl.rewards.builtin.remote import sample_payload

    calls = [{"name": "calculator", "arguments": {"expr": "6*7"}, "result": "42"}]
    s = Sample("a", "g", [1], [2], prompt="p", response="r", label="1",
               messages=[{"role": "user", "content": "p"}], tool_calls=calls)
    payload = json.loads(json.dumps(sample_payload(s)))
    assert payload["messages"][0]["role"] == "user"
    assert payload["tool_calls"] == calls


def test_llm_judge_queueing_behind_max_concurrency_does_not_count_against_the_timeout():
    async def slow_judge(request):
        await asyncio.sleep(0.2)
        return web.json_response({"choices": [{"message": {"content": "Score: 10"}}]})

    async def go():
        async with serve(slow_judge, "/v1/chat/completions") as base:
            comp = load_reward("llm_judge", {"base_url": f"{base}/v1", "model": "m", "max_concurrency": 1,
                                             "timeout_s": 0.5, "max_retries": 0})
            # 6 requests of 0.2 s through one connection slot take ~1.2 s, more than 0.6 s.
            runner = RewardRunner([comp], timeout_s=0.6)
            try:
                return await runner.score(_samples(6))
            finally:
                await runner.aclose()

    outcomes = asyncio.run(go())
    assert [o.error for o in outcomes] == [None] * 6
    assert [o.score for o in outcomes] == [1.0] * 6


def test_llm_judge_literal_api_key_warns_and_is_redacted_from_saved_config(caplog, monkeypatch):
    from slime_rl.rewards import RewardComponentConfig, RewardConfig
    from slime_rl.rewards.config import redacted

    monkeypatch.setenv("MY_JUDGE_KEY", "sk-from-env")
    with caplog.at_level("WARNING"):
        from_env = LLMJudge(base_url="http://127.0.0.1:1/v1", model="m", api_key_env="MY_JUDGE_KEY")
    assert caplog.text == "" and from_env.client.headers["Authorization"] == "Bearer sk-from-env"
    with caplog.at_level("WARNING"):
        literal = LLMJudge(base_url="http://127.0.0.1:1/v1", model="m", api_key="sk-literal")
    assert "api_key is given literally" in caplog.text and "api_key_env" in caplog.text
    assert "sk-literal" not in repr(literal)
    cfg = RewardConfig(combine=[RewardComponentConfig(
        fn="llm_judge", kwargs={"base_url": "http://x/v1", "model": "m", "api_key": "sk-literal", "api_key_env": "K",
                                "headers": {"Authorization": "Bearer sk-2"}},
    )])
    saved = redacted(cfg)
    assert saved.combine[0].kwargs["api_key"] == "***" and saved.combine[0].kwargs["api_key_env"] == "K"
    assert "sk-" not in repr(saved)
    assert cfg.combine[0].kwargs["api_key"] == "sk-literal"  # the original is untouched
