"""Answer forms: the many ways one number is written, reduced to one exact value.

    "９，５００"  "9{,}500"  "\\$9,500"  "9 500 dollars"  "9\\,500\\text{ USD}"  ──► 9500
    "−\\dfrac12"  "\\frac{-1}{2}"  "-1/2"  "(-0.5)"  "-\\tfrac{1}{2}"         ──► -1/2
    "50\\%"  "50 percent"                                               ──► 50, percent
    "x+1"  "1,2,3"  "5x"  "2^{10}"  "\\sqrt{2}"                           ──► None (not a plain number)

:func:`normalize_unicode` runs on a response before an answer is extracted; :func:`parse_number`
and :func:`numbers_equal` give the exact, fast comparison that ``math_answer`` tries before
math-verify: two plain numbers are decided here (equal or not), anything else (an expression, a
variable, a list, a power) returns None and goes to math-verify.

Standard library only; every function is pure and fast (no regex backtracking on long input:
answers longer than :data:`MAX_NUMBER_CHARS` are not parsed as numbers).
"""

from __future__ import annotations

import dataclasses
import re
import unicodedata
from fractions import Fraction

MAX_NUMBER_CHARS = 200
"""Longer answers are never parsed as plain numbers (they go to math-verify, or compare as text)."""

_SUPERSCRIPTS = str.maketrans("⁰¹²³⁴⁵⁶⁷⁸⁹⁺⁻⁽⁾", "0123456789+-()")
_SUPERSCRIPT_RUN = re.compile("[⁰¹²³⁴⁵⁶⁷⁸⁹⁺⁻⁽⁾]+")
_VULGAR = re.compile(r"(\d?)([\u00bc-\u00be\u2150-\u215e\u2189])")
# Minus signs NFKC leaves alone: minus, small/heavy minus, modifier minus.
_MINUS = str.maketrans({"\u2212": "-", "\ufe63": "-", "\u2796": "-", "\u02d7": "-", "\u2044": "/"})


def normalize_unicode(text: str) -> str:
    """ASCII forms of digits and signs: full-width digits and punctuation (NFKC), ``−`` (U+2212)
    and other minus signs, digits of other scripts (``٤٢``), superscripts (``10³`` -> ``10^{3}``,
    not NFKC's ``103``) and vulgar fractions (``½`` -> ``1/2``). ASCII text is returned as is."""
    if text.isascii():
        return text
    text = _SUPERSCRIPT_RUN.sub(lambda m: "^{" + m.group(0).translate(_SUPERSCRIPTS) + "}", text)
    text = _VULGAR.sub(_vulgar, text)
    text = unicodedata.normalize("NFKC", text).translate(_MINUS)
    if not text.isascii():  # decimal digits of other scripts
        text = "".join(
            str(unicodedata.decimal(ch)) if not ch.isascii() and unicodedata.category(ch) == "Nd" else ch
            for ch in text
        )
    return text


def _vulgar(m: re.Match[str]) -> str:
    frac = unicodedata.normalize("NFKC", m.group(2)).replace("\u2044", "/")
    return f"{m.group(1)}+{frac}" if m.group(1) else frac  # "3½" is 3 + 1/2


# -- LaTeX clean-up ---------------------------------------------------------------------------

_FRAC = re.compile(r"\\[dtc]?frac")
_TEXT_CMD = re.compile(r"\\(?:text|textrm|textnormal|mathrm|mbox|textbf|mathbf|textit|mathit|operatorname)\s*\{([^{}]*)\}")
_DROP = re.compile(r"\\(?:displaystyle|left|right|big|Big|bigl|bigr|!)|\^\s*\{?\s*\\circ\s*\}?|\\circ|°|\\\$|\$")
_SPACES = re.compile(r"\\[,;: ]|\\thinspace|\\quad|\\qquad|~")
_PERCENT = re.compile(r"\s*(?:\\?%|percent|per\s+cent|pct)\s*$", re.IGNORECASE)
_CURRENCY = re.compile(r"^\s*(?:USD|US\$?|EUR|GBP|Rs\.?|INR|€|£|¥|₹|₩|元)\s*")
_SCALE = {"hundred": 100, "thousand": 10**3, "million": 10**6, "billion": 10**9, "trillion": 10**12}
_UNITS = frozenset(
    "mm cm dm m km in ft yd mi mg g kg t lb lbs oz ml mL l L s sec ms min mins h hr hrs yr yrs "
    "mph kph kmh km/h m/s Hz kHz MHz GHz W kW V A J kJ N Pa kPa K C F B KB MB GB TB px pt USD EUR "
    "m^2 cm^2 km^2 m^3 cm^3 ft^2 元 円 块 个 人 米 度".split()
)
_ONE_LETTER_UNITS = frozenset("m g s h l L K A V W J N t")
_MATH_WORDS = frozenset(
    "pi e i x y z n k sqrt root ln log sin cos tan sec csc cot exp mod div times cdot over plus minus "
    "and or to squared cubed inf infty infinity".split()
)
_UNIT_WORD = re.compile(r"[^\W\d_][^\W\d_]*\.?(?:\^\{?-?\d\}?|\d)?")
_UNIT_TAIL = re.compile(r"^(?P<num>.*?[\d)])(?P<space>\s*)(?P<unit>[^\W\d_][^()=+*\\]*)$")
_PLAIN = re.compile(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d{1,3}(?: \d{3})+(?:\.\d+)?|\d+(?:\.\d*)?|\.\d+")
# 1.5e3, 1.5 \times 10^{3}, 2.5\cdot10^{-1} (exponents of at most 3 digits: never a huge power)
_SCIENTIFIC = re.compile(
    r"(?P<m>\d+(?:\.\d*)?|\.\d+)\s*(?:[eE]\s*|(?:\\times|\\cdot|×|·|\*)\s*10\s*\^\s*)\{?\s*(?P<e>[-+]?\d{1,3})\s*\}?"
)


def _latex_fracs(s: str) -> str | None:
    """``\\frac{a}{b}``, ``\\dfrac12``, ``\\tfrac1{2}`` -> ``(a)/(b)``; None when malformed."""
    while True:
        m = _FRAC.search(s)
        if m is None:
            return s
        args, i = [], m.end()
        for _ in range(2):
            while i < len(s) and s[i] == " ":
                i += 1
            if i >= len(s):
                return None
            if s[i] == "{":
                depth, j = 0, i
                while j < len(s):
                    depth += {"{": 1, "}": -1}.get(s[j], 0)
                    if depth == 0:
                        break
                    j += 1
                if depth:
                    return None
                args.append(s[i + 1 : j])
                i = j + 1
            else:  # \frac12: one character per argument
                args.append(s[i])
                i += 1
        s = f"{s[: m.start()]}({args[0]})/({args[1]}){s[i:]}"


def clean_latex(answer: str) -> str:
    """An answer with its typesetting removed: math delimiters, ``\\left``/``\\right``, spacing,
    ``\\text{}`` (kept as words), degree signs, ``{,}``; ``\\dfrac``/``\\tfrac`` become ``\\frac``
    and fractions ``(a)/(b)``. Meaning-bearing commands (``\\sqrt``, ``\\pi``) stay."""
    s = normalize_unicode(answer).strip()
    s = s.replace("\\(", "").replace("\\)", "").replace("\\[", "").replace("\\]", "").replace("{,}", ",")
    s = _TEXT_CMD.sub(lambda m: f" {m.group(1)} ", s)
    s = _DROP.sub("", s)
    s = _SPACES.sub(" ", s)
    s = s.replace("\\%", "%")
    fracs = _latex_fracs(s)
    s = fracs if fracs is not None else s
    s = " ".join(s.split())
    return s.rstrip(".。").strip()


# -- numbers ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Number:
    """An exact numeric answer; ``percent`` when written with ``%`` (``50%`` is 50, percent)."""

    value: Fraction
    percent: bool = False


def _split_top(s: str, sep: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(s):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append(s[start:i])
            start = i + 1
    parts.append(s[start:])
    return parts


def _closes_at_end(s: str) -> bool:
    """True when the ``(`` at ``s[0]`` is closed by the ``)`` at ``s[-1]``."""
    depth = 0
    for i, ch in enumerate(s):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0:
            return i == len(s) - 1
    return False


def _value(s: str, depth: int = 0) -> Fraction | None:
    """Exact value of a signed number, ``a/b`` or a parenthesised one; None otherwise."""
    s = s.strip()
    if not s or depth > 4:
        return None
    sign = 1
    if s[0] in "+-":
        sign, s = (-1 if s[0] == "-" else 1), s[1:].lstrip()
    if s[:1] == "(" and _closes_at_end(s):
        inner = _value(s[1:-1], depth + 1)
        return None if inner is None else sign * inner
    parts = _split_top(s, "/")
    if len(parts) == 2:
        num, den = _value(parts[0], depth + 1), _value(parts[1], depth + 1)
        if num is None or den is None or den == 0:
            return None
        return sign * num / den
    if len(parts) > 2:
        return None
    sci = _SCIENTIFIC.fullmatch(s)
    if sci is not None:
        return sign * Fraction(sci.group("m")) * Fraction(10) ** int(sci.group("e"))
    if not _PLAIN.fullmatch(s):
        return None
    try:
        return sign * Fraction(s.replace(",", "").replace(" ", ""))
    except (ValueError, ZeroDivisionError):  # e.g. more digits than int() converts
        return None


def _is_unit(unit: str, spaced: bool) -> bool:
    words = [w for w in re.split(r"[\s/]+", unit.strip()) if w]
    if not words or not all(_UNIT_WORD.fullmatch(w) for w in words):
        return False
    first = words[0].rstrip(".")
    if first.lower() in _MATH_WORDS or (len(first) == 1 and first.isascii() and first not in _ONE_LETTER_UNITS):
        return False
    if spaced:
        return True
    # "5cm" and "9500元" are units; "5x" and "3n" are products.
    return unit in _UNITS or all(unicodedata.category(ch) == "Lo" for ch in unit)


def parse_number(answer: str) -> Number | None:
    """The exact value of an answer that is one plain number, whatever its dress: currency
    (``\\$``, ``€``, ``USD``), thousands separators (``9,500``, ``9{,}500``, ``9\\,500``, ``9 500``),
    a sign before a fraction, LaTeX fractions, parentheses, a percent sign, a trailing unit
    (``5 cm``, ``5\\text{ kg}``, ``5cm``), scale words (``5 million``), scientific notation
    (``1.5e3``, ``1.5\\times 10^{3}``), unicode digits and signs.

    Returns None for anything else (``x+1``, ``1,2,3``, ``5x``, ``2^{10}``, ``\\sqrt{2}``); such
    answers need a symbolic check.
    """
    if len(answer) > MAX_NUMBER_CHARS:
        return None
    s = clean_latex(answer)
    s = _CURRENCY.sub("", s)
    percent = False
    m = _PERCENT.search(s)
    if m is not None:
        percent, s = True, s[: m.start()]
    value = _value(s)
    if value is None:
        m = _UNIT_TAIL.match(s)
        if m is None:
            return None
        unit, spaced = m.group("unit").strip(), bool(m.group("space"))
        first, _, rest = unit.partition(" ")
        scale = _SCALE.get(first.lower(), 1) if spaced else 1  # "5 million", "2.5 billion dollars"
        if scale != 1:
            unit = rest.strip()
        if unit and not _is_unit(unit, spaced):
            return None
        value = _value(m.group("num"))
        if value is None:
            return None
        value *= scale
    return Number(value, percent)


def numbers_equal(pred: str, gold: str) -> bool | None:
    """True/False when both answers are plain numbers (exact comparison; ``50%`` equals both
    ``50`` and ``0.5``), None when either is not (a symbolic check must decide)."""
    a, b = parse_number(pred), parse_number(gold)
    if a is None or b is None:
        return None
    if a.value == b.value:
        return True
    if a.percent != b.percent:
        pct, other = (a, b) if a.percent else (b, a)
        return pct.value / 100 == other.value
    return False
