"""Environments of the multi-turn agent loop: the protocol, a tool-running base, the loader, built-ins.

    AgentLoop ──reset(prompt)────────────► Environment ──► optional first observation (a user message)
              ──step([ToolCall...])──────►             ──► StepResult(observations, done, reward)
              ──final_reward(trajectory)─►             ──► float | None  (metadata["episode_reward"])

An environment is any class with these coroutines (`Environment`); it is loaded by
`rollout.environment: module:Class`, `path/to/file.py:Class` or a built-in name (`calculator`,
`retrieval`, `python`), built with `rollout.environment_kwargs`, one instance per episode.
`ToolEnvironment` is the convenient base: declare tools as methods, and `step` runs a turn's
calls concurrently, each under `tool_timeout_s`, turning an unknown tool, bad arguments, a tool
that raises or one that times out into an error observation of that kind (never an exception).

Built-ins (all local, no network):
- `calculator`: one `calculator(expression)` tool (integer/float arithmetic, no names, no calls);
  reward 1 when the final answer equals the label.
- `retrieval`: `search(query)` over a local JSONL document collection (BM25); reward 1 when the
  final answer matches the label (normalised text).
- `python`: `python(code)` runs code in the rewards sandbox (`slime_rl.rewards.sandbox`), returns
  stdout/stderr; reward like `calculator`.
"""

from __future__ import annotations

import ast
import asyncio
import collections
import dataclasses
import inspect
import json
import logging
import math
import operator
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

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
# Answer checks shared by the built-ins

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
# Built-in: calculator

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


# ---------------------------------------------------------------------------------------------
# Built-in: retrieval over a local collection

_WORD = re.compile(r"\w+")


class BM25Index:
    """Okapi BM25 over a small in-memory collection (k1=1.5, b=0.75)."""

    def __init__(self, docs: Sequence[str], k1: float = 1.5, b: float = 0.75) -> None:
        self.docs = list(docs)
        self.k1, self.b = k1, b
        self.terms = [collections.Counter(_WORD.findall(d.lower())) for d in self.docs]
        self.lengths = [sum(t.values()) for t in self.terms]
        self.avg = sum(self.lengths) / max(1, len(self.lengths))
        df: collections.Counter[str] = collections.Counter()
        for t in self.terms:
            df.update(t.keys())
        n = len(self.docs)
        self.idf = {w: math.log(1 + (n - f + 0.5) / (f + 0.5)) for w, f in df.items()}

    def search(self, query: str, k: int = 3) -> list[tuple[int, float]]:
        """(doc index, score) of the best `k` documents with a positive score, best first."""
        words = _WORD.findall(query.lower())
        scores = []
        for i, (tf, n) in enumerate(zip(self.terms, self.lengths)):
            s = 0.0
            for w in words:
                f = tf.get(w, 0)
                if f:
                    s += self.idf[w] * f * (self.k1 + 1) / (f + self.k1 * (1 - self.b + self.b * n / self.avg))
            if s > 0:
                scores.append((i, s))
        scores.sort(key=lambda x: (-x[1], x[0]))
        return scores[:k]


_INDEXES: dict[tuple[str, float], BM25Index] = {}


def _load_index(path: str) -> BM25Index:
    """The collection at `path` (JSONL rows with a `text` field, or a .txt file, one document per
    line), indexed once per process and file version."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"retrieval environment: documents={path!r} is not a file (JSONL with a 'text' field, or .txt)")
    key = (str(p.resolve()), p.stat().st_mtime)
    if key not in _INDEXES:
        docs = []
        for n, line in enumerate(p.read_text().splitlines(), 1):
            if not line.strip():
                continue
            if p.suffix == ".txt":
                docs.append(line.strip())
                continue
            try:
                row = json.loads(line)
                docs.append(str(row["text"]) if isinstance(row, dict) else str(row))
            except (ValueError, KeyError) as e:
                raise ValueError(f"retrieval environment: {path}, line {n}: expected a JSON object with a 'text' field ({e})") from None
        if not docs:
            raise ValueError(f"retrieval environment: {path} holds no document")
        _INDEXES[key] = BM25Index(docs)
    return _INDEXES[key]


class RetrievalEnvironment(ToolEnvironment):
    """`search(query)` over a local document collection; reward 1.0 when the final answer matches
    the label (normalised text, or numbers as numbers).

    Args:
        documents: JSONL file with a `text` field per row (or a .txt file, one document a line).
        top_k: documents returned per search.
    """

    tools = [tool_schema("search", "Search the documents.", {"query": {"type": "string"}}, ["query"])]
    tool_methods = {"search": "search"}

    def __init__(self, documents: str, top_k: int = 1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if top_k < 1:
            raise ValueError(f"retrieval environment: top_k={top_k} must be >= 1")
        self.index = _load_index(documents)
        self.top_k = top_k

    def search(self, query: str) -> str:
        hits = self.index.search(str(query), self.top_k)
        if not hits:
            return "No document matches."
        return "\n".join(self.index.docs[i] for i, _ in hits)

    async def final_reward(self, trajectory: Trajectory) -> float | None:
        return float(answer_matches(trajectory.final_text, trajectory.prompt.label))


# ---------------------------------------------------------------------------------------------
# Built-in: python in the rewards sandbox


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


# ---------------------------------------------------------------------------------------------
# Loader

BUILTIN_ENVIRONMENTS: dict[str, type] = {
    "calculator": CalculatorEnvironment,
    "retrieval": RetrievalEnvironment,
    "python": PythonEnvironment,
}


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
    setting fails at start-up. A relative `documents` path of the retrieval built-in is resolved
    against `base_dir`. `tool_timeout_s` (`rollout.tool_timeout_s`) is passed to `ToolEnvironment`
    subclasses whose kwargs do not set their own.

    Raises:
        PluginLoadError: bad reference, constructor arguments, or a class without reset/step.
    """
    kwargs = dict(kwargs or {})
    cls = BUILTIN_ENVIRONMENTS.get(ref)
    if cls is None:
        cls = load_object(ref, key=key, base_dir=base_dir)
    if cls is RetrievalEnvironment and base_dir and "documents" in kwargs and not Path(kwargs["documents"]).is_absolute():
        kwargs["documents"] = str(Path(base_dir) / kwargs["documents"])
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
