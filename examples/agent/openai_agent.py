"""An ordinary tool-using agent written against the `openai` SDK, trained unchanged by slime-rl.

slime-rl calls `agent(base_url, episode_id, task)` once per sample (in a thread: this is plain
blocking code) with `base_url` pointing at the rollout side's OpenAI-compatible endpoint for this
episode; every call below is recorded at token level and the calls are joined into one training
trajectory. The returned number is the episode's reward (`reward.fn: episode_reward`).

The agent knows nothing of slime-rl: point `base_url` at any OpenAI-compatible server to run it.
"""

from __future__ import annotations

import json
from typing import Any

import openai
from slime_rl.rollout.environments import answer_matches
from slime_rl.rollout.envs_builtin.calculator import evaluate_arithmetic

TOOLS = [{
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression.",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]},
    },
}]


def run_tool(name: str, arguments: str) -> str:
    if name != "calculator":
        return f"Error: unknown tool {name!r}"
    try:
        return str(evaluate_arithmetic(str(json.loads(arguments)["expression"])))
    except Exception as e:  # the model sees its mistake
        return f"Error: {e}"


def agent(base_url: str, episode_id: str, task: dict[str, Any], max_turns: int = 4) -> float:
    client = openai.OpenAI(base_url=base_url, api_key="not-needed", max_retries=0)
    messages: list[dict[str, Any]] = list(task["messages"])
    answer = ""
    for _ in range(max_turns):
        reply = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS)
        msg = reply.choices[0].message
        messages.append(msg.model_dump(exclude_none=True))  # the assistant turn, as returned
        if not msg.tool_calls:
            answer = msg.content or ""
            break
        for call in msg.tool_calls:
            messages.append({"role": "tool", "tool_call_id": call.id, "content": run_tool(call.function.name, call.function.arguments)})
    return float(answer_matches(answer, task["label"]))
