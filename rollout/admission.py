"""Staleness by admission, not by discard (AReaL, arXiv:2505.24298 §5).

The trainer takes `B` groups per step and its version goes up by one per step, so the k-th group
that will be trained (0-based, counted over the whole run) is trained at trainer version
`floor(k / B)`. A group started while the engines hold version `w` therefore has staleness
`floor(k / B) - w`, which is at most `S` exactly when `k < (S + w + 1) * B`. The manager starts
a group only while

    committed = accepted - dropped + in_flight  <  (S + w + 1) * B

where `accepted` counts groups put into the buffer (over the whole run, restored on resume),
`dropped` those the buffer later dropped as stale (the safety net: normally 0), and `in_flight`
the groups started and not yet put or filtered out. A group the dynamic-sampling filter drops is
never accepted, so its slot is free again. `w` advances only once every engine holds the new
weights. With `S = 0` no group can start before the weights it will be trained against are
loaded: exactly on-policy.

>>> a = AdmissionControl(batch_groups=2, max_staleness=0)
>>> [a.try_admit() for _ in range(3)]
[True, True, False]
>>> a.on_accepted(2); a.set_engine_version(1); a.try_admit()
True
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class AdmissionControl:
    """Counts of the admission rule (not thread-safe; the manager's event loop owns it)."""

    batch_groups: int
    """B: groups per trainer step."""
    max_staleness: int
    """S: largest `trainer_version - policy_version` allowed when trained."""
    engine_version: int = 0
    """w: the weight version every engine holds."""
    accepted: int = 0
    """Groups put into the buffer (whole run)."""
    dropped: int = 0
    """Accepted groups the buffer dropped as stale (they will not be trained)."""
    in_flight: int = 0
    """Groups admitted and not yet accepted or filtered out."""

    def __post_init__(self) -> None:
        if self.batch_groups < 1:
            raise ValueError(f"batch_groups={self.batch_groups} must be >= 1")
        if self.max_staleness < 0:
            raise ValueError(f"max_staleness={self.max_staleness} must be >= 0")

    @property
    def limit(self) -> int:
        """Most groups that may be committed at the current engine version."""
        return (self.max_staleness + self.engine_version + 1) * self.batch_groups

    @property
    def committed(self) -> int:
        return self.accepted - self.dropped + self.in_flight

    @property
    def free_slots(self) -> int:
        return max(0, self.limit - self.committed)

    def try_admit(self) -> bool:
        """Take a slot for a new group if the rule allows it."""
        if self.committed >= self.limit:
            return False
        self.in_flight += 1
        return True

    def on_accepted(self, n: int = 1) -> None:
        """`n` in-flight groups were put into the buffer."""
        self.in_flight -= n
        self.accepted += n

    def on_released(self, n: int = 1) -> None:
        """`n` in-flight groups left without being accepted (filtered out, or given up)."""
        self.in_flight -= n

    def set_engine_version(self, version: int) -> None:
        self.engine_version = max(self.engine_version, int(version))

    def set_dropped(self, dropped: int) -> None:
        """The buffer's cumulative count of stale-dropped groups."""
        self.dropped = max(self.dropped, int(dropped))

    def state_dict(self) -> dict[str, int]:
        return {"accepted": self.accepted, "dropped": self.dropped, "engine_version": self.engine_version}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore the counts of a checkpoint; in-flight groups are re-dispatched and recounted."""
        self.accepted = int(state["accepted"])
        self.dropped = int(state["dropped"])
        self.engine_version = int(state["engine_version"])
        self.in_flight = 0
