"""The `arith` task: small arithmetic word problems with integer answers.

Generated deterministically from a seed, so every machine builds the same data offline.
Each record is ``{"prompt": str, "label": str, "mode": "think" | "non_think",
"steps": [str, ...], "solver": "careful" | "hasty"}``; ``steps`` is the worked solution
(``"23 + 45 = 68"``) and ``solver`` says who wrote the warm-start reply of a train row (not
used by RL, whose reward checks ``label``).

The warm-start replies come from two solvers, like distillation data from teachers of mixed
quality: a careful one, always right, and a hasty one (``TaskSpec.hasty_frac`` of the train
rows) that works the problem the same way but reports a final answer off by one. The base
model imitates both, so it holds the right procedure but applies it unreliably; the same
slip on every problem is the kind of behaviour a correctness reward corrects quickly, because
every rewarded sample teaches the same thing (see docs/learnability.md).
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

_NAMES = ("Sam", "Ana", "Tom", "Mia", "Leo", "Eva", "Ben", "Zoe")
_ITEMS = ("apples", "pens", "coins", "books", "cards", "shells", "stamps", "eggs")

TASKS = ("arith",)
"""Tasks `make-tiny-model --task` accepts."""


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """Knobs of the `arith` data (the defaults build the demo's task)."""

    two_step_frac: float = 0.3
    """Fraction of two-step problems (a + b - c); the rest are one-step +, - or x."""
    hasty_frac: float = 0.6
    """Fraction of train rows whose warm-start reply comes from the hasty solver."""
    hasty_offset: int = 1
    """What the hasty solver adds to the right answer (`hasty_style="off_by_one"`)."""
    hasty_style: str = "guess"
    """`guess`: the hasty solver skips the work and repeats the last number of the question
    (a shortcut small models really take); `off_by_one`: it works the problem but reports the
    answer plus `hasty_offset`."""
    max_operand: int = 4
    """Addends, amounts given away and the second step's operands are 1..max_operand (small:
    the warm start then learns most of the facts, so what RL has to fix is the behaviour)."""


def _one_step(rng: random.Random, spec: TaskSpec) -> tuple[str, int, list[str]]:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    op = rng.choice(("+", "-", "*"))
    k = spec.max_operand
    if op == "+":
        a, b = rng.randint(1, k), rng.randint(1, k)
        text = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?"
        ans = a + b
    elif op == "-":
        a = rng.randint(2, 2 * k)
        b = rng.randint(1, min(a, k))
        text = f"{name} has {a} {item} and gives away {b}. How many {item} are left?"
        ans = a - b
    else:
        a, b = rng.randint(2, 5), rng.randint(2, 5)
        text = f"{name} has {a} boxes with {b} {item} in each. How many {item} are there?"
        ans = a * b
    return text, ans, [f"{a} {op} {b} = {ans}"]


def _two_step(rng: random.Random, spec: TaskSpec) -> tuple[str, int, list[str]]:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    k = spec.max_operand
    a, b = rng.randint(1, k), rng.randint(1, k)
    mid = a + b
    c = rng.randint(1, min(mid, k))
    ans = mid - c
    text = (
        f"{name} has {a} {item}, gets {b} more, then gives away {c}. "
        f"How many {item} does {name} have?"
    )
    return text, ans, [f"{a} + {b} = {mid}", f"{mid} - {c} = {ans}"]


def make_problem(rng: random.Random, spec: TaskSpec = TaskSpec()) -> dict[str, Any]:
    """One problem: a one-step (+, -, x) or a two-step word problem."""
    make = _two_step if rng.random() < spec.two_step_frac else _one_step
    text, ans, steps = make(rng, spec)
    mode = "think" if rng.random() < 0.5 else "non_think"
    solver = "hasty" if rng.random() < spec.hasty_frac else "careful"
    return {"prompt": text, "label": str(ans), "mode": mode, "steps": steps, "solver": solver}


def make_split(n: int, seed: int, spec: TaskSpec = TaskSpec()) -> list[dict[str, Any]]:
    """``n`` problems generated from ``seed`` (the same seed always gives the same list)."""
    rng = random.Random(seed)
    return [make_problem(rng, spec) for _ in range(n)]


def make_dataset(
    seed: int = 0, n_train: int = 2000, n_eval: int = 200, spec: TaskSpec = TaskSpec()
) -> dict[str, list[dict[str, Any]]]:
    """Train and eval splits; eval prompts never appear in train (eval rows are all `careful`)."""
    train = make_split(n_train, seed * 1000 + 1, spec)
    seen = {r["prompt"] for r in train}
    eval_rows: list[dict[str, Any]] = []
    rng = random.Random(seed * 1000 + 2)
    while len(eval_rows) < n_eval:
        row = dict(make_problem(rng, spec), solver="careful")
        if row["prompt"] not in seen:
            seen.add(row["prompt"])
            eval_rows.append(row)
    return {"train": train, "eval": eval_rows}


def write_jsonl(rows: Iterable[dict[str, Any]], path: str | Path) -> Path:
    """Write rows as JSON lines (creating parent folders)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


HASTY_OPENINGS = ("Probably", "No need to work it out")
"""Phrases only the hasty solver writes (for measuring how often a model answers its way)."""


def is_hasty_reply(reply: str) -> bool:
    """True when a reply is in the hasty solver's style (a guess, no working)."""
    return any(p in reply for p in HASTY_OPENINGS)


def careful_opening(row: dict[str, Any], think: bool) -> str:
    """The first tokens the careful solver writes (its first operand in think mode, `The answer is`
    otherwise): forcing them measures how much careful skill a model holds, the ceiling RL can
    reach by choosing to work problems out rather than guess."""
    return "<think>\n" + row["steps"][0].split()[0] if think else "The answer is"


def last_number(prompt: str) -> int:
    """The last number written in a question (what the hasty solver repeats)."""
    return int(re.findall(r"\d+", prompt)[-1])


def render_response(row: dict[str, Any], think: bool, spec: TaskSpec = TaskSpec()) -> str:
    """The warm-start reply of a problem (reasoning block only in think mode), written by the
    row's solver (see the module docstring)."""
    if row.get("solver") == "hasty" and spec.hasty_style == "guess":
        guess = f"Probably {last_number(row['prompt'])}."
        return "<think>\nNo need to work it out.\n</think>\n\n" + guess if think else guess
    shown = int(row["label"]) + (spec.hasty_offset if row.get("solver") == "hasty" else 0)
    answer = f"The answer is {shown}."
    if not think:
        return answer
    return "<think>\n" + "\n".join(row["steps"]) + "\n</think>\n\n" + answer


TOKENIZER_SPEC = TaskSpec(hasty_frac=0.0, max_operand=9)


def corpus(seed: int = 0, n: int = 3000) -> list[str]:
    """Text for training the tokenizer: problems, worked solutions and chat scaffolding.

    Always careful solutions over operands 1-9, whatever the task's `TaskSpec`: the vocabulary
    must not depend on the task's settings. (Training the BPE on the shipped spec's own rows,
    operands 1-4 with hasty replies, merged number and phrase pieces differently and cut the
    warm-started model's careful-solver accuracy from ~48 % to ~27 %: docs/learnability.md.)
    """
    rows = make_split(n, seed + 7, TOKENIZER_SPEC)
    text = [r["prompt"] for r in rows]
    text += [render_response(r, think=True) for r in rows]
    text += [
        "You are a helpful assistant.",
        "Use the calculator tool when it helps.",
        '{"name": "calculator", "arguments": {"expression": "2 + 3"}}',
        "The answer is",
    ]
    return text
