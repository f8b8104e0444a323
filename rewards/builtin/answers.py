"""Answer-matching rewards: exact match, normalised match, and math answers.

All three compare the text after the reasoning block (``</think>``) to ``sample.label``;
a sample without a label is an error (the runner marks it failed).
"""

from __future__ import annotations

import importlib.util
import threading
from typing import Any

from slime_rl.buffers.schema import Mode, Sample
from slime_rl.rewards.builtin.text import (
    THINK_CLOSE,
    answers_equal,
    extract_answer,
    final_text,
    normalize_text,
)


def _label(sample: Sample) -> str:
    if sample.label is None:
        raise ValueError(
            f"sample {sample.sample_id} has no label; answer-matching rewards need the dataset's label column"
        )
    return sample.label


def answer_text(sample: Sample) -> str:
    """The answer part of the response: after ``</think>``; empty for a think-mode sample
    whose reasoning never closed (truncated), so numbers inside reasoning never count."""
    if sample.mode == Mode.THINK.value and THINK_CLOSE not in sample.response:
        return ""
    return final_text(sample.response)


def exact_match(sample: Sample, *, strip: bool = True) -> float:
    """1.0 when the final answer text equals the label (surrounding whitespace ignored)."""
    label, text = _label(sample), answer_text(sample)
    if strip:
        label, text = label.strip(), text.strip()
    return float(text == label)


def normalized_match(sample: Sample, *, contains: bool = False) -> float:
    """1.0 when the answer equals the label after normalisation (case, punctuation, articles,
    spaces); with ``contains`` the normalised label may appear anywhere in the answer."""
    label = normalize_text(_label(sample))
    text = normalize_text(answer_text(sample))
    if contains:
        return float(bool(label) and f" {label} " in f" {text} ")
    return float(text == label)


def _math_verify_equal(pred: str, gold: str, timeout_s: int) -> bool:
    try:
        from math_verify import parse, verify
    except ImportError as e:
        raise ImportError("install slime-rl[math] to use math_answer(use_math_verify=True)") from e
    # math-verify's own timeouts use SIGALRM, which works only in a main thread: the case in a
    # reward worker process (reward.executor=process). In a worker thread they are off and
    # nothing can stop a runaway sympy call: that thread stays busy until it returns.
    limit = timeout_s if threading.current_thread() is threading.main_thread() else None
    gold_p = parse(f"${gold}$", parsing_timeout=limit)
    pred_p = parse(f"${pred}$", parsing_timeout=limit)
    return bool(gold_p and pred_p and verify(gold_p, pred_p, timeout_seconds=limit))


def math_answer(
    sample: Sample, *, use_math_verify: str | bool = "auto", math_verify_timeout_s: int = 5
) -> dict[str, Any]:
    """1.0 when the response's answer (last ``\\boxed{}``, "the answer is X", else the last
    number) equals the label. In think mode only the text after ``</think>`` counts.

    Numbers compare by value (``42 == 42.0 == \\frac{84}{2}``). With the ``math`` extra
    installed (``use_math_verify="auto"``) or ``use_math_verify=True``, math-verify decides
    symbolic equality; ``False`` never uses it. The ``extracted`` metric is 1.0 when an
    answer was found at all (a format signal). Run it with ``reward.executor: process`` when
    math-verify is on: its ``math_verify_timeout_s`` applies there (main thread of a worker
    process), and a call past ``reward.timeout_s`` is killed rather than pinning a thread.
    """
    gold = _label(sample).strip()
    pred = extract_answer(answer_text(sample))
    if pred is None:
        return {"score": 0.0, "extracted": 0.0}
    if use_math_verify == "auto":
        use_math_verify = importlib.util.find_spec("math_verify") is not None
    correct = answers_equal(pred, gold)
    if not correct and use_math_verify:
        correct = _math_verify_equal(pred, gold, math_verify_timeout_s)
    return {"score": float(correct), "extracted": 1.0}
