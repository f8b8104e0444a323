"""Built-in environments of the agent loop, by the short name `rollout.environment` takes.

Each entry is a reference string, so nothing is imported until a run asks for it (the python
environment pulls in the rewards sandbox) and the built-ins can subclass `ToolEnvironment`
from `rollout.environments` without a circular import. All are local: no network.

- `calculator`: one `calculator(expression)` tool (integer/float arithmetic, no names, no calls);
  reward 1 when the final answer equals the label.
- `retrieval`: `search(query)` over a local JSONL document collection (BM25); reward 1 when the
  final answer matches the label (normalised text).
- `python`: `python(code)` runs code in the rewards sandbox (`slime_rl.rewards.sandbox`), returns
  stdout/stderr; reward like `calculator`.
"""

from __future__ import annotations

BUILTIN_ENVIRONMENTS: dict[str, str] = {
    "calculator": "slime_rl.rollout.envs_builtin.calculator:CalculatorEnvironment",
    "retrieval": "slime_rl.rollout.envs_builtin.retrieval:RetrievalEnvironment",
    "python": "slime_rl.rollout.envs_builtin.python:PythonEnvironment",
}
"""Short name -> ``package.module:Class`` of every built-in environment."""
