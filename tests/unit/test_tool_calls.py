"""Parsing `<tool_call>{json}</tool_call>` blocks: several per turn, malformed ones, OpenAI format."""

from __future__ import annotations

import json

import pytest
from slime_rl.rollout.tool_calls import calls_from_openai, parse_tool_calls


def test_several_calls_in_one_turn_keep_their_order_and_the_text() -> None:
    text = (
        "<think>\nneed two\n</think>\n\n"
        '<tool_call>\n{"name": "calculator", "arguments": {"expression": "2 + 3"}}\n</tool_call>'
        '<tool_call>{"name": "search", "arguments": "{\\"query\\": \\"Ana\\"}"}</tool_call>'
    )
    t = parse_tool_calls(text, id_prefix="call_1")
    assert [c.name for c in t.calls] == ["calculator", "search"]
    assert t.calls[0].arguments == {"expression": "2 + 3"}
    assert t.calls[1].arguments == {"query": "Ana"}  # OpenAI style: arguments as a JSON string
    assert t.order == ["call_1_0", "call_1_1"] and not t.errors
    assert t.content == "<think>\nneed two\n</think>\n\n"
    openai = t.calls[0].to_openai()
    assert openai["type"] == "function" and json.loads(openai["function"]["arguments"]) == {"expression": "2 + 3"}


@pytest.mark.parametrize(
    ("block", "problem"),
    [
        ("<tool_call>{not json}</tool_call>", "not valid JSON"),
        ('<tool_call>["calculator"]</tool_call>', "expected a JSON object"),
        ('<tool_call>{"arguments": {}}</tool_call>', 'no "name"'),
        ('<tool_call>{"name": "c", "arguments": [1]}</tool_call>', "must be an object"),
        ('<tool_call>{"name": "c", "arguments": "{bad"}</tool_call>', "string that is not JSON"),
        ('<tool_call>{"name": "c", "arguments": {}', "never closed"),
    ],
)
def test_malformed_blocks_become_errors_not_exceptions(block: str, problem: str) -> None:
    t = parse_tool_calls("before " + block)
    assert not t.calls and len(t.errors) == 1
    assert t.errors[0].kind == "malformed" and problem in t.errors[0].message
    assert t.content.startswith("before") and t.has_calls


def test_good_and_bad_blocks_mixed() -> None:
    t = parse_tool_calls('<tool_call>{"name": "a"}</tool_call><tool_call>oops</tool_call><tool_call>{"name": "b", "arguments": null}</tool_call>')
    assert [c.name for c in t.calls] == ["a", "b"] and t.calls[0].arguments == {} == t.calls[1].arguments
    assert [e.id for e in t.errors] == ["call_1"] and t.order == ["call_0", "call_1", "call_2"]


def test_no_calls() -> None:
    t = parse_tool_calls("The answer is 4.")
    assert t.content == "The answer is 4." and not t.has_calls


def test_calls_from_openai() -> None:
    calls = calls_from_openai([{"id": "x", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}])
    assert calls[0].id == "x" and calls[0].arguments == {"a": 1}
    with pytest.raises(ValueError, match=r"tool_calls\[0\]"):
        calls_from_openai([{"function": {"name": "f", "arguments": "[1]"}}])
