"""math_answer on the many forms of one answer (math-verify on by default, an exact numeric fast
path first), normalized_match on unicode text, and the cost of the common case."""

from __future__ import annotations

import threading
import time

import pytest
from slime_rl.buffers.schema import Sample
from slime_rl.rewards import RewardLoadError, load_reward
from slime_rl.rewards.builtin import math_answer, normalized_match
from slime_rl.rewards.builtin.answer_forms import normalize_unicode, parse_number
from slime_rl.rewards.builtin.answers import too_costly_without_timeout

pytestmark = pytest.mark.timeout(120)


def _s(response: str, label: str, mode: str = "non_think") -> Sample:
    return Sample("g0-0", "g0", [1], [2], response=response, label=label, mode=mode)


# (response, label, expected score). Rows marked NUM are plain numbers on both sides: the exact
# fast path decides them, so they must hold with use_math_verify=False as well.
NUM, SYM = "num", "sym"
ROWS = [
    # thousands separators
    ("\\boxed{9{,}500}", "9500", 1.0, NUM),
    ("The answer is 9,500.", "9500", 1.0, NUM),
    ("\\boxed{9\\,500}", "9500", 1.0, NUM),
    ("\\boxed{9 500}", "9,500", 1.0, NUM),
    ("\\boxed{1{,}000{,}000}", "1000000", 1.0, NUM),
    # currency and units
    ("The answer is \\$9,500.", "9500", 1.0, NUM),
    ("The answer is 9,500 dollars.", "9500", 1.0, NUM),
    ("\\boxed{\\$9{,}500}", "9500", 1.0, NUM),
    ("\\boxed{€20}", "20", 1.0, NUM),
    ("\\boxed{20\\text{ USD}}", "20", 1.0, NUM),
    ("\\boxed{5\\text{ cm}}", "5", 1.0, NUM),
    ("\\boxed{5\\,\\mathrm{kg}}", "5", 1.0, NUM),
    ("\\boxed{12cm}", "12", 1.0, NUM),
    ("\\boxed{90^\\circ}", "90", 1.0, NUM),
    ("The answer is 12 apples", "12", 1.0, NUM),
    ("The answer is 3 million people", "3000000", 1.0, NUM),
    ("The answer is 1 000 000", "1000000", 1.0, NUM),
    ("Final Answer: The final answer is $9,500$. I hope it is correct.", "9500", 1.0, NUM),
    ("The answer is: **9,500**", "9500", 1.0, NUM),
    ("#### 9,500", "9500", 1.0, NUM),
    # scientific notation
    ("\\boxed{1.5 \\times 10^{3}}", "1500", 1.0, NUM),
    ("The answer is 1,000,000.", "1e6", 1.0, NUM),
    # signs in front of fractions, fraction variants
    ("\\boxed{-\\frac{1}{2}}", "-0.5", 1.0, NUM),
    ("\\boxed{\\frac{-1}{2}}", "-\\frac{1}{2}", 1.0, NUM),
    ("\\boxed{-\\dfrac{1}{2}}", "-1/2", 1.0, NUM),
    ("\\boxed{\\tfrac{3}{4}}", "0.75", 1.0, NUM),
    ("\\boxed{\\frac12}", "0.5", 1.0, NUM),
    ("\\boxed{\\left(-\\frac{3}{2}\\right)}", "-1.5", 1.0, NUM),
    # unicode digits and signs
    ("The answer is ４２。", "42", 1.0, NUM),
    ("答案是 ９，５００", "9500", 1.0, NUM),
    ("The answer is −3", "-3", 1.0, NUM),
    ("\\boxed{−\\frac{1}{2}}", "-0.5", 1.0, NUM),
    ("\\boxed{٤٢}", "42", 1.0, NUM),
    ("The answer is ½", "0.5", 1.0, NUM),
    ("The answer is 10³", "1000", 1.0, SYM),  # superscript -> ^{3}, not NFKC's "103"
    # percentages
    ("\\boxed{50\\%}", "50", 1.0, NUM),
    ("\\boxed{50\\%}", "0.5", 1.0, NUM),
    ("The answer is 50 percent.", "50", 1.0, NUM),
    # symbolic: math-verify's part
    ("\\boxed{(x+1)^2}", "x^2+2x+1", 1.0, SYM),
    ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt{2}}", 1.0, SYM),
    ("\\boxed{x=5}", "5", 1.0, SYM),
    ("\\boxed{10^{3}}", "1000", 1.0, SYM),
    ("\\boxed{\\text{Paris}}", "Paris", 1.0, SYM),
    # must stay 0
    ("\\boxed{95}", "9500", 0.0, NUM),
    ("\\boxed{-1/2}", "1/2", 0.0, NUM),
    ("\\boxed{-\\frac{1}{2}}", "\\frac{1}{2}", 0.0, NUM),
    ("\\boxed{50\\%}", "5", 0.0, NUM),
    ("\\boxed{0.333}", "\\frac13", 0.0, NUM),
    ("The answer is 3 million", "3", 0.0, NUM),
    ("The answer is 1,2,3", "123", 0.0, SYM),  # a list, not a number with separators
    ("\\boxed{9,50}", "950", 0.0, SYM),
    ("\\boxed{5x}", "5", 0.0, SYM),
    ("\\boxed{2\\pi}", "2", 0.0, SYM),
    ("\\boxed{x+1}", "x+2", 0.0, SYM),
    # think mode: only the text after </think> counts; unclosed reasoning has no answer
    ("<think>the answer is 42</think>The answer is 41", "42", 0.0, NUM),
    ("<think>so the answer is 42", "42", 0.0, NUM),
    ("<think>6 * 7 = 41?</think>\\boxed{4{,}2}", "42", 0.0, SYM),
    ("<think>6 * 7</think>\\boxed{４２}", "42", 1.0, NUM),
]


@pytest.mark.parametrize(("response", "label", "expected", "kind"), ROWS)
def test_math_answer_forms(response, label, expected, kind):
    mode = "think" if "<think>" in response else "non_think"
    assert math_answer(_s(response, label, mode))["score"] == expected
    if kind == NUM:
        assert math_answer(_s(response, label, mode), use_math_verify=False)["score"] == expected


def test_the_table_covers_enough_forms():
    assert len(ROWS) >= 30
    assert sum(r[2] == 0.0 for r in ROWS) >= 10


@pytest.mark.parametrize(
    ("text", "value", "percent"),
    [("9{,}500", 9500, False), ("-\\tfrac{1}{4}", -0.25, False), ("(−2)", -2, False), ("12.5\\%", 12.5, True),
     ("2.5 billion dollars", 2_500_000_000, False), ("US$ 7", 7, False), ("1,000.25", 1000.25, False),
     ("1.5e3", 1500, False), ("2.5\\cdot 10^{-1}", 0.25, False)],
)
def test_parse_number_values(text, value, percent):
    num = parse_number(text)
    assert num is not None and float(num.value) == value and num.percent == percent


@pytest.mark.parametrize("text", ["x+1", "1,2,3", "5x", "5 x", "2^{10}", "\\sqrt{2}", "1/2/3", "1e5000", "1/0", "9" * 300])
def test_parse_number_refuses_what_is_not_one_plain_number(text):
    assert parse_number(text) is None


def test_normalize_unicode():
    assert normalize_unicode("９，５００ − ２") == "9,500 - 2"
    assert normalize_unicode("10³ and x²") == "10^{3} and x^{2}"
    assert normalize_unicode("3½") == "3+1/2"
    assert normalize_unicode("plain ascii") == "plain ascii"


def test_default_is_math_verify_with_an_opt_out():
    symbolic = _s("\\boxed{(x+1)^2}", "x^2+2x+1")
    assert math_answer(symbolic)["score"] == 1.0
    assert math_answer(symbolic, use_math_verify=False)["score"] == 0.0
    assert math_answer(symbolic, use_math_verify="auto")["score"] == 1.0  # old configs keep working
    with pytest.raises(RewardLoadError, match=r"bad kwargs: use_math_verify='yes'; allowed"):
        load_reward("math_answer", {"use_math_verify": "yes"})
    with pytest.raises(RewardLoadError, match="math_verify_timeout_s=0.5 must be a whole number"):
        load_reward("math_answer", {"math_verify_timeout_s": 0.5})


def test_runaway_predictions_are_not_handed_to_math_verify_in_a_thread():
    # sympy would take minutes on a power tower, and a thread has no timeout to stop it.
    for expr in ["9^{9^{9}}", "10^{100000}", "(10^{100})!", "2**2**100", "123456!", "x" * 500]:
        assert too_costly_without_timeout(expr), expr
    for expr in ["2^{10}", "(x+1)^2", "5!", "e^{i\\pi}", "\\frac{\\sqrt{2}}{2}"]:
        assert not too_costly_without_timeout(expr), expr
    result = {}
    tower = _s("\\boxed{9^{9^{9^{9}}}}", "1")
    worker = threading.Thread(target=lambda: result.update(math_answer(tower)))
    t0 = time.monotonic()
    worker.start()
    worker.join(10)
    assert not worker.is_alive() and result["score"] == 0.0
    assert time.monotonic() - t0 < 5


def _calls_per_s(sample: Sample, seconds: float = 0.3) -> float:
    math_answer(sample)
    n, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds:
        math_answer(sample)
        n += 1
    return n / elapsed


@pytest.mark.parametrize(
    ("response", "label"),
    [("The answer is 42.", "42"), ("The answer is 41.", "42"), ("<think>6*7=42</think>The answer is 42.", "42"),
     ("so \\boxed{-\\frac{1}{2}}", "-0.5")],
)
def test_typical_short_answers_never_reach_math_verify(response, label):
    # The tiny demo scores thousands of samples a minute: plain numbers (right or wrong) are
    # decided by the exact fast path; math-verify (milliseconds a call) only sees the rest.
    mode = "think" if "<think>" in response else "non_think"
    assert _calls_per_s(_s(response, label, mode)) > 2000


@pytest.mark.parametrize(
    ("response", "label", "contains", "expected"),
    [
        ("Ｐａｒｉｓ！", "paris", False, 1.0),
        ("北京。", "北京", False, 1.0),
        ("「東京」", "東京", False, 1.0),
        ("Ｔｈｅ  Eiffel　Tower！", "eiffel tower", False, 1.0),
        ("答案是北京。", "北京", True, 1.0),
        ("答案是南京。", "北京", True, 0.0),
        ("It is the Eiffel Tower。", "Eiffel tower", True, 1.0),
        ("Ｐａｒｉｓ", "London", False, 0.0),
    ],
)
def test_normalized_match_treats_unicode_punctuation_like_ascii(response, label, contains, expected):
    assert normalized_match(_s(response, label), contains=contains) == expected
