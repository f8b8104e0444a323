"""Config section ``reward`` (composed into the root config by slime_rl.config).

Field metadata declares the allowed values (``ge``/``gt``/``le``/``choices``); the root
loader checks them and names the full key path on error.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

_SECRET_WORDS = ("api_key", "apikey", "token", "secret", "password", "authorization")


@dataclass
class RewardComponentConfig:
    """One weighted term of a combined reward (an entry of ``reward.combine``)."""

    fn: str = "slime_rl.rewards.builtin:math_answer"
    """Reward reference: a built-in name (`math_answer`), `package.module:function` or `path/to/file.py:function`."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments passed to `fn` on every call (or to the class constructor)."""
    weight: float = 1.0
    """Weight of this term; the sample's reward is the weighted sum of the terms."""
    name: str | None = None
    """Metric name of this term (`reward/<name>/score`); defaults to the function's name."""


@dataclass
class RewardConfig:
    fn: str = "slime_rl.rewards.builtin:math_answer"
    """Reward reference: a built-in name (`math_answer`), `package.module:function` or `path/to/file.py:function`."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments passed to `fn` on every call."""
    combine: list[RewardComponentConfig] = field(default_factory=list)
    """Weighted terms summed into one reward; when non-empty, `fn` and `kwargs` are ignored."""
    timeout_s: float = field(default=30.0, metadata={"gt": 0})
    """Per-call timeout; a sample whose reward times out is marked `failed`."""
    default_score: float = 0.0
    """Score given to a sample whose reward failed (exception, timeout or NaN)."""
    max_workers: int = field(default=4, metadata={"ge": 1})
    """Threads (or processes, see `executor`) that run blocking (non-async) reward functions, so they never block the event loop."""
    executor: str = field(default="thread", metadata={"choices": ("thread", "process")})
    """Where blocking rewards run: `thread` (cheap; a call past its timeout keeps its thread) or `process` (CPU parallelism; a call past its timeout is killed)."""
    failure_policy: str = field(default="raise", metadata={"choices": ("raise", "warn")})
    """When one reward term fails on every sample of a step: `raise` stops the run, `warn` logs and goes on."""


def _is_secret(key: str) -> bool:
    k = key.lower()
    return any(w in k for w in _SECRET_WORDS) and not k.endswith("_env")


def _redact(kwargs: Any) -> Any:
    if isinstance(kwargs, dict):
        return {k: "***" if _is_secret(str(k)) and v else _redact(v) for k, v in kwargs.items()}
    if isinstance(kwargs, list):
        return [_redact(v) for v in kwargs]
    return kwargs


def redacted(cfg: RewardConfig) -> RewardConfig:
    """A copy of ``cfg`` fit to be saved with a run: literal keys, tokens and passwords in
    ``kwargs`` become ``"***"`` (``*_env`` fields, which name variables, are kept)."""
    combine = [dataclasses.replace(t, kwargs=_redact(dict(t.kwargs))) for t in cfg.combine]
    return dataclasses.replace(cfg, kwargs=_redact(dict(cfg.kwargs)), combine=combine)
