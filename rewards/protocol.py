"""What a reward function is: its call forms, its result, and how a result is normalised.

A reward function takes one :class:`~slime_rl.buffers.schema.Sample` (plus the configured
keyword arguments) and returns a float, or a dict with ``score`` and extra fields. Numeric
extras are logged as metrics; other extras (a judge's text, say) land in the sample's
metadata under ``reward_info``. It may be ``async def``. A *batched* function is declared
with :func:`batched` and takes the list of samples of a group, returning one result each.

A class works too: it is built once with the configured kwargs, and its instances are
called per sample (or per batch when the class is decorated with :func:`batched`). That is
how rewards keep state such as an HTTP session; an ``aclose()`` or ``close()`` method is
called when the runner shuts down.

>>> @batched
... def length_bonus(samples, scale=1.0):
...     return [scale * len(s.response) for s in samples]
>>> is_batched(length_bonus)
True
>>> normalize_result({"score": 1, "extracted": True})
(1.0, {'extracted': 1.0}, {})
"""

from __future__ import annotations

import contextvars
import math
import numbers
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol, TypeVar, runtime_checkable

from slime_rl.buffers.schema import Sample

RewardResult = float | Mapping[str, Any]
"""A float score, or a mapping with a numeric ``score`` and extra fields."""

_BATCHED_ATTR = "__slime_rl_batched__"
_QUEUED_ATTR = "__slime_rl_queued__"
_WORK_STARTED: contextvars.ContextVar[Callable[[], None] | None] = contextvars.ContextVar(
    "slime_rl_reward_work_started", default=None
)

F = TypeVar("F", bound=Callable[..., Any])


@runtime_checkable
class RewardFn(Protocol):
    """Per-sample reward: ``fn(sample, **kwargs) -> float | dict`` (may be async)."""

    def __call__(
        self, sample: Sample, /, **kwargs: Any
    ) -> RewardResult | Awaitable[RewardResult]: ...


@runtime_checkable
class BatchedRewardFn(Protocol):
    """Batched reward: ``fn(samples, **kwargs) -> list[float | dict]`` (may be async)."""

    def __call__(
        self, samples: Sequence[Sample], /, **kwargs: Any
    ) -> Sequence[RewardResult] | Awaitable[Sequence[RewardResult]]: ...


def batched(fn: F) -> F:
    """Declare that ``fn`` (a function or a class) takes a list of samples and returns a list.

    The runner then calls it once per group instead of once per sample.
    """
    setattr(fn, _BATCHED_ATTR, True)
    return fn


def is_batched(fn: Any) -> bool:
    """True when ``fn`` (or its class) was declared with :func:`batched`."""
    return bool(getattr(fn, _BATCHED_ATTR, False) or getattr(type(fn), _BATCHED_ATTR, False))


_CHECK_ATTR = "__slime_rl_check__"


def checked_by(check: Callable[..., None]) -> Callable[[F], F]:
    """Attach a start-up check of a reward function's kwargs: the loader calls
    ``check(**kwargs)`` once, and a ``ValueError``/``TypeError`` stops the run there (naming
    the config key) instead of failing every sample."""

    def wrap(fn: F) -> F:
        setattr(fn, _CHECK_ATTR, check)
        return fn

    return wrap


def kwargs_check(fn: Any) -> Callable[..., None] | None:
    """The start-up check attached with :func:`checked_by`, if any."""
    return getattr(fn, _CHECK_ATTR, None)


def queued(fn: F) -> F:
    """Declare that an async reward (function or class) waits for its own concurrency slots
    (a semaphore, a connection pool) and calls :func:`work_started` once it has one.

    The runner's per-call timeout (``reward.timeout_s``) then starts at that call instead of
    when the call was made, so time spent queueing behind other samples never counts.
    """
    setattr(fn, _QUEUED_ATTR, True)
    return fn


def is_queued(fn: Any) -> bool:
    """True when ``fn`` (or its class) was declared with :func:`queued`."""
    return bool(getattr(fn, _QUEUED_ATTR, False) or getattr(type(fn), _QUEUED_ATTR, False))


def work_started() -> None:
    """Tell the runner that the current reward call stopped queueing and started working.

    Only the first call per reward call counts; outside a :func:`queued` reward run by the
    runner it does nothing.
    """
    callback = _WORK_STARTED.get()
    if callback is not None:
        callback()


def _as_number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        try:
            item = value.item()
        except (TypeError, ValueError):
            return None
        return float(item) if isinstance(item, numbers.Real) else None
    return None


def normalize_result(result: Any) -> tuple[float, dict[str, float], dict[str, Any]]:
    """Turn a reward function's return value into ``(score, metrics, info)``.

    Raises:
        TypeError: the result is neither a number nor a mapping with a numeric ``score``.
        ValueError: the score is NaN or infinite.
    """
    metrics: dict[str, float] = {}
    info: dict[str, Any] = {}
    if isinstance(result, Mapping):
        if "score" not in result:
            raise TypeError(
                f"returned a dict without a 'score' key (keys: {sorted(result)}); "
                "return a float or {'score': float, ...}"
            )
        score = _as_number(result["score"])
        if score is None:
            raise TypeError(f"returned score {result['score']!r}; it must be a number")
        for key, value in result.items():
            if key == "score":
                continue
            num = _as_number(value)
            if num is None:
                info[str(key)] = value
            elif math.isfinite(num):
                metrics[str(key)] = num
    else:
        score = _as_number(result)
        if score is None:
            raise TypeError(
                f"returned {type(result).__name__} {result!r:.80}; "
                "return a float or {'score': float, ...}"
            )
    if not math.isfinite(score):
        raise ValueError(f"returned a non-finite score ({score})")
    return score, metrics, info
