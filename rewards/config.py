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
    """Where blocking rewards run: `thread` (cheap; a call past its timeout keeps running in an abandoned thread, see `max_abandoned`) or `process` (CPU parallelism; a call past its timeout is killed)."""
    max_abandoned: int = field(default=64, metadata={"ge": 0})
    """Thread executor: how many calls past `timeout_s` may keep running in abandoned threads (a thread cannot be stopped); each gets a replacement thread so later samples never wait behind it. Beyond this, overdue calls keep their workers and, once every worker holds one, waiting calls fail at once. Metric `reward/abandoned_threads`."""
    failure_policy: str = field(default="raise", metadata={"choices": ("raise", "warn")})
    """When one reward term fails on every sample of a step: `raise` stops the run, `warn` logs and goes on."""


@dataclass
class RewardFaultsConfig:
    """Reward fault injection (config ``faults.reward``; off by default): a deterministic
    fraction of samples, picked by a hash of ``seed`` and the sample id, fails its reward call."""

    hang_frac: float = field(default=0.0, metadata={"ge": 0, "le": 1})
    """Fraction of samples whose reward call never returns: it times out after `reward.timeout_s` (its thread abandoned, or its worker process killed)."""
    raise_frac: float = field(default=0.0, metadata={"ge": 0, "le": 1})
    """Fraction of samples whose reward call raises `InjectedRewardFault`."""
    nan_frac: float = field(default=0.0, metadata={"ge": 0, "le": 1})
    """Fraction of samples whose reward returns NaN (counted as `reward/<term>/nonfinite`); the three fractions add up to at most 1."""
    seed: int = 0
    """Seed of the pick: the same seed picks the same samples on every run."""
    terms: list[str] = field(default_factory=list)
    """Reward terms to inject into (their metric names, e.g. `math_answer`); empty: every term."""

    def validate(self) -> None:
        total = self.hang_frac + self.raise_frac + self.nan_frac
        if total > 1.0 + 1e-9:
            raise ValueError(
                f"hang_frac + raise_frac + nan_frac = {total:g}: the fractions of samples picked "
                "for each fault must add up to at most 1"
            )


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
