"""Hub environments (verifiers, OpenEnv) run as written through the endpoint: the real packages
from the `envs` extra, a scripted engine (no Ray): rubric terms, token-exact trajectories and masks,
per-sample failures, one-line start-up errors."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from slime_rl.rollout.data import Prompt
from slime_rl.rollout.engine_pool import EnginePool
from slime_rl.rollout.engines.base import (
    FinishReason,
    GenerateRequest,
    GenerateResult,
    SamplingParams,
)
from slime_rl.rollout.hubs import HubLoadError, load_hub
from slime_rl.rollout.hubs.episode import HubEpisodes, env_reward
from slime_rl.rollout.openai_server import AgentEndpoint

vf = pytest.importorskip("verifiers", reason="install slime-rl[envs]")
pytest.importorskip("openenv.core", reason="install slime-rl[envs]")
pytestmark = pytest.mark.timeout(180)

EOS = "<|im_end|>"
CALL = '<tool_call>\n{{"name": "calculator", "arguments": {{"expression": "{}"}}}}\n</tool_call>'

SINGLE = '''
import verifiers as vf
from datasets import Dataset

def load_environment(num_examples: int = 2):
    rows = [{"question": f"What is {i} + 1?", "answer": str(i + 1), "info": {"i": i}} for i in range(num_examples)]
    parser = vf.Parser(extract_fn=lambda t: t.rsplit("answer is", 1)[-1].strip(" .") if "answer is" in t else None)
    def correct(completion, answer, parser) -> float:
        return 1.0 if parser.parse_answer(completion) == answer else 0.0
    def knows_info(info) -> float:
        return float(info["i"])
    rubric = vf.Rubric(funcs=[correct, knows_info], weights=[1.0, 0.5], parser=parser)
    return vf.SingleTurnEnv(dataset=Dataset.from_list(rows), system_prompt="Answer.", parser=parser, rubric=rubric)
'''

TOOL = '''
import verifiers as vf
from datasets import Dataset

def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression."""
    return str(eval(expression, {"__builtins__": {}}))

def load_environment():
    parser = vf.Parser(extract_fn=lambda t: t.rsplit("answer is", 1)[-1].strip(" .") if "answer is" in t else None)
    def correct(completion, answer, parser) -> float:
        return 1.0 if parser.parse_answer(completion) == answer else 0.0
    ds = Dataset.from_list([{"question": "What is 23 * 47 + 5?", "answer": "1086"}])
    return vf.ToolEnv(dataset=ds, tools=[calculator], max_turns=4, parser=parser, rubric=vf.Rubric(funcs=[correct], parser=parser))
'''

FLAKY = '''
import asyncio
import verifiers as vf
from datasets import Dataset

class Flaky(vf.SingleTurnEnv):
    calls = 0
    async def rollout(self, input, client, model, sampling_args=None):
        Flaky.calls += 1
        first = Flaky.calls == 1
        if self.mode == "raise" and first:
            raise RuntimeError("the judge is down")
        if self.mode == "hang" and first:
            await asyncio.sleep(60)
        state = await super().rollout(input, client, model, sampling_args)
        if self.mode == "malformed" and first:
            return ["not", "a", "state"]
        return state

def load_environment(mode: str = "raise"):
    ds = Dataset.from_list([{"question": "Hi?", "answer": "x"}])
    env = Flaky(dataset=ds, rubric=vf.Rubric(funcs=[lambda completion: 1.0]))
    env.mode = mode
    return env
'''

ECHO = '''
from typing import Any
from openenv.core.env_server.interfaces import Environment
from openenv.core.env_server.types import Action, Observation, State

class EchoAction(Action):
    message: str

class EchoObservation(Observation):
    echoed: str = ""

class EchoEnv(Environment[EchoAction, EchoObservation, State]):
    SUPPORTS_CONCURRENT_SESSIONS = True

    def __init__(self, steps: int = 2, fail_on: str = ""):
        super().__init__()
        self.steps, self.fail_on, self._state = steps, fail_on, State(step_count=0)

    def reset(self, seed=None, episode_id=None, label=None, **kw: Any) -> EchoObservation:
        self._state = State(episode_id=episode_id, step_count=0)
        return EchoObservation(echoed=f"Say something (label {label}).", reward=0.0)

    def step(self, action: EchoAction, timeout_s=None, **kw: Any) -> EchoObservation:
        if self.fail_on and self.fail_on in action.message:
            raise ValueError("cannot echo that")
        self._state.step_count += 1
        return EchoObservation(echoed=f"echo: {action.message}", reward=0.25, done=self._state.step_count >= self.steps)

    @property
    def state(self) -> State:
        return self._state
'''


class ScriptedEngine:
    """Reply k (k = assistant prompts in the request - 1) is `script[k]`, tokenised; or a per-call
    function of the decoded prompt."""

    name = "scripted"

    def __init__(self, tok: Any, script: Sequence[str] | Any) -> None:
        self.tok, self.script, self.requests, self.outputs = tok, script, [], []

    async def generate_group(self, requests: Sequence[GenerateRequest]) -> list[GenerateResult]:
        out = []
        for r in requests:
            self.requests.append(r)
            text = self.tok.decode(list(r.prompt_token_ids), skip_special_tokens=False)
            if callable(self.script):
                reply = self.script(text)
            else:
                k = text.count("<|im_start|>assistant") - 1
                reply = self.script[min(k, len(self.script) - 1)]
            ids = self.tok(reply, add_special_tokens=False)["input_ids"]
            self.outputs.append(ids)
            out.append(GenerateResult(r.request_id, ids, [-0.5] * len(ids), FinishReason.STOP, [3] * len(ids), 3, 3))
        return out

    async def version(self) -> int:
        return 3

    async def info(self) -> dict[str, Any]:
        return {"max_model_len": 1024}


@pytest.fixture(scope="module")
def tok():
    from slime_rl.tiny import build_tokenizer

    return build_tokenizer()


def _prompt(tok: Any, messages: list[dict[str, Any]], label: str | None, mode: str = "non_think", **meta: Any) -> Prompt:
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=mode == "think")
    return Prompt(1, "train-1", tuple(tok(text, add_special_tokens=False)["input_ids"]), text, tuple(messages), label, mode, None, meta, None)


def _run(tok: Any, engine: ScriptedEngine, ref: str, kwargs: dict[str, Any], prompt: Prompt, n: int = 2,
         max_model_len: int = 0, **limits: Any):
    async def main():
        pool = EnginePool([engine], max_in_flight=8, weight_timeout_s=10)
        ep = AgentEndpoint(pool, tok, SamplingParams(max_new_tokens=64), seed_fn=lambda k: 7, max_model_len=max_model_len)
        await ep.start()
        hub = load_hub(ref, kwargs)
        for k, v in limits.items():
            setattr(hub, k, v)
        runner = HubEpisodes(hub, tok, lambda k: 7, ep)
        try:
            return await runner.run_group(engine, prompt, "g0", n, SamplingParams(max_new_tokens=64))
        finally:
            await runner.close()

    return asyncio.run(main())


def _runs(sample: Any) -> list[tuple[int, list[int]]]:
    mask, ids, runs, start = sample.loss_mask, sample.response_ids, [], 0
    for i in range(1, len(mask) + 1):
        if i == len(mask) or mask[i] != mask[start]:
            runs.append((mask[start], ids[start:i]))
            start = i
    return runs


def test_verifiers_single_turn_rubric_terms_and_engine_tokens(tok: Any, tmp_path: Path) -> None:
    (tmp_path / "single_env.py").write_text(SINGLE)
    hub = load_hub(f"verifiers:{tmp_path / 'single_env.py'}", {})
    rows = hub.dataset_rows()
    assert rows[1]["prompt"][0] == {"role": "system", "content": "Answer."} and rows[1]["label"] == "2" and rows[1]["info"] == {"i": 1}
    engine = ScriptedEngine(tok, lambda text: "<think>\nhmm\n</think>\n\nThe answer is 2." + EOS)
    prompt = _prompt(tok, rows[1]["prompt"], "2", mode="think", info={"i": 1}, example_id=1)
    samples = _run(tok, engine, f"verifiers:{tmp_path / 'single_env.py'}", {}, prompt)
    assert len(samples) == 2
    for s in samples:
        assert s.status == "completed" and s.metadata["episode_reward"] == 1.5  # 1.0 x correct + 0.5 x info["i"]
        assert s.metadata["reward_terms"] == {"correct": 1.0, "knows_info": 1.0, "num_turns": 1.0}  # + verifiers' own metric
        assert env_reward(s) == {"score": 1.5, "correct": 1.0, "knows_info": 1.0, "num_turns": 1.0}
        assert s.loss_mask == [1] * len(s.response_ids) and s.response_ids == engine.outputs[0]  # exactly the engine's tokens
    sent = tok.decode(list(engine.requests[0].prompt_token_ids), skip_special_tokens=False)
    assert sent.endswith("<|im_start|>assistant\n") and "<think>\n\n</think>" not in sent  # think mode: enable_thinking=True


def test_verifiers_tool_env_multi_turn_masks_tool_results(tok: Any, tmp_path: Path) -> None:
    (tmp_path / "tool_env.py").write_text(TOOL)
    script = [CALL.format("23 * 47") + EOS, CALL.format("1081 + 5") + EOS, "The answer is 1086." + EOS]
    engine = ScriptedEngine(tok, script)
    prompt = _prompt(tok, [{"role": "user", "content": "What is 23 * 47 + 5?"}], "1086")
    (s,) = _run(tok, engine, f"verifiers:{tmp_path / 'tool_env.py'}", {}, prompt, n=1)
    assert s.status == "completed" and s.metadata["episode_reward"] == 1.0
    assert s.metadata["agent"]["turns"] == 3 and s.metadata["agent"]["endpoint_rebases"] == 0
    runs = _runs(s)
    assert [m for m, _ in runs] == [1, 0, 1, 0, 1]
    assert [r for m, r in runs if m] == [tok(t, add_special_tokens=False)["input_ids"] for t in script]
    assert "<tool_response>\n1081\n</tool_response>" in tok.decode(runs[1][1], skip_special_tokens=False)
    assert s.metadata["reward_terms"]["calculator_calls"] == 2.0  # ToolEnv's own metrics travel as terms
    seq = list(s.prompt_ids) + s.response_ids  # every call's prompt was the trajectory so far
    for r in engine.requests:
        assert list(r.prompt_token_ids) == seq[: len(r.prompt_token_ids)]


@pytest.mark.parametrize("mode,error", [("raise", "env.rollout raised RuntimeError: the judge is down"),
                                        ("hang", "did not finish within 2 s"),
                                        ("malformed", "malformed state")])
def test_a_failing_verifiers_env_fails_only_its_sample(tok: Any, tmp_path: Path, mode: str, error: str) -> None:
    (tmp_path / f"flaky_{mode}.py").write_text(FLAKY)
    ref = f"verifiers:{tmp_path / f'flaky_{mode}.py'}"
    engine = ScriptedEngine(tok, ["Fine." + EOS])
    prompt = _prompt(tok, [{"role": "user", "content": "Hi?"}], "x")
    samples = _run(tok, engine, ref, {"mode": mode}, prompt, n=2, episode_timeout_s=2.0)
    bad, good = sorted(samples, key=lambda s: s.status != "failed")
    assert bad.status == "failed" and error in bad.metadata["env_error"] and bad.metadata["env_error"].startswith(ref)
    assert bad.metadata["agent"]["env_errors"] == 1 and "episode_reward" not in bad.metadata
    with pytest.raises(ValueError, match="the environment failed"):
        env_reward(bad)
    assert good.status == "completed" and good.metadata["episode_reward"] == 1.0


@pytest.mark.parametrize("transport", ["inprocess", "http"])
def test_openenv_message_is_action_observation_is_next_turn(tok: Any, tmp_path: Path, transport: str) -> None:
    (tmp_path / "echo_env.py").write_text(ECHO)
    engine = ScriptedEngine(tok, ["hello" + EOS, "again" + EOS, "never" + EOS])
    prompt = _prompt(tok, [{"role": "user", "content": "Play."}], "7")
    ref = f"openenv:{tmp_path / 'echo_env.py'}:EchoEnv"
    samples = _run(tok, engine, ref, {"steps": 2, "transport": transport}, prompt, n=2)
    for s in samples:
        assert s.status == "completed" and s.metadata["episode_reward"] == 0.5 and s.metadata["turn_rewards"] == [0.25, 0.25]
        assert s.metadata["hub"]["stop"] == "done" and s.metadata["agent"]["turns"] == 2
        runs = _runs(s)
        assert [m for m, _ in runs] == [1, 0, 1]
        assert "echo: hello" in tok.decode(runs[1][1], skip_special_tokens=False)
        assert "Say something (label 7)." in s.prompt  # reset's observation is the first user turn


def test_openenv_step_that_raises_fails_only_its_sample(tok: Any, tmp_path: Path) -> None:
    (tmp_path / "echo_env.py").write_text(ECHO)
    calls = {"n": 0}

    def reply(text: str) -> str:
        calls["n"] += 1
        return ("boom" if calls["n"] == 1 else "fine") + EOS

    prompt = _prompt(tok, [{"role": "user", "content": "Play."}], "7")
    samples = _run(tok, ScriptedEngine(tok, reply), f"openenv:{tmp_path / 'echo_env.py'}:EchoEnv", {"steps": 1, "fail_on": "boom"}, prompt)
    bad, good = sorted(samples, key=lambda s: s.status != "failed")
    assert bad.status == "failed" and "step raised ValueError: cannot echo that" in bad.metadata["env_error"]
    assert good.status == "completed" and good.metadata["episode_reward"] == 0.25


def test_start_up_errors_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "single_env.py").write_text(SINGLE)
    (tmp_path / "echo_env.py").write_text(ECHO)
    cases = {
        "verifiers:no-such-env-xyz": ({}, "no installed verifiers environment 'no-such-env-xyz'"),
        f"verifiers:{tmp_path / 'single_env.py'}": ({"bogus": 1}, "do not fit"),
        f"verifiers:{tmp_path / 'nope.py'}": ({}, "no file"),
        f"openenv:{tmp_path / 'echo_env.py'}:Nope": ({}, "Nope"),
        f"openenv:{tmp_path / 'echo_env.py'}:EchoEnv": ({"colour": "red"}, "cannot build EchoEnv"),
        "openenv:": ({}, "expected verifiers:"),
    }
    for ref, (kwargs, expected) in cases.items():
        with pytest.raises(HubLoadError) as e:
            load_hub(ref, kwargs)
        assert expected in str(e.value) and "\n" not in str(e.value), (ref, str(e.value))
    import slime_rl.rollout.hubs as hubs

    monkeypatch.setitem(hubs._PACKAGES, "verifiers", ("verifiers_not_installed_xyz", "verifiers"))
    with pytest.raises(HubLoadError, match=r"needs the 'verifiers' package, .* install it with `pip install 'slime-rl\[envs\]'`"):
        load_hub("verifiers:anything", {})


def test_preflight_writes_the_env_dataset_and_adds_env_reward(tmp_path: Path, tiny_model_dir: Path) -> None:
    from slime_rl.config import load_config
    from slime_rl.preflight import PreflightError, run_preflight

    (tmp_path / "single_env.py").write_text(SINGLE)
    base = [f"model.path={tiny_model_dir}", f"run.output_dir={tmp_path / 'runs'}", "run.name=vf",
            f"rollout.environment=verifiers:{tmp_path / 'single_env.py'}"]
    cfg = load_config(None, base + ["reward.fn=slime_rl.rewards.builtin:think_format"])
    run_preflight(cfg)
    rows = [json.loads(line) for line in Path(cfg.data.train_path).read_text().splitlines()]
    assert cfg.data.train_path == str(tmp_path / "runs" / "vf" / "env_data" / "train.jsonl") and len(rows) == 2
    assert rows[0]["label"] == "1" and rows[0]["info"] == {"i": 0}
    assert [t.fn.rsplit(":", 1)[-1] for t in cfg.reward.combine] == ["env_reward", "think_format"]  # reward.fn adds a term
    cfg = load_config(None, base + ["rollout.environment_kwargs={num_examples: 1, typo: 2}"])
    with pytest.raises(PreflightError) as e:
        run_preflight(cfg)
    assert "typo" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(Exception, match="data.train_path is required"):
        load_config(None, [f"model.path={tiny_model_dir}", "rollout.environment=calculator"])


def test_verifiers_env_loads_off_the_main_thread_and_keeps_signals(tmp_path: Path) -> None:
    """The rollout actor builds environments off the main thread; verifiers' SIGINT/SIGTERM handlers
    would fail there (and take the process's shutdown from Ray), so they are not installed."""
    import signal
    import threading

    (tmp_path / "single_env.py").write_text(SINGLE)
    before = signal.getsignal(signal.SIGTERM)
    out: dict[str, Any] = {}
    t = threading.Thread(target=lambda: out.update(hub=load_hub(f"verifiers:{tmp_path / 'single_env.py'}", {})))
    t.start()
    t.join(60)
    assert type(out["hub"].env).__name__ == "SingleTurnEnv" and signal.getsignal(signal.SIGTERM) == before


def test_openenv_episode_that_fills_the_context_is_truncated_not_failed(tok: Any, tmp_path: Path) -> None:
    (tmp_path / "echo_env.py").write_text(ECHO)
    prompt = _prompt(tok, [{"role": "user", "content": "Play."}], "7")
    first = tok.apply_chat_template([{"role": "user", "content": "Play."}, {"role": "user", "content": "Say something (label 7)."}],
                                    tokenize=False, add_generation_prompt=True, enable_thinking=False)
    limit = len(tok(first, add_special_tokens=False)["input_ids"]) + 5  # room for the first reply only
    (s,) = _run(tok, ScriptedEngine(tok, ["hello " * 10 + EOS]), f"openenv:{tmp_path / 'echo_env.py'}:EchoEnv",
                {"steps": 3}, prompt, n=1, max_model_len=limit)
    assert s.status == "truncated" and s.metadata["hub"]["stop"] == "context" and s.metadata["episode_reward"] == 0.25
