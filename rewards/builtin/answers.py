"""Answer-matching rewards: exact match, normalised match, and math answers.

All three compare the text after the reasoning block (``</think>``) to ``sample.label``;
a sample without a label is an error (the runner marks it failed).
"""

from __future__ import annotations

import logging
import re
import threading
import unicodedata
from typing import Any

from slime_rl.buffers.schema import Mode, Sample
from slime_rl.rewards.builtin.answer_forms import normalize_unicode, numbers_equal
from slime_rl.rewards.builtin.text import (
    THINK_CLOSE,
    answers_equal,
    extract_answer,
    final_text,
    last_boxed,
    normalize_text,
)
from slime_rl.rewards.protocol import checked_by

logger = logging.getLogger(__name__)


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
    """1.0 when the answer equals the label after normalisation (NFKC, case, punctuation of any
    script, articles, spaces): ``Ｐａｒｉｓ！`` and ``北京。`` match ``paris`` and ``北京``. With
    ``contains`` the normalised label may appear anywhere in the answer: as whole words, or
    anywhere for scripts written without spaces (``北京`` in ``答案是北京``)."""
    label = normalize_text(_label(sample))
    text = normalize_text(answer_text(sample))
    if contains:
        if any(unicodedata.category(ch) == "Lo" for ch in label):
            return float(label in text)  # CJK and similar scripts do not separate words by spaces
        return float(bool(label) and f" {label} " in f" {text} ")
    return float(text == label)


_MV_MAX_CHARS = 400
"""Longer predictions are not handed to math-verify in a thread (no timeout can stop it there)."""
_DIGITS_RE = re.compile(r"\d+")


def _exponent(expr: str, i: int) -> str:
    """The exponent that starts at ``expr[i]`` (after a ``^``): a braced group or one token,
    with a ``^`` that directly follows it (``2^2^100`` is a tower too)."""
    while i < len(expr) and expr[i] == " ":
        i += 1
    if i < len(expr) and expr[i] == "{":
        depth, end = 0, len(expr)
        for j in range(i, len(expr)):
            depth += {"{": 1, "}": -1}.get(expr[j], 0)
            if depth == 0:
                end = j + 1
                break
    else:
        m = re.match(r"\\[A-Za-z]+|\d+|.", expr[i:])
        end = i + (len(m.group(0)) if m else 0)
    return expr[i:end] + expr[end:].lstrip()[:1]


def too_costly_without_timeout(expr: str) -> bool:
    """True for predictions sympy may take minutes or gigabytes on: power towers
    (``9^{9^{9}}``), exponents of 10,000 or more, factorials of large or compound numbers,
    Knuth arrows, or more than 400 characters. In a thread nothing could interrupt that."""
    if len(expr) > _MV_MAX_CHARS or "\\uparrow" in expr:
        return True
    flat = expr.replace("**", "^")
    for i, ch in enumerate(flat):
        if ch != "^":
            continue
        exp = _exponent(flat, i + 1)
        if "^" in exp or "!" in exp or any(len(d) > 4 for d in _DIGITS_RE.findall(exp)):
            return True
    return re.search(r"(?:\d{5,}|[)}\]])\s*!|!\s*!", flat) is not None


def _math_verify_equal(pred: str, gold: str, timeout_s: int) -> bool:
    try:
        from math_verify import parse, verify
    except ImportError as e:
        raise ImportError(
            "math-verify is not installed (a slime-rl dependency): reinstall slime-rl or install "
            "slime-rl[math]; or pass math_answer(use_math_verify=False)"
        ) from e
    # math-verify's own timeouts use SIGALRM, which works only in a main thread: the case in a
    # reward worker process (reward.executor=process). In a worker thread they are off and
    # nothing can stop a runaway sympy call, so predictions that could run away are refused
    # there (scored as not equal) instead of pinning the thread.
    limit = timeout_s if threading.current_thread() is threading.main_thread() else None
    if limit is None and too_costly_without_timeout(pred):
        logger.debug("math_answer: not handing %.80r to math-verify without a timeout", pred)
        return False
    gold_p = parse(f"${gold}$", parsing_timeout=limit)
    pred_p = parse(f"${pred}$", parsing_timeout=limit)
    return bool(gold_p and pred_p and verify(gold_p, pred_p, timeout_seconds=limit))


def _check_math_answer(use_math_verify: bool | str = True, math_verify_timeout_s: int = 5) -> None:
    if use_math_verify not in (True, False, "auto"):
        raise ValueError(f"use_math_verify={use_math_verify!r}; allowed: true, false ('auto' means true)")
    if isinstance(math_verify_timeout_s, bool) or not isinstance(math_verify_timeout_s, int) or math_verify_timeout_s < 1:
        raise ValueError(
            f"math_verify_timeout_s={math_verify_timeout_s!r} must be a whole number of seconds >= 1 "
            "(math-verify's SIGALRM timeout counts whole seconds)"
        )


@checked_by(_check_math_answer)
def math_answer(
    sample: Sample, *, use_math_verify: bool | str = True, math_verify_timeout_s: int = 5
) -> dict[str, Any]:
    """1.0 when the response's answer (last ``\\boxed{}``, "the answer is X", else the last
    number) equals the label. In think mode only the text after ``</think>`` counts.

    Checks, cheapest first: two plain numbers compare exactly, whatever their dress
    (``9{,}500 == 9500``, ``-\\frac12 == -0.5``, ``\\$9,500``, ``5\\text{ cm}``, ``50\\%``, full-width
    digits, ``−``; see :func:`~.answer_forms.parse_number`), and that decides. Otherwise the
    answers compare as text without typesetting, then math-verify decides symbolic equality
    (``(x+1)^2 == x^2+2x+1``) unless ``use_math_verify=False``. The ``extracted`` metric is 1.0
    when an answer was found at all (a format signal).

    math-verify's ``math_verify_timeout_s`` applies in a main thread, i.e. with
    ``reward.executor: process`` (and there a call past ``reward.timeout_s`` is killed). In a
    worker thread it has no timeout, so predictions that could make sympy run away
    (:func:`too_costly_without_timeout`) score 0 there without being handed to it.
    """
    gold = _label(sample).strip()
    gold = normalize_unicode(last_boxed(gold) or gold)
    pred = extract_answer(answer_text(sample))
    if pred is None:
        return {"score": 0.0, "extracted": 0.0}
    correct = numbers_equal(pred, gold)
    if correct is None:
        correct = answers_equal(pred, gold)
        if not correct and use_math_verify:
            correct = _math_verify_equal(pred, gold, math_verify_timeout_s)
    return {"score": float(correct), "extracted": 1.0}
