"""Text helpers shared by the built-in rewards: the final answer after a reasoning block,
``\\boxed{}`` extraction, the last number, and answer normalisation.

Responses are normalised to ASCII digits and signs first (full-width digits, ``−``, ``９，５００``,
``9{,}500``; see :mod:`~slime_rl.rewards.builtin.answer_forms`), so extraction sees one form.
"""

from __future__ import annotations

import re
import string
import unicodedata
from fractions import Fraction

from slime_rl.rewards.builtin.answer_forms import (
    clean_latex,
    normalize_unicode,
    numbers_equal,
    parse_number,
)

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

_NUMBER_RE = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?(?:/\d+)?|-?\.\d+")
# "answer is X" / "Answer: X" / "答案是 X": the trigger only, so that "Final Answer: The final
# answer is $42$" finds its last trigger; the phrase is what follows, to a newline or a "$".
_ANSWER_IS_RE = re.compile(r"(?:answer\s*(?:is|:|=)|答案\s*(?:是|为|為|:))", re.IGNORECASE)
_PHRASE_RE = re.compile(r"[\s:*_]*(?:\\?\$|€|£|¥|₹)?\s*([^\n$]*)")
# A number grouped by spaces ("1 000 000") right at the start of an answer phrase.
_SPACE_GROUPED_RE = re.compile(r"-?\d{1,3}(?: \d{3})+(?![\d,.])")
# LaTeX thousands separators between digit groups: 9{,}500, 9\,500, 9\!500, 9~500.
_LATEX_GROUP_RE = re.compile(r"(?<=\d)(?:\{,\}|\\[,! ]|~)(?=\d{3}(?!\d))")
_SCALE_RE = re.compile(r"\s+(?:hundred|thousand|million|billion|trillion)\b", re.IGNORECASE)
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
    """The answer of a math response: last ``\\boxed{}``, else "answer is X", else last number.

    The text after the reasoning block is normalised first (unicode digits and signs, LaTeX
    thousands separators), so ``答案是 ９，５００`` and ``the answer is 9{,}500`` give ``9,500``.
    """
    text = _LATEX_GROUP_RE.sub(",", normalize_unicode(final_text(response)))
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    matches = list(_ANSWER_IS_RE.finditer(text))
    phrase = _PHRASE_RE.match(text, matches[-1].end()).group(1).strip().rstrip("*_").strip() if matches else ""
    if phrase:
        lead = _SPACE_GROUPED_RE.match(phrase) or _NUMBER_RE.match(phrase)
        if lead is not None:
            scale = _SCALE_RE.match(phrase, lead.end())
            if scale is not None:
                return phrase[: scale.end()]  # "3 million people" -> "3 million"
            if _number_stands_alone(phrase[lead.end() :]):
                return lead.group(0)  # "42 apples", "42.", "-3 (from ...)"
        return phrase.rstrip(".")  # "3x+2", "3 + 2 = 5": the whole expression is the answer
    return last_number(text)


def _number_stands_alone(rest: str) -> bool:
    """True when what follows a leading number does not continue it as an expression."""
    if not rest:
        return True
    if rest[0] in ",." and rest[1:2].isdigit():
        return False  # 1,2,3 (a list) or 1.2.3
    if rest[0].isalnum() or rest[0] in "^_({[\\'":
        return False  # 3x, 3^2, 3(x+1), 3\pi
    return rest.lstrip()[:1] not in ("+", "-", "*", "/", "^", "=", "×", "÷", "·")


def normalize_text(text: str) -> str:
    """SQuAD-style normalisation for any script: NFKC (full-width letters and punctuation become
    ASCII), case folded, every unicode punctuation mark (``，。「」！？`` as well as ASCII) removed,
    English articles dropped, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(
        ch for ch in text if ch not in string.punctuation and not unicodedata.category(ch).startswith("P")
    )
    text = _ARTICLES_RE.sub(" ", text)
    return " ".join(text.split())


def _strip_latex(ans: str) -> str:
    """Typesetting-free form of an answer, for comparing non-numeric answers as text."""
    return clean_latex(ans).replace(" ", "")


def to_number(ans: str) -> Fraction | None:
    """Exact value of a numeric answer (``42``, ``-3.5``, ``1,000``, ``-\\frac{1}{2}``, ``50\\%`` is
    50), or None when it is not a plain number; see :func:`~.answer_forms.parse_number`."""
    num = parse_number(ans)
    return None if num is None else num.value


def answers_equal(pred: str, gold: str) -> bool:
    """Exact numeric equality when both are plain numbers, else equality of the answers with
    their typesetting removed (no symbolic check: that is math-verify's job)."""
    same = numbers_equal(pred, gold)
    if same is not None:
        return same
    return _strip_latex(pred) == _strip_latex(gold)
