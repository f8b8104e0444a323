"""Text helpers shared by the built-in rewards: the final answer after a reasoning block,
``\\boxed{}`` extraction, the last number, and answer normalisation."""

from __future__ import annotations

import re
import string
from fractions import Fraction

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

_NUMBER_RE = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?(?:/\d+)?|-?\.\d+")
_ANSWER_IS_RE = re.compile(r"answer\s*(?:is|:|=)\s*:?\s*\$?([^\n$]+)", re.IGNORECASE)
_ARTICLES_RE = re.compile(r"\b(a|an|the)\b")


def final_text(response: str) -> str:
    """The part of a response after its reasoning block (the whole response if it has none)."""
    if THINK_CLOSE in response:
        return response.rsplit(THINK_CLOSE, 1)[1]
    return response


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced; None if absent."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None


def last_number(text: str) -> str | None:
    """The last number in ``text`` (integers, decimals, ``1,000``, ``3/4``); None if none."""
    found = _NUMBER_RE.findall(text)
    return found[-1] if found else None


def extract_answer(response: str) -> str | None:
    """The answer of a math response: last ``\\boxed{}``, else "answer is X", else last number."""
    text = final_text(response)
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    matches = list(_ANSWER_IS_RE.finditer(text))
    if matches:
        phrase = matches[-1].group(1).strip()
        lead = _NUMBER_RE.match(phrase)
        if lead is not None and _number_stands_alone(phrase[lead.end() :]):
            return lead.group(0)  # "42 apples", "42.", "-3 (from ...)"
        return phrase.rstrip(".")  # "3x+2", "3 + 2 = 5": the whole expression is the answer
    return last_number(text)


def _number_stands_alone(rest: str) -> bool:
    """True when what follows a leading number does not continue it as an expression."""
    if not rest:
        return True
    if rest[0].isalnum() or rest[0] in "^_({[\\'":
        return False  # 3x, 3^2, 3(x+1), 3\pi
    return rest.lstrip()[:1] not in ("+", "-", "*", "/", "^", "=", "×", "÷", "·")


def normalize_text(text: str) -> str:
    """SQuAD-style normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in string.punctuation)
    text = _ARTICLES_RE.sub(" ", text)
    return " ".join(text.split())


def _strip_latex(ans: str) -> str:
    ans = ans.strip().strip("$").strip()
    ans = re.sub(r"\\text\{([^}]*)\}", r"\1", ans)
    ans = re.sub(r"\\(?:d|t)?frac\{([^{}]*)\}\{([^{}]*)\}", r"(\1)/(\2)", ans)
    for junk in ("\\!", "\\,", "\\;", "\\left", "\\right", "^\\circ", "^{\\circ}", "\\%", "%"):
        ans = ans.replace(junk, "")
    ans = ans.replace(" ", "").rstrip(".")
    return ans


def to_number(ans: str) -> Fraction | None:
    """Exact value of a numeric answer (``42``, ``-3.5``, ``1,000``, ``\\frac{3}{4}``), or None."""
    s = _strip_latex(ans).replace(",", "")
    m = re.fullmatch(r"\(?(-?[\d.]+)\)?/\(?(-?[\d.]+)\)?", s)
    try:
        if m:
            den = Fraction(m.group(2))
            return Fraction(m.group(1)) / den if den else None
        return Fraction(s.strip("()"))
    except (ValueError, ZeroDivisionError):
        return None


def answers_equal(pred: str, gold: str) -> bool:
    """Numeric equality when both parse as numbers, else equality of the stripped LaTeX."""
    a, b = to_number(pred), to_number(gold)
    if a is not None and b is not None:
        return a == b
    return _strip_latex(pred) == _strip_latex(gold)
