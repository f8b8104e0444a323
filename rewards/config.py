"""Config section ``reward`` (composed into the root config by slime_rl.config).

Field metadata declares the allowed values (``ge``/``gt``/``le``/``choices``); the root
loader checks them and names the full key path on error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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
    """Threads that run blocking (non-async) reward functions, so they never block the event loop."""
    failure_policy: str = field(default="raise", metadata={"choices": ("raise", "warn")})
    """When one reward term fails on every sample of a step: `raise` stops the run, `warn` logs and goes on."""
