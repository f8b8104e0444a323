"""A verifiers multi-turn tool environment: the model may call a `calculator` tool before answering.

`vf.ToolEnv` runs the calls and appends the results as tool messages; slime-rl records every model
call of the episode through its OpenAI-compatible endpoint, so the trained sequence is the model's
own tokens (loss mask 1) with the tool results between them (loss mask 0). Run with
`rollout.environment: verifiers:examples/envs/vf_calculator.py` on the `arith_agent` tiny model.
"""

from __future__ import annotations

import ast
import json
import operator
import re
from pathlib import Path

import verifiers as vf
from datasets import Dataset

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
_ANSWER = re.compile(r"answer is\s*(-?\d+)", re.IGNORECASE)
SCHEMA = {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression."""

    def ev(node: ast.AST) -> float:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        raise ValueError("only numbers and + - * /")

    value = ev(ast.parse(expression, mode="eval"))
    return str(int(value) if float(value).is_integer() else round(value, 6))


def extract_answer(text: str) -> str | None:
    found = _ANSWER.findall(text or "")
    return found[-1] if found else None


def load_environment(data_path: str = "artifacts/tiny_agent/data/calc_train.jsonl", max_turns: int = 4,
                     num_examples: int = -1, builtin_schema: bool = True) -> vf.Environment:
    rows = [json.loads(line) for line in Path(data_path).read_text().splitlines() if line.strip()]
    if num_examples > 0:
        rows = rows[:num_examples]
    dataset = Dataset.from_list([{"question": r["prompt"], "answer": str(r["label"]), "mode": r.get("mode", "non_think")}
                                 for r in rows])
    parser = vf.MaybeThinkParser(extract_fn=extract_answer)

    def correct(completion, answer, parser) -> float:
        return 1.0 if parser.parse_answer(completion) == answer else 0.0

    rubric = vf.Rubric(funcs=[correct], parser=parser)
    env = vf.ToolEnv(dataset=dataset, tools=[calculator], max_turns=max_turns, parser=parser, rubric=rubric)
    if builtin_schema:
        # The tiny model's tokenizer learned the exact text of slime-rl's built-in calculator schema
        # (one token per piece); verifiers' own schema adds titles, and with it the model calls the
        # tool about half as often. Any environment may state its tools' schemas itself.
        env.tool_defs = [vf.Tool(name="calculator", description="Evaluate an arithmetic expression.", parameters=SCHEMA)]
    return env
