"""Tool calls in model output: `<tool_call>{json}</tool_call>` blocks -> typed calls, and back.

    assistant text ──parse_tool_calls──► ParsedTurn(content, calls=[ToolCall...], errors=[ToolCallError...])
    ToolCall ──to_openai──► {"id", "type": "function", "function": {"name", "arguments": "<json>"}}

The block format is the one Qwen2.5/Qwen3 (and the tiny model's template) render:
`<tool_call>\\n{"name": "calculator", "arguments": {"expression": "2 + 3"}}\\n</tool_call>`;
several blocks per turn are allowed. `arguments` may be an object or, OpenAI-style, a JSON string
holding one. A block that is not such an object (bad JSON, no name, arguments that are not an
object, a `<tool_call>` never closed) becomes a `ToolCallError` of kind `malformed`: the agent
loop shows it to the model as an error observation and counts it; parsing never raises.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
_BLOCK = re.compile(re.escape(TOOL_CALL_OPEN) + r"(.*?)" + re.escape(TOOL_CALL_CLOSE), re.DOTALL)


@dataclasses.dataclass(frozen=True, slots=True)
class ToolCall:
    """One well-formed call: `arguments` is always a dict."""

    id: str
    name: str
    arguments: dict[str, Any]

    def to_openai(self) -> dict[str, Any]:
        """The OpenAI `tool_calls` entry (`arguments` as a JSON string, as the API returns it)."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)},
        }


@dataclasses.dataclass(frozen=True, slots=True)
class ToolCallError:
    """A block that could not be read as a call (shown to the model as an error observation)."""

    id: str
    kind: str
    """`malformed` (the only kind parsing produces; the loop adds `unknown_tool`, `bad_arguments`,
    `timeout`, `tool_error`, `too_many_calls`)."""
    message: str
    raw: str


@dataclasses.dataclass(frozen=True, slots=True)
class ParsedTurn:
    """An assistant turn split into its text and its tool calls (in order of appearance)."""

    content: str
    """The text outside the tool-call blocks (a reasoning block included)."""
    calls: list[ToolCall]
    errors: list[ToolCallError]
    order: list[str]
    """Ids of calls and errors in the order their blocks appeared (observations keep it)."""

    @property
    def has_calls(self) -> bool:
        return bool(self.calls or self.errors)


def _read_block(inner: str, call_id: str) -> ToolCall | ToolCallError:
    raw = inner.strip()
    try:
        obj = json.loads(raw)
    except ValueError as e:
        return ToolCallError(call_id, "malformed", f"the tool call is not valid JSON ({e})", raw)
    if not isinstance(obj, dict):
        return ToolCallError(call_id, "malformed", f"expected a JSON object, got {type(obj).__name__}", raw)
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return ToolCallError(call_id, "malformed", 'the tool call has no "name" string', raw)
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError as e:
            return ToolCallError(call_id, "malformed", f'"arguments" is a string that is not JSON ({e})', raw)
    if args is None:
        args = {}
    if not isinstance(args, dict):
        return ToolCallError(call_id, "malformed", f'"arguments" must be an object, got {type(args).__name__}', raw)
    return ToolCall(call_id, name, args)


def parse_tool_calls(text: str, id_prefix: str = "call") -> ParsedTurn:
    """Split `text` (decoded with special tokens kept) into content, calls and malformed blocks.

    Call ids are `f"{id_prefix}_{i}"` in block order. Never raises.

    >>> t = parse_tool_calls('<tool_call>\\n{"name": "calc", "arguments": {"x": 1}}\\n</tool_call>')
    >>> t.calls[0].name, t.calls[0].arguments, t.content
    ('calc', {'x': 1}, '')
    """
    calls: list[ToolCall] = []
    errors: list[ToolCallError] = []
    order: list[str] = []
    pieces: list[str] = []
    pos = 0
    for i, m in enumerate(_BLOCK.finditer(text)):
        pieces.append(text[pos : m.start()])
        pos = m.end()
        item = _read_block(m.group(1), f"{id_prefix}_{i}")
        (calls if isinstance(item, ToolCall) else errors).append(item)  # type: ignore[arg-type]
        order.append(item.id)
    rest = text[pos:]
    if TOOL_CALL_OPEN in rest:  # a block opened and never closed (e.g. cut by the token limit)
        head, _, tail = rest.partition(TOOL_CALL_OPEN)
        pieces.append(head)
        err = ToolCallError(f"{id_prefix}_{len(order)}", "malformed", f"{TOOL_CALL_OPEN} was never closed with {TOOL_CALL_CLOSE}", tail.strip())
        errors.append(err)
        order.append(err.id)
    else:
        pieces.append(rest)
    return ParsedTurn("".join(pieces), calls, errors, order)


def calls_from_openai(tool_calls: list[dict[str, Any]] | None) -> list[ToolCall]:
    """OpenAI-format `tool_calls` (arguments as JSON strings or objects) -> `ToolCall`s.

    Raises:
        ValueError: an entry without a function name or with arguments that are not a JSON object.
    """
    out = []
    for i, c in enumerate(tool_calls or []):
        fn = c.get("function", c)
        item = _read_block(json.dumps({"name": fn.get("name"), "arguments": fn.get("arguments", {})}), c.get("id") or f"call_{i}")
        if isinstance(item, ToolCallError):
            raise ValueError(f"tool_calls[{i}]: {item.message}")
        out.append(item)
    return out
