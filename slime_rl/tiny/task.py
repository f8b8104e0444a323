"""The `arith` task: small arithmetic word problems with integer answers.

Generated deterministically from a seed, so every machine builds the same data offline.
Each record is ``{"prompt": str, "label": str, "mode": "think" | "non_think",
"steps": [str, ...]}``; ``steps`` is the worked solution (``"23 + 45 = 68"``) used for
the supervised warm start's reasoning block, not by RL.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

_NAMES = ("Sam", "Ana", "Tom", "Mia", "Leo", "Eva", "Ben", "Zoe")
_ITEMS = ("apples", "pens", "coins", "books", "cards", "shells", "stamps", "eggs")

TASKS = ("arith",)
"""Tasks `make-tiny-model --task` accepts."""


def _one_step(rng: random.Random) -> tuple[str, int, list[str]]:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    op = rng.choice(("+", "-", "*"))
    if op == "+":
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        text = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?"
        ans = a + b
    elif op == "-":
        a = rng.randint(2, 18)
        b = rng.randint(1, min(a, 9))
        text = f"{name} has {a} {item} and gives away {b}. How many {item} are left?"
        ans = a - b
    else:
        a, b = rng.randint(2, 5), rng.randint(2, 5)
        text = f"{name} has {a} boxes with {b} {item} in each. How many {item} are there?"
        ans = a * b
    return text, ans, [f"{a} {op} {b} = {ans}"]


def _two_step(rng: random.Random) -> tuple[str, int, list[str]]:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    mid = a + b
    c = rng.randint(1, mid)
    ans = mid - c
    text = (
        f"{name} has {a} {item}, gets {b} more, then gives away {c}. "
        f"How many {item} does {name} have?"
    )
    return text, ans, [f"{a} + {b} = {mid}", f"{mid} - {c} = {ans}"]


def make_problem(rng: random.Random) -> dict[str, Any]:
    """One problem: a one-step (+, -, x) or a two-step word problem."""
    make = _two_step if rng.random() < 0.3 else _one_step
    text, ans, steps = make(rng)
    mode = "think" if rng.random() < 0.5 else "non_think"
    return {"prompt": text, "label": str(ans), "mode": mode, "steps": steps}


def make_split(n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` problems generated from ``seed`` (the same seed always gives the same list)."""
    rng = random.Random(seed)
    return [make_problem(rng) for _ in range(n)]


def make_dataset(seed: int = 0, n_train: int = 2000, n_eval: int = 200) -> dict[str, list[dict[str, Any]]]:
    """Train and eval splits; eval prompts never appear in train."""
    train = make_split(n_train, seed * 1000 + 1)
    seen = {r["prompt"] for r in train}
    eval_rows: list[dict[str, Any]] = []
    rng = random.Random(seed * 1000 + 2)
    while len(eval_rows) < n_eval:
        row = make_problem(rng)
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


def render_response(row: dict[str, Any], think: bool) -> str:
    """The reference assistant reply of a problem (reasoning block only in think mode)."""
    answer = f"The answer is {row['label']}."
    if not think:
        return answer
    return "<think>\n" + "\n".join(row["steps"]) + "\n</think>\n\n" + answer


def corpus(seed: int = 0, n: int = 3000) -> list[str]:
    """Text for training the tokenizer: problems, worked solutions and chat scaffolding."""
    rows = make_split(n, seed + 7)
    text = [r["prompt"] for r in rows]
    text += [render_response(r, think=True) for r in rows]
    text += [
        "You are a helpful assistant.",
        "Use the calculator tool when it helps.",
        '{"name": "calculator", "arguments": {"expression": "2 + 3"}}',
        "The answer is",
    ]
    return text
