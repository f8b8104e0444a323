"""A verifiers single-turn environment on the tiny `arith` task, written as for any verifiers trainer.

slime-rl loads it with `rollout.environment: verifiers:examples/envs/vf_tiny_arith.py`; its dataset
supplies the prompts (each row's `mode` travels too: think rows reason in a <think> block), its
rubric scores the replies, and each rubric function shows up as its own metric
(`reward/env_reward/correct_mean`, `reward/env_reward/answer_format_mean`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import verifiers as vf
from datasets import Dataset

_ANSWER = re.compile(r"answer is\s*(-?\d+)", re.IGNORECASE)


def extract_answer(text: str) -> str | None:
    """The number after the last "answer is" ("The answer is 7." -> "7")."""
    found = _ANSWER.findall(text or "")
    return found[-1] if found else None


def load_environment(data_path: str = "artifacts/tiny/data/train.jsonl", num_examples: int = -1) -> vf.Environment:
    rows = [json.loads(line) for line in Path(data_path).read_text().splitlines() if line.strip()]
    if num_examples > 0:
        rows = rows[:num_examples]
    dataset = Dataset.from_list([
        {"question": r["prompt"], "answer": str(r["label"]), "mode": r.get("mode", "non_think"),
         "info": {"steps": r.get("steps", [])}} for r in rows
    ])
    parser = vf.MaybeThinkParser(extract_fn=extract_answer)  # reads the part after </think>

    def correct(completion, answer, parser) -> float:
        return 1.0 if parser.parse_answer(completion) == answer else 0.0

    def answer_format(completion, parser) -> float:
        return 1.0 if parser.parse_answer(completion) is not None else 0.0

    rubric = vf.Rubric(funcs=[correct, answer_format], weights=[1.0, 0.1], parser=parser)
    return vf.SingleTurnEnv(dataset=dataset, parser=parser, rubric=rubric)
