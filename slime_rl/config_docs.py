"""Render the config schema's defaults as commented YAML (this is `configs/base.yaml`).

Each field's doc is the string literal right below it in its dataclass; this module reads
those with `ast`, so the docs live in one place and base.yaml can never drift (a test
compares the two).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
from functools import cache
from typing import Any

import yaml
from omegaconf import MISSING

from slime_rl.config import Config

_HEADER = """\
# slime-rl defaults: every key of the run config, its default and what it does.
# Generated from the config dataclasses (`slime-rl config --defaults`); do not edit by hand.
# Run configs (configs/examples/*.yaml) state only what differs from this file.
# `???` marks a value that must be set.
"""


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Field name -> the docstring written right below it in ``cls``."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for prev, node in zip(body, body[1:]):
        if (
            isinstance(prev, ast.AnnAssign)
            and isinstance(prev.target, ast.Name)
            and isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            docs[prev.target.id] = " ".join(node.value.value.split())
    return docs


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return f.default


def _scalar(value: Any) -> str:
    if value is MISSING or value == "???":
        return "???"
    return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("\n...").removesuffix("...").strip()


def _render(cls: type, indent: int) -> list[str]:
    pad = "  " * indent
    docs = field_docs(cls)
    lines: list[str] = []
    for f in dataclasses.fields(cls):
        value = _default(f)
        doc = docs.get(f.name) or (inspect.getdoc(type(value)) if dataclasses.is_dataclass(value) else "")
        if doc:
            lines += [f"{pad}# {line}" for line in textwrap.wrap(doc, 96 - len(pad))]
        if dataclasses.is_dataclass(value):
            lines.append(f"{pad}{f.name}:")
            lines += _render(type(value), indent + 1)
        else:
            lines.append(f"{pad}{f.name}: {_scalar(value)}")
    return lines


def render_defaults() -> str:
    """The documented defaults of every config key, as YAML text."""
    sections: list[str] = []
    for f in dataclasses.fields(Config):
        section = _default(f)
        block = [f"{f.name}:"] + _render(type(section), 1)
        sections.append("\n".join(block))
    return _HEADER + "\n" + "\n\n".join(sections) + "\n"
