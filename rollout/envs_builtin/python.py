"""The `python` environment: `python(code)` runs the model's code in the rewards sandbox.

It reuses `slime_rl.rewards.sandbox` (no network, capped resources) rather than a second
sandbox, so the code a tool runs is isolated exactly like the code a reward runs.
"""

from __future__ import annotations

from typing import Any

from slime_rl.rollout.environments import ToolEnvironment, Trajectory, answer_matches, tool_schema


class PythonEnvironment(ToolEnvironment):
    """`python(code)`: runs the code in the rewards sandbox (no network, capped resources) and
    returns its stdout (and stderr when it failed); reward like `calculator`."""

    tools = [tool_schema("python", "Run Python code and return what it prints.", {"code": {"type": "string"}}, ["code"])]
    tool_methods = {"python": "python"}

    def __init__(self, wall_s: float = 5.0, memory_mb: int = 512, network: str = "auto", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        from slime_rl.rewards.sandbox import Sandbox, SandboxLimits

        self.sandbox = Sandbox(SandboxLimits(wall_s=wall_s, cpu_s=max(1, int(wall_s)), memory_mb=memory_mb), network=network)
        self.tool_timeout_s = max(self.tool_timeout_s, wall_s + 5.0)

    async def python(self, code: str) -> str:
        res = await self.sandbox.run(str(code))
        if res.timed_out:
            raise TimeoutError(f"the program ran longer than {self.sandbox.limits.wall_s:g} s")
        out = res.stdout
        if res.returncode:
            out += f"\n[exit code {res.returncode}]\n{res.stderr[-500:]}"
        return out.strip() or "(no output)"

    async def final_reward(self, trajectory: Trajectory) -> float | None:
        return float(answer_matches(trajectory.final_text, trajectory.prompt.label))
