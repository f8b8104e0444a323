"""The staleness bound end to end, without Ray: the real `Admission` ledger, the real `ReplayBuffer`
(oldest versions first) and a trainer that waits for due groups, against engines whose generation
times have a long tail. No group may be dropped as stale or trained staler than the bound, and the
trainer must not wait when nothing is due."""

from __future__ import annotations

import random

import pytest
from slime_rl.buffers import BufferConfig, ReplayBuffer, Sample, samples_to_batch
from slime_rl.rollout.admission import Admission, GroupState


def _batch(gid: str, version: int, n: int = 2):
    return samples_to_batch([Sample(sample_id=f"{gid}-{i}", group_id=gid, prompt_ids=[1], response_ids=[2],
                                    policy_version=version) for i in range(n)])


@pytest.mark.parametrize("B,S,seed", [(2, 1, 0), (4, 1, 1), (4, 2, 2), (8, 1, 3), (3, 0, 4), (8, 2, 5)])
def test_due_wait_and_oldest_first_keep_every_group_within_the_bound(B: int, S: int, seed: int) -> None:
    rng = random.Random(seed)
    adm = Admission(B, S)
    buf = ReplayBuffer(BufferConfig(capacity_groups=64, max_staleness=S), group_size=2)
    running: dict[str, tuple[int, int]] = {}  # group id -> (finish tick, policy version)
    trained, waited_ticks, tick, version, n = 0, 0, 0, 0, 0
    worst = 0
    while trained < 60 * B:
        tick += 1
        while (w := adm.admit(f"g{n}", n, 0, None)) is not None:  # the engines start what is allowed
            adm.start(w, "e0")
            long_tail = rng.random() < 0.15
            running[w.group_id] = (tick + (rng.randint(8, 30) if long_tail else rng.randint(1, 3)), adm.engine_version)
            n += 1
        for w in list(adm):
            if w.state is GroupState.RUNNING and running[w.group_id][0] <= tick:
                adm.finish(w, [])
                buf.put(_batch(w.group_id, running.pop(w.group_id)[1]))
                adm.accept([w])
        if adm.due(version):
            waited_ticks += 1
            continue  # the trainer waits for groups that must be in this batch
        if len(buf) < B:
            continue
        table = buf.get_batch(B, version, S, timeout=0)
        worst = max(worst, version - min(table.column("policy_version").to_pylist()))
        trained += B
        version += 1
        adm.set_engine_version(version)  # weights published and loaded at once
    assert buf.stats()["buffer/dropped_stale"] == 0
    assert worst <= S
    assert waited_ticks < tick  # it waits only sometimes


def test_due_lists_groups_admitted_at_or_before_the_deadline() -> None:
    adm = Admission(2, 1)
    old = adm.admit("old", 0, 0, None)  # admitted at engine version 0
    adm.set_engine_version(1)
    new = adm.admit("new", 1, 0, None)
    assert old.admitted_version == 0 and new.admitted_version == 1
    assert adm.due(0) == [] and adm.due(1) == [old] and set(w.group_id for w in adm.due(2)) == {"old", "new"}


def test_buffer_hands_out_the_oldest_versions_first() -> None:
    buf = ReplayBuffer(BufferConfig(capacity_groups=8, max_staleness=5), group_size=2)
    for gid, v in (("a", 3), ("b", 1), ("c", 2), ("d", 1)):
        buf.put(_batch(gid, v))
    order = list(dict.fromkeys(buf.get_batch(4, 4, timeout=1).column("group_id").to_pylist()))
    assert order == ["b", "d", "c", "a"]
