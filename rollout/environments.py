"""Environments of the multi-turn agent loop: the protocol, a tool-running base, the loader.

    AgentLoop ──reset(prompt)────────────► Environment ──► optional first observation (a user message)
              ──step([ToolCall...])──────►             ──► StepResult(observations, done, reward)
              ──final_reward(trajectory)─►             ──► float | None  (metadata["episode_reward"])

An environment is any class with these coroutines (`Environment`); it is loaded by
`rollout.environment: module:Class`, `path/to/file.py:Class` or a built-in name (`calculator`,
`retrieval`, `python`), built with `rollout.environment_kwargs`, one instance per episode.
`ToolEnvironment` is the convenient base: declare tools as methods, and `step` runs a turn's
calls concurrently, each under `tool_timeout_s`, turning an unknown tool, bad arguments, a tool
that raises or one that times out into an error observation of that kind (never an exception).
The built-ins live in `rollout/envs_builtin/`, one module each, named in its registry.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import json
import logging
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from slime_rl.rollout.envs_builtin import BUILTIN_ENVIRONMENTS
from slime_rl.rollout.plugins import PluginLoadError, load_object
from slime_rl.rollout.tool_calls import ToolCall

if TYPE_CHECKING:
    from slime_rl.rollout.data import Prompt

logger = logging.getLogger(__name__)

TOOL_ERROR_KINDS = ("malformed", "unknown_tool", "bad_arguments", "timeout", "tool_error", "too_many_calls")
"""Kinds of `agent/tool_errors/<kind>`."""


@dataclasses.dataclass(frozen=True, slots=True)
class Observation:
    """What one tool call returned (rendered as a `tool` message)."""

    call_id: str
    name: str
    content: str
    error: str | None = None
    """The error kind (one of `TOOL_ERROR_KINDS`) when the call failed; `content` then explains it."""


@dataclasses.dataclass(frozen=True, slots=True)
class StepResult:
    observations: list[Observation]
    done: bool = False
    """End the episode after this step (the model gets no further turn)."""
    reward: float | None = None
    """Optional per-turn reward (kept in `metadata["turn_rewards"]`)."""


@dataclasses.dataclass(frozen=True)
class Trajectory:
    """A finished episode as the environment's `final_reward` sees it."""

    prompt: Prompt
    messages: list[dict[str, Any]]
    """The whole conversation: the prompt's messages, assistant turns (`content`, `tool_calls`)
    and `tool` messages."""
    final_text: str
    """The last assistant turn's text (tool-call blocks removed, reasoning block kept)."""
    turns: int
    tool_calls: int
    status: str
    """`completed` or `truncated` (turn/token budget, or the last turn hit the token limit)."""


@runtime_checkable
class Environment(Protocol):
    """What the agent loop calls; one instance per episode (state lives on the instance)."""

    tools: list[dict[str, Any]]
    """OpenAI function schemas, rendered into the prompt (with the dataset row's own tools)."""

    async def reset(self, prompt: Prompt) -> str | None:
        """Start an episode on a task; a returned text is appended as a user message."""
        ...

    async def step(self, calls: Sequence[ToolCall]) -> StepResult:
        """Run one turn's well-formed tool calls; one observation per call, in order."""
        ...

    async def final_reward(self, trajectory: Trajectory) -> float | None:
        """The trajectory's reward (None: leave it to `reward.fn`)."""
        ...


def tool_schema(name: str, description: str, properties: dict[str, Any], required: Sequence[str] = ()) -> dict[str, Any]:
    """An OpenAI function-calling schema."""
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {"type": "object", "properties": properties, "required": list(required)},
        },
    }


class ToolEnvironment:
    """Base environment whose tools are methods named in `tool_methods` (sync or async).

    `step` runs the calls concurrently (sync tools in threads), each under `tool_timeout_s`,
    and never raises for what a tool does. Subclasses set `tools` (schemas) and `tool_methods`,
    and may override `reset` and `final_reward`.

    Example:
        >>> class Echo(ToolEnvironment):
        ...     tools = [tool_schema("echo", "Repeat the text.", {"text": {"type": "string"}}, ["text"])]
        ...     tool_methods = {"echo": "echo"}
        ...     def echo(self, text: str) -> str:
        ...         return text
        >>> r = asyncio.run(Echo().step([ToolCall("c0", "echo", {"text": "hi"})]))
        >>> r.observations[0].content
        'hi'
    """

    tools: list[dict[str, Any]] = []
    tool_methods: dict[str, str] = {}
    tool_timeout_s: float = 10.0
    max_observation_chars: int = 2000
    path_kwargs: tuple[str, ...] = ()
    """Constructor kwargs that name files; `load_environment` resolves a relative one against the
    config's folder, as it does for every other path in the config."""

    def __init__(self, tool_timeout_s: float | None = None, max_observation_chars: int | None = None) -> None:
        if tool_timeout_s is not None:
            self.tool_timeout_s = float(tool_timeout_s)
        if max_observation_chars is not None:
            self.max_observation_chars = int(max_observation_chars)
        self.prompt: Prompt | None = None

    async def reset(self, prompt: Prompt) -> str | None:
        self.prompt = prompt
        return None

    async def step(self, calls: Sequence[ToolCall]) -> StepResult:
        return StepResult(list(await asyncio.gather(*(self._run(c) for c in calls))))

    async def final_reward(self, trajectory: Trajectory) -> float | None:
        return None

    async def _run(self, call: ToolCall) -> Observation:
        method = self.tool_methods.get(call.name)
        if method is None:
            names = ", ".join(sorted(self.tool_methods)) or "none"
            return Observation(call.id, call.name, f"Error: unknown tool {call.name!r}; available: {names}", "unknown_tool")
        fn = getattr(self, method)
        try:
            inspect.signature(fn).bind(**call.arguments)
        except TypeError as e:
            return Observation(call.id, call.name, f"Error: bad arguments for {call.name}: {e}", "bad_arguments")
        try:
            if inspect.iscoroutinefunction(fn):
                out = await asyncio.wait_for(fn(**call.arguments), self.tool_timeout_s)
            else:
                out = await asyncio.wait_for(asyncio.to_thread(fn, **call.arguments), self.tool_timeout_s)
        except (asyncio.TimeoutError, TimeoutError):
            return Observation(call.id, call.name, f"Error: {call.name} timed out after {self.tool_timeout_s:g} s", "timeout")
        except Exception as e:  # a tool's failure is the model's observation, not the run's
            return Observation(call.id, call.name, f"Error: {type(e).__name__}: {e}", "tool_error")
        text = out if isinstance(out, str) else json.dumps(out, ensure_ascii=False, default=str)
        if len(text) > self.max_observation_chars:
            text = text[: self.max_observation_chars] + " ...[truncated]"
        return Observation(call.id, call.name, text)


# ---------------------------------------------------------------------------------------------
# Answer checks: the built-ins' rewards, and a helper for user environments (docs/agents.md)

_ANSWER = re.compile(r"answer is\s*[:\-]?\s*(.+?)\s*(?:\.\s*)?$", re.IGNORECASE | re.DOTALL)


def final_answer(text: str) -> str | None:
    """The text after the last "answer is" of the part after any reasoning block, or None."""
    tail = text.split("</think>")[-1].strip()
    idx = tail.lower().rfind("answer is")
    if idx < 0:
        return None
    m = _ANSWER.search(tail[idx:])
    return m.group(1).strip().rstrip(".").strip() if m else None


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s.-]", " ", text.lower()).split())


def answer_matches(text: str, label: str | None) -> bool:
    """The final answer equals the label (numbers compared as numbers, text normalised)."""
    got = final_answer(text)
    if got is None or label is None:
        return False
    try:
        return math.isclose(float(got.replace(",", "")), float(label), rel_tol=0, abs_tol=1e-9)
    except ValueError:
        return _norm(got) == _norm(label)


# ---------------------------------------------------------------------------------------------
# Loader


def load_environment(
    ref: str,
    kwargs: dict[str, Any] | None = None,
    *,
    base_dir: str | Path | None = None,
    key: str = "rollout.environment",
    tool_timeout_s: float | None = None,
) -> Callable[[], Environment]:
    """A factory of fresh environments for `ref` (built-in name, `module:Class`, `file.py:Class`).

    One environment is built here to check the kwargs and the protocol, so a bad reference or
    setting fails at start-up. A relative path in a kwarg the class lists in `path_kwargs` (the
    retrieval built-in's `documents`) is resolved against `base_dir`. `tool_timeout_s`
    (`rollout.tool_timeout_s`) is passed to `ToolEnvironment` subclasses whose kwargs do not set
    their own.

    Raises:
        PluginLoadError: bad reference, constructor arguments, or a class without reset/step.
    """
    kwargs = dict(kwargs or {})
    cls = load_object(BUILTIN_ENVIRONMENTS.get(ref, ref), key=key, base_dir=base_dir)
    for name in getattr(cls, "path_kwargs", ()):
        if base_dir and name in kwargs and not Path(kwargs[name]).is_absolute():
            kwargs[name] = str(Path(base_dir) / kwargs[name])
    if tool_timeout_s is not None and isinstance(cls, type) and issubclass(cls, ToolEnvironment):
        kwargs.setdefault("tool_timeout_s", tool_timeout_s)
    try:
        probe = cls(**kwargs)
    except Exception as e:
        raise PluginLoadError(f"{key}={ref!r}: cannot build it with rollout.environment_kwargs={kwargs}: {type(e).__name__}: {e}") from None
    missing = [m for m in ("reset", "step") if not inspect.iscoroutinefunction(getattr(probe, m, None))]
    if missing:
        raise PluginLoadError(f"{key}={ref!r}: {type(probe).__name__} needs async method(s) {missing} (see slime_rl.rollout.environments.Environment)")
    if not isinstance(getattr(probe, "tools", []), list):
        raise PluginLoadError(f"{key}={ref!r}: `tools` must be a list of OpenAI function schemas")

    def make() -> Environment:
        return cls(**kwargs)

    return make
