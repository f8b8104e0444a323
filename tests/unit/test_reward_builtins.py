"""Built-in text rewards: exact / normalised / math answers, think format, DAPO overlong penalty."""

from __future__ import annotations

import sys
import threading
import types

import pytest
from slime_rl.buffers.schema import Sample
from slime_rl.rewards import RewardLoadError, load_reward
from slime_rl.rewards.builtin import (
    exact_match,
    math_answer,
    normalized_match,
    overlong_penalty,
    think_format,
)
from slime_rl.rewards.builtin.text import extract_answer, last_boxed


def _s(response: str, label: str | None = "42", mode: str = "non_think", prompt: str = "", n_tokens: int = 3) -> Sample:
    return Sample("g0-0", "g0", [1], list(range(n_tokens)), response=response, label=label, mode=mode, prompt=prompt)


def test_exact_match_compares_answer_after_reasoning_block():
    assert exact_match(_s(" 42\n")) == 1.0
    assert exact_match(_s("<think>6*7</think>42", mode="think")) == 1.0
    assert exact_match(_s("42.")) == 0.0
    assert exact_match(_s("Paris", label="paris")) == 0.0


def test_normalized_match_ignores_case_punctuation_articles():
    assert normalized_match(_s("The  Eiffel tower!", label="eiffel Tower")) == 1.0
    assert normalized_match(_s("It is the Eiffel Tower.", label="Eiffel tower")) == 0.0
    assert normalized_match(_s("It is the Eiffel Tower.", label="Eiffel tower"), contains=True) == 1.0
    assert normalized_match(_s("Tower Eiffel", label="eiffel tower"), contains=True) == 0.0


@pytest.mark.parametrize(
    ("response", "label", "score", "extracted"),
    [
        ("Sam has 23 + 19 = 42 apples, so the answer is 42", "42", 1.0, 1.0),
        ("\\boxed{42}", "42", 1.0, 1.0),
        ("<think>23 + 19 = 42, no wait 41</think> The answer is 41.", "42", 0.0, 1.0),
        ("first 42 then \\boxed{7}", "42", 0.0, 1.0),
        ("the answer is -3", "-3", 1.0, 1.0),
        ("so 84/2 items, i.e. 42.0", "42", 1.0, 1.0),
        ("\\boxed{\\frac{1}{2}}", "0.5", 1.0, 1.0),
        ("It is 1,000 coins", "1000", 1.0, 1.0),
        ("the answer is 42 apples (from 40 + 2)", "42", 1.0, 1.0),
        ("so the answer is 3x+2", "3", 0.0, 1.0),
        ("the answer is 3 + 2 = 5", "3", 0.0, 1.0),
        ("the answer is 3^2", "3", 0.0, 1.0),
        ("the answer is 3.", "3", 1.0, 1.0),
        ("I do not know", "42", 0.0, 0.0),
    ],
)
def test_math_answer_on_arith_style_responses(response, label, score, extracted):
    out = math_answer(_s(response, label=label), use_math_verify=False)
    assert out == {"score": score, "extracted": extracted}


def test_math_answer_without_label_raises_naming_the_sample():
    with pytest.raises(ValueError, match="sample g0-0 has no label"):
        math_answer(_s("42", label=None))


def test_math_answer_uses_math_verify_when_asked(monkeypatch):
    calls = []
    fake = types.ModuleType("math_verify")
    fake.parse = lambda text, parsing_timeout=5: calls.append(("parse", text, parsing_timeout)) or [text]
    fake.verify = lambda gold, pred, timeout_seconds=5: calls.append(("verify", timeout_seconds)) or True
    monkeypatch.setitem(sys.modules, "math_verify", fake)
    out = math_answer(_s("\\boxed{x^2+2x+1}", label="(x+1)^2"), use_math_verify=True, math_verify_timeout_s=3)
    assert out["score"] == 1.0
    # The main thread (a reward worker process) keeps math-verify's own SIGALRM timeouts ...
    assert ("parse", "$(x+1)^2$", 3) in calls and ("verify", 3) in calls
    calls.clear()
    # ... a worker thread cannot use SIGALRM, so they are off there.
    worker = threading.Thread(target=math_answer, args=(_s("\\boxed{x^2+2x+1}", label="(x+1)^2"),),
                              kwargs={"use_math_verify": True})
    worker.start()
    worker.join()
    assert ("parse", "$(x+1)^2$", None) in calls and ("verify", None) in calls


def test_math_answer_explains_missing_math_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "math_verify", None)  # import fails
    with pytest.raises(ImportError, match=r"install slime-rl\[math\]"):
        math_answer(_s("\\boxed{x}", label="y"), use_math_verify=True)


def test_answer_extraction_helpers():
    assert last_boxed("\\boxed{a} and \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{unclosed") is None
    assert extract_answer("the answer is: $12$.") == "12"


@pytest.mark.parametrize(
    ("response", "mode", "prompt", "ok"),
    [
        ("<think>23+19=42</think>The answer is 42", "think", "", True),
        ("23+19=42</think>The answer is 42", "think", "user: q\nassistant: <think>\n", True),
        ("23+19=42</think>The answer is 42", "think", "", False),
        ("The answer is 42", "think", "", False),
        ("<think></think>The answer is 42", "think", "", False),
        ("<think>x</think>", "think", "", False),
        ("<think>a</think><think>b</think>42", "think", "", False),
        ("The answer is 42", "non_think", "", True),
        ("<think>\n\n</think>\n\nThe answer is 42", "non_think", "", True),
        ("<think>hmm</think>42", "non_think", "", False),
        ("42 </think>", "non_think", "", False),
    ],
)
def test_think_format(response, mode, prompt, ok):
    out = think_format(_s(response, mode=mode, prompt=prompt), penalty=-1.0)
    assert out["score"] == (1.0 if ok else -1.0)
    assert ("format_error" in out) == (not ok)


def test_think_format_refuses_a_block_nested_in_one_the_prompt_opened():
    # The template opened <think> at the end of the prompt; the response opens a second one
    # inside it: a doubled block like any other, so it scores as malformed.
    nested = _s("<think>23+19=42</think>The answer is 42", mode="think", prompt="user: q\nassistant: <think>\n")
    out = think_format(nested, penalty=-1.0)
    assert out == {"score": -1.0, "format_error": "think mode: expected exactly one <think>...</think> block"}


def test_think_format_empty_block_can_be_refused_in_non_think_mode():
    out = think_format(_s("<think></think>42"), allow_empty_block=False)
    assert out == {"score": 0.0, "format_error": "non-think mode: the response contains a reasoning block"}


@pytest.mark.parametrize(("n_tokens", "expected"), [(10, 0.0), (12, 0.0), (14, -0.5), (16, -1.0), (30, -1.0)])
def test_overlong_penalty_soft_ramp(n_tokens, expected):
    out = overlong_penalty(_s("x", n_tokens=n_tokens), max_response_len=16, overlong_buffer=4)
    assert out["score"] == pytest.approx(expected)
    assert out["response_len"] == n_tokens


def test_overlong_penalty_rejects_bad_buffer_at_load_time():
    with pytest.raises(RewardLoadError, match=r"reward.fn='overlong_penalty': bad kwargs: .*overlong_buffer=0 must be in"):
        load_reward("overlong_penalty", {"max_response_len": 16, "overlong_buffer": 0})
    with pytest.raises(RewardLoadError, match="overlong_buffer=32 must be in"):
        load_reward("overlong_penalty", {"max_response_len": 16, "overlong_buffer": 32})
    comp = load_reward("overlong_penalty", {"max_response_len": 16, "overlong_buffer": 4})
    assert comp.fn(_s("x", n_tokens=14), **comp.kwargs)["score"] == pytest.approx(-0.5)


def test_truncated_reasoning_has_no_answer_in_think_mode():
    truncated = _s("<think>23 + 19 = 42 so", mode="think")
    assert math_answer(truncated, use_math_verify=False) == {"score": 0.0, "extracted": 0.0}
    assert exact_match(_s("<think>42", mode="think", label="<think>42")) == 0.0
    # Opened in the prompt (Qwen3-style template), closed in the response: the answer counts.
    opened = _s("23 + 19 = 42</think>The answer is 42", mode="think", prompt="<think>\n")
    assert math_answer(opened, use_math_verify=False)["score"] == 1.0
