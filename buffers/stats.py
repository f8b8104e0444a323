"""Counters of the replay buffer, reported as slash-namespaced metrics (``buffer/...``).

Counters are cumulative since the buffer (or the run it was recovered/loaded from) began;
the driver reduces them per step. ``buffer/batch_*`` describe the last batch served.
"""

from __future__ import annotations

import dataclasses
from typing import Any

HIST_MAX = 16
"""Served-group staleness histogram: one bucket per value 0..HIST_MAX-1, then ``ge{HIST_MAX}``."""


@dataclasses.dataclass
class BufferStats:
    groups_in: int = 0
    samples_in: int = 0
    groups_out: int = 0
    samples_out: int = 0
    dropped_stale: int = 0
    dropped_stale_samples: int = 0
    served_stale: int = 0
    rejected_full: int = 0
    rejected_invalid: int = 0
    get_timeouts: int = 0
    put_wait_s: float = 0.0
    get_wait_s: float = 0.0
    compactions: int = 0
    compaction_errors: int = 0
    duplicate_groups: int = 0
    """Groups skipped by ``put`` because their id was already accepted (retried puts)."""
    future_version: int = 0
    """Groups served with a ``policy_version`` newer than the trainer's version (counted in bucket 0)."""
    staleness_hist: dict[str, int] = dataclasses.field(default_factory=dict)
    batch_staleness_mean: float = 0.0
    batch_staleness_max: float = 0.0
    batch_token_staleness_mean: float = 0.0
    batch_token_staleness_max: float = 0.0

    def on_put(self, num_groups: int, num_samples: int) -> None:
        self.groups_in += num_groups
        self.samples_in += num_samples

    def on_leave(self, outcome: str, staleness: int, num_samples: int, max_staleness: int | None = None) -> None:
        """Count one group leaving: ``consumed`` (served to a trainer) or ``dropped_stale``."""
        if outcome == "dropped_stale":
            self.dropped_stale += 1
            self.dropped_stale_samples += num_samples
            return
        self.groups_out += 1
        self.samples_out += num_samples
        if staleness < 0:
            self.future_version += 1
        key = str(max(staleness, 0)) if staleness < HIST_MAX else f"ge{HIST_MAX}"
        self.staleness_hist[key] = self.staleness_hist.get(key, 0) + 1
        if max_staleness is not None and staleness > max_staleness:
            self.served_stale += 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BufferStats:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def metrics(self) -> dict[str, float]:
        """Flat ``buffer/<name>`` metrics; the histogram as ``buffer/staleness_hist/<k>``."""
        out: dict[str, float] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "staleness_hist":
                for k, n in sorted(value.items(), key=lambda kv: (len(kv[0]), kv[0])):
                    out[f"buffer/staleness_hist/{k}"] = float(n)
            else:
                out[f"buffer/{f.name}"] = float(value)
        return out


@dataclasses.dataclass(frozen=True, slots=True)
class BufferCounts:
    """Cheap counters for the rollout side's admission control.

    AReaL's rule at trainer version ``v`` with batch ``B`` groups:
    ``accepted_groups + running <= (max_staleness + v + 1) * B`` before starting a group.
    """

    accepted_groups: int
    """Groups ever accepted by ``put`` (including ones since consumed or dropped)."""
    consumed_groups: int
    """Groups served to trainers."""
    dropped_groups: int
    """Groups dropped as too stale."""
    held_groups: int
    capacity_groups: int
    version: int
    """Newest trainer version the buffer has been told of (``get_batch``/``set_version``)."""
