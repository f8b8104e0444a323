"""Admission: which prompt groups may be in flight, and the state of each (AReaL, arXiv:2505.24298 §5).

Staleness by admission, not by discard. The trainer takes `B = trainer.global_batch_groups`
groups per step and its version goes up by one per step, so the k-th group that will be trained
(0-based, counted over the whole run) is trained at trainer version `floor(k / B)`. A group
started while the engines hold version `w` therefore has staleness `floor(k / B) - w`, which is
at most `S = max_staleness` exactly when `k < (S + w + 1) * B`. A new group is admitted only while

    committed = accepted - dropped + in_flight  <  (S + w + 1) * B

where `accepted` counts groups put into the buffer (over the whole run, restored on resume),
`dropped` those the buffer later dropped as stale (the safety net: normally 0), and `in_flight`
the groups admitted and not yet accepted or released. A group the dynamic-sampling filter drops
is released, so its slot is free again. `w` advances only once every engine holds the new
weights. With `S = 0` no group can start before the weights it will be trained against are
loaded: exactly on-policy.

Admission alone bounds the staleness only if groups are trained in the order they were admitted.
Fast groups overtake slow ones, so the trainer also waits, at version `v`, for every group
admitted at engine version `<= v - S` that is still in flight (`due`): such a group must be in
this batch or it would be trained too stale; and the buffer hands out the oldest versions first.
Together they replace discarding: stale drops stay at 0 unless a group is overtaken across
several versions by more than a batch of newer ones (then `buffer/dropped_stale` says so).

`Admission` is the one owner of the in-flight groups: each holds one slot from `admit` until
`accept` or `release`, and moves through explicit states

    admit ─► QUEUED ─start─► RUNNING ─finish─► FINISHED ─accept─► (in the buffer; slot counted in `accepted`)
               ▲                │                 (release from RUNNING: filtered out, slot freed)
               └────requeue─────┘ (its engine was lost; keeps its slot, goes first)

>>> a = Admission(global_batch_groups=2, max_staleness=0)
>>> [a.admit(f"g{i}", i, 0, None) is not None for i in range(3)]
[True, True, False]
>>> for w in a.queued(): a.start(w, "engine-0"); a.finish(w)
>>> a.accept(a.take_finished()); a.set_engine_version(1); a.admit("g2", 2, 0, None).state
<GroupState.QUEUED: 'queued'>
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import time
from collections.abc import Callable, Iterator
from typing import Any


class GroupState(str, enum.Enum):
    """Where an admitted group is; it leaves the ledger when accepted or released."""

    QUEUED = "queued"
    """Holds a slot, waits for an engine (new, requeued after an engine loss, or re-dispatched
    after a resume)."""
    RUNNING = "running"
    """Generating, being scored and filtered on an engine."""
    FINISHED = "finished"
    """Scored and kept; waits for the next buffer put."""


@dataclasses.dataclass(slots=True)
class GroupWork:
    """One admitted prompt group: stable id (dataset uid + epoch), where it came from, its state."""

    group_id: str
    ds_index: int
    epoch: int
    prompt: Any
    state: GroupState = GroupState.QUEUED
    engine: str | None = None
    """Engine it runs (or last ran) on."""
    started: float = 0.0
    """`time.monotonic()` of its latest start on an engine."""
    attempts: int = 0
    """Times it was started (more than one after an engine loss)."""
    samples: list[Any] = dataclasses.field(default_factory=list)
    """Its scored samples once FINISHED."""
    request_ids: list[str] = dataclasses.field(default_factory=list)
    """Engine request ids of its current generate call (for progress probes)."""
    admitted_version: int = 0
    """Engine version when it took its slot: the trainer must train it by version
    `admitted_version + max_staleness` (it waits for it then)."""


class Admission:
    """Slot counts of the admission rule and the groups holding them (not thread-safe: the
    manager's event loop owns it)."""

    def __init__(self, global_batch_groups: int, max_staleness: int) -> None:
        if global_batch_groups < 1:
            raise ValueError(f"global_batch_groups={global_batch_groups} must be >= 1")
        if max_staleness < 0:
            raise ValueError(f"max_staleness={max_staleness} must be >= 0")
        self.global_batch_groups = global_batch_groups
        """B: groups per trainer step."""
        self.max_staleness = max_staleness
        """S: largest `trainer_version - policy_version` allowed when trained."""
        self.engine_version = 0
        """w: the weight version every engine holds."""
        self.accepted = 0
        """Groups put into the buffer (whole run)."""
        self.dropped = 0
        """Accepted groups the buffer dropped as stale (they will not be trained)."""
        self._groups: dict[str, GroupWork] = {}
        self._queue: collections.deque[GroupWork] = collections.deque()

    # ---- counts --------------------------------------------------------------------------------
    @property
    def in_flight(self) -> int:
        """Groups admitted and not yet accepted or released (every state)."""
        return len(self._groups)

    @property
    def limit(self) -> int:
        """Most groups that may be committed at the current engine version."""
        return (self.max_staleness + self.engine_version + 1) * self.global_batch_groups

    @property
    def committed(self) -> int:
        return self.accepted - self.dropped + self.in_flight

    @property
    def free_slots(self) -> int:
        return max(0, self.limit - self.committed)

    def count(self, state: GroupState) -> int:
        return sum(w.state is state for w in self._groups.values())

    def __iter__(self) -> Iterator[GroupWork]:
        return iter(list(self._groups.values()))

    # ---- transitions ---------------------------------------------------------------------------
    def admit(self, group_id: str, ds_index: int, epoch: int, prompt: Any) -> GroupWork | None:
        """Take a slot for a new group (QUEUED) if the rule allows it, else None."""
        if self.committed >= self.limit:
            return None
        if group_id in self._groups:
            raise AssertionError(f"group {group_id} is admitted twice")
        work = GroupWork(group_id, ds_index, epoch, prompt, admitted_version=self.engine_version)
        self._groups[group_id] = work
        self._queue.append(work)
        return work

    def due(self, trainer_version: int) -> list[GroupWork]:
        """Groups in flight that the trainer must take at `trainer_version` (admitted at an
        engine version `<= trainer_version - max_staleness`): it waits for them."""
        deadline = trainer_version - self.max_staleness
        return [w for w in self._groups.values() if w.admitted_version <= deadline]

    def queued(self) -> list[GroupWork]:
        """QUEUED groups in dispatch order (requeued ones first)."""
        return list(self._queue)

    def next_queued(self) -> GroupWork | None:
        return self._queue[0] if self._queue else None

    def start(self, work: GroupWork, engine: str) -> None:
        """QUEUED -> RUNNING on `engine`."""
        self._expect(work, GroupState.QUEUED)
        self._queue.remove(work)
        work.state, work.engine, work.started = GroupState.RUNNING, engine, time.monotonic()
        work.attempts += 1

    def requeue(self, work: GroupWork) -> None:
        """RUNNING -> QUEUED at the front (its engine was lost); it keeps its slot."""
        self._expect(work, GroupState.RUNNING)
        work.state = GroupState.QUEUED
        self._queue.appendleft(work)

    def finish(self, work: GroupWork, samples: list[Any] | None = None) -> None:
        """RUNNING -> FINISHED (kept by the filter; waits for the next put)."""
        self._expect(work, GroupState.RUNNING)
        work.state, work.samples = GroupState.FINISHED, list(samples or [])

    def release(self, work: GroupWork) -> None:
        """RUNNING -> gone without being accepted (filtered out): its slot is free again."""
        self._expect(work, GroupState.RUNNING)
        del self._groups[work.group_id]

    def take_finished(self) -> list[GroupWork]:
        """Every FINISHED group, in finishing order (they stay in flight until `accept`)."""
        return [w for w in self._groups.values() if w.state is GroupState.FINISHED]

    def accept(self, works: list[GroupWork]) -> None:
        """FINISHED -> in the buffer: they leave the ledger and count as accepted."""
        for w in works:
            self._expect(w, GroupState.FINISHED)
        for w in works:
            del self._groups[w.group_id]
        self.accepted += len(works)

    def _expect(self, work: GroupWork, state: GroupState) -> None:
        current = self._groups.get(work.group_id)
        now = current.state.value if current is work else "not admitted"
        assert current is work and work.state is state, f"group {work.group_id} is {now}, expected {state.value}"

    # ---- versions and the buffer ---------------------------------------------------------------
    def set_engine_version(self, version: int) -> None:
        self.engine_version = max(self.engine_version, int(version))

    def set_dropped(self, dropped: int) -> None:
        """The buffer's cumulative count of stale-dropped groups."""
        self.dropped = max(self.dropped, int(dropped))

    # ---- checkpoint ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Counts and the groups in flight (every state: none of them is in the buffer yet)."""
        return {
            "accepted": self.accepted,
            "dropped": self.dropped,
            "engine_version": self.engine_version,
            "in_flight": [(w.group_id, w.ds_index, w.epoch, w.admitted_version) for w in self._groups.values()],
        }

    def load_state_dict(self, state: dict[str, Any], prompt_of: Callable[[int], Any]) -> None:
        """Restore a checkpoint: the counts, and every group that was in flight back in the
        queue (same group id, same slot) to be generated again first."""
        self.accepted = int(state["accepted"])
        self.dropped = int(state["dropped"])
        self.engine_version = int(state["engine_version"])
        self._groups.clear()
        self._queue.clear()
        for gid, idx, epoch, *rest in state.get("in_flight", []):
            admitted = int(rest[0]) if rest else self.engine_version  # (checkpoints before 4-tuples)
            work = GroupWork(gid, int(idx), int(epoch), prompt_of(int(idx)), admitted_version=admitted)
            self._groups[gid] = work
            self._queue.append(work)
