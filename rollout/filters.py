"""Dynamic sampling (DAPO, arXiv:2503.14476 §3.2): drop scored groups that carry no learning signal.

    scored group ──► filter(samples) ──► keep → buffer.put
                                    └──► drop → slot freed, a replacement group is admitted

`rollout.filter` names the filter: `none`, `nonzero_std` (built in), or a user function
`module:function` / `path/to/file.py:function` that takes the scored group (`list[Sample]`)
and returns `bool` (keep) or `(bool, reason)`. A filter that raises drops nothing: the error
is counted and the group kept, so a buggy filter never starves the trainer silently.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

from slime_rl.buffers.schema import Sample
from slime_rl.rollout.plugins import load_object

logger = logging.getLogger(__name__)

FilterFn = Callable[[Sequence[Sample]], Any]


def keep_all(samples: Sequence[Sample]) -> bool:
    """`none`: every group is trained."""
    return True


def nonzero_std(samples: Sequence[Sample], rel_tol: float = 1e-6) -> tuple[bool, str]:
    """Keep a group only if its rewards differ (GRPO gives all-equal groups zero advantage).

    Failed samples are left out, as the trainer leaves them out of the group baseline.
    """
    rewards = [s.reward for s in samples if s.status != "failed"]
    if len(rewards) < 2:
        return False, "too_few_scored"
    lo, hi = min(rewards), max(rewards)
    if hi - lo <= rel_tol * max(1.0, abs(hi), abs(lo)):
        return False, "all_correct" if hi > 0 else "all_equal"
    return True, "kept"


BUILTIN_FILTERS: dict[str, FilterFn] = {"none": keep_all, "nonzero_std": nonzero_std}


class GroupFilter:
    """A loaded filter plus its counts (kept / dropped by reason / errors)."""

    def __init__(self, ref: str, base_dir: str | None = None) -> None:
        self.ref = ref
        if ref in BUILTIN_FILTERS:
            self.fn: FilterFn = BUILTIN_FILTERS[ref]
        else:
            self.fn = load_object(ref, key="rollout.filter", base_dir=base_dir, callable_with=1)
        self.is_noop = self.fn is keep_all

    def __call__(self, samples: Sequence[Sample]) -> tuple[bool, str]:
        """(keep, reason) for one scored group; never raises."""
        try:
            out = self.fn(list(samples))
        except Exception as e:  # a buggy user filter must not stop generation
            logger.warning("rollout.filter=%s raised %s: %s; keeping the group", self.ref, type(e).__name__, e)
            return True, "filter_error"
        if isinstance(out, tuple):
            keep, reason = bool(out[0]), str(out[1]) if len(out) > 1 else ""
        else:
            keep, reason = bool(out), ""
        return keep, reason or ("kept" if keep else "dropped")


def reward_std(samples: Sequence[Sample]) -> float:
    """Population std of the group's rewards (0 for fewer than 2 samples)."""
    r = [s.reward for s in samples]
    if len(r) < 2:
        return 0.0
    mean = math.fsum(r) / len(r)
    return math.sqrt(math.fsum((x - mean) ** 2 for x in r) / len(r))
