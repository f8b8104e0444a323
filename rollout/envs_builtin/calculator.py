"""The `calculator` environment: arithmetic as a tool, evaluated without `eval`.

The model's expression is untrusted text, so it is parsed into an AST and only number literals
and `+ - * / // % **` are evaluated, with caps on length and exponent.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable
from typing import Any

from slime_rl.rollout.environments import ToolEnvironment, Trajectory, answer_matches, tool_schema

_BINOPS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}
_UNARY: dict[type, Callable[[Any], Any]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def evaluate_arithmetic(expression: str, max_chars: int = 200, max_exponent: int = 64) -> int | float:
    """Evaluate `+ - * / // % **` and parentheses over number literals (no names, no calls).

    Raises:
        ValueError: anything else, a too-long expression or a too-large exponent.
        ZeroDivisionError: division by zero.
    """
    if len(expression) > max_chars:
        raise ValueError(f"expression longer than {max_chars} characters")
    try:
        tree = ast.parse(expression.replace("^", "**").replace("×", "*").replace("÷", "/"), mode="eval")
    except SyntaxError as e:
        raise ValueError(f"not an arithmetic expression: {e.msg}") from None

    def ev(node: ast.AST) -> int | float:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > max_exponent:
                raise ValueError(f"exponent {right} is larger than {max_exponent}")
            return _BINOPS[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](ev(node.operand))
        raise ValueError(f"unsupported element {type(node).__name__} (only numbers and + - * / // % ** ( ))")

    value = ev(tree)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return value


class CalculatorEnvironment(ToolEnvironment):
    """One `calculator(expression)` tool; final reward 1.0 when the final answer equals the label."""

    tools = [tool_schema("calculator", "Evaluate an arithmetic expression.", {"expression": {"type": "string"}}, ["expression"])]
    tool_methods = {"calculator": "calculator"}

    def calculator(self, expression: str) -> str:
        value = evaluate_arithmetic(str(expression))
        return str(round(value, 6) if isinstance(value, float) else value)

    async def final_reward(self, trajectory: Trajectory) -> float | None:
        return float(answer_matches(trajectory.final_text, trajectory.prompt.label))
