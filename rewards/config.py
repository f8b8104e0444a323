"""Config section ``reward`` (composed into the root config by slime_rl.config).

Field metadata declares the allowed values (``ge``/``gt``/``le``/``choices``); the root
loader checks them and names the full key path on error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class RewardConfig:
    fn: str = "slime_rl.rewards.builtin:math_answer"
    """Reward function reference: `package.module:function` or `path/to/file.py:function`."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments passed to `fn` on every call."""
    timeout_s: float = field(default=30.0, metadata={"gt": 0})
    """Per-call timeout; a sample whose reward times out is marked `failed`."""
    default_score: float = 0.0
    """Score given to a sample whose reward failed (exception, timeout or NaN)."""
