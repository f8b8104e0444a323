"""The buffer as a Ray actor: concurrent writer actors, a reader, typed errors, a real crash.

Accepted = the writer's ``put`` returned. After ``ray.kill`` mid-run, recovery must hold
every accepted, unconsumed group exactly once; groups whose put did not return may or may
not be there, but nothing appears twice.
"""

from __future__ import annotations

import collections
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from ray import cloudpickle
from ray.exceptions import RayActorError
from slime_rl.buffers import (
    BufferClosedError,
    BufferConfig,
    BufferFullError,
    BufferTimeoutError,
    Sample,
    create_buffer_actor,
    samples_to_batch,
)

GROUP = 4

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import test modules


def group(gid: str, version: int = 0, tokens: int = 16) -> pa.RecordBatch:
    return samples_to_batch(
        [Sample(sample_id=f"{gid}-{i}", group_id=gid, prompt_ids=[1, 2], response_ids=list(range(tokens)), policy_version=version) for i in range(GROUP)]
    )


@ray.remote(num_cpus=0)
class Writer:
    """A stand-in rollout manager: puts groups ``<name>-<i>`` until told to stop or the buffer dies."""

    def __init__(self, buffer: ray.actor.ActorHandle, name: str) -> None:
        self.buffer, self.name, self.accepted = buffer, name, []

    def run(self, num_groups: int, pause_s: float = 0.0, tokens: int = 16) -> list[str]:
        for i in range(num_groups):
            gid = f"{self.name}-{i}"
            try:
                ray.get(self.buffer.put.remote(group(gid, tokens=tokens), timeout=60), timeout=90)
            except RayActorError:
                break
            self.accepted.append(gid)
            time.sleep(pause_s)
        return self.accepted


def runs(table: pa.Table) -> list[str]:
    """Group ids in row order, one entry per run of rows (a split group would repeat)."""
    out: list[str] = []
    for gid in table.column("group_id").to_pylist():
        if not out or out[-1] != gid:
            out.append(gid)
    return out


@pytest.mark.timeout(120)
def test_concurrent_writers_and_a_reader(ray_cluster) -> None:
    buffer = create_buffer_actor(BufferConfig(capacity_groups=8, max_staleness=0), group_size=GROUP)
    writers = [Writer.remote(buffer, f"w{k}") for k in range(4)]
    done = [w.run.remote(15) for w in writers]  # 60 groups through a buffer of 8: writers must block
    seen: list[str] = []
    while len(seen) < 60:
        table = ray.get(buffer.get_batch.remote(5, trainer_version=0, timeout=60), timeout=90)
        ids = runs(table)
        assert len(ids) == 5 and table.num_rows == 5 * GROUP  # whole groups, never split
        assert collections.Counter(table.column("group_id").to_pylist()) == {g: GROUP for g in ids}
        seen += ids
    accepted = [g for ids in ray.get(done, timeout=60) for g in ids]
    assert sorted(seen) == sorted(accepted) and len(set(seen)) == 60
    for k in range(4):  # each writer's groups come out in the order it put them (FIFO)
        mine = [g for g in seen if g.startswith(f"w{k}-")]
        assert mine == sorted(mine, key=lambda g: int(g.split("-")[1]))
    stats = ray.get(buffer.stats.remote())
    assert stats["buffer/groups_in"] == stats["buffer/groups_out"] == 60
    assert stats["buffer/put_wait_s"] > 0  # backpressure happened
    ray.get(buffer.close.remote())


@pytest.mark.timeout(60)
def test_errors_keep_their_type_through_ray(ray_cluster) -> None:
    buffer = create_buffer_actor(BufferConfig(capacity_groups=1, put_policy="reject"))
    ray.get(buffer.put.remote(group("a")))
    with pytest.raises(BufferFullError, match="put_policy=reject"):
        ray.get(buffer.put.remote(group("b")))
    with pytest.raises(BufferTimeoutError, match="waited"):
        ray.get(buffer.get_batch.remote(1, trainer_version=5, max_staleness=0, timeout=0.1))
    with pytest.raises(ValueError, match="column 'reward' row 0 is nan"):
        bad = group("c")
        ray.get(buffer.put.remote(bad.set_column(bad.schema.get_field_index("reward"), "reward", pa.array([float("nan")] * GROUP, pa.float32()))))
    counts = ray.get(buffer.counts.remote())
    assert (counts.accepted_groups, counts.dropped_groups, counts.held_groups) == (1, 1, 0)


@pytest.mark.timeout(60)
def test_blocked_writer_and_reader_do_not_block_each_other_and_close_wakes_them(ray_cluster) -> None:
    buffer = create_buffer_actor(BufferConfig(capacity_groups=2))
    ray.get(buffer.put.remote(group("a")))
    two = pa.Table.from_batches([group("b"), group("c")])
    blocked_put = buffer.put.remote(two, timeout=60)  # 1 + 2 > 2: waits for room
    blocked_get = buffer.get_batch.remote(2, trainer_version=0, timeout=60)  # 1 < 2: waits for groups
    ready, _ = ray.wait([blocked_put, blocked_get], timeout=0.5)
    assert ready == []
    assert ray.get(buffer.counts.remote(), timeout=10).held_groups == 1  # the actor still answers
    ray.get(buffer.close.remote(), timeout=10)
    for ref in (blocked_put, blocked_get):
        with pytest.raises(BufferClosedError):
            ray.get(ref, timeout=10)


@pytest.mark.timeout(300)
def test_kill_while_writers_run_then_recover(ray_cluster, tmp_path: Path) -> None:
    cfg = BufferConfig(capacity_groups=32, spill_dir=str(tmp_path / "spill"), compact_min_mb=0.05, max_staleness=0)
    buffer = create_buffer_actor(cfg, group_size=GROUP)
    ray.get(buffer.ready.remote())
    writers = [Writer.remote(buffer, f"w{k}") for k in range(3)]
    done = [w.run.remote(10_000, 0.002) for w in writers]
    received: list[str] = []
    stop = threading.Event()

    def read() -> None:  # the trainer: keeps consuming until the buffer dies
        while not stop.is_set():
            try:
                received.extend(runs(ray.get(buffer.get_batch.remote(3, trainer_version=0, timeout=5), timeout=30)))
            except BufferTimeoutError:
                continue  # writers not started yet (slow machine): wait again
            except RayActorError:
                return

    reader = threading.Thread(target=read)
    reader.start()
    deadline = time.monotonic() + 60
    while ray.get(buffer.counts.remote()).accepted_groups < 150:
        assert time.monotonic() < deadline, f"writers stalled: {ray.get(buffer.stats.remote())}"
        time.sleep(0.05)
    ray.kill(buffer, no_restart=True)
    accepted = [g for ids in ray.get(done, timeout=60) for g in ids]
    stop.set()
    reader.join(60)
    assert len(accepted) >= 100  # puts in flight at the kill may not have returned

    again = create_buffer_actor(cfg, group_size=GROUP, recover=True)
    held = ray.get(again.group_ids.remote(), timeout=60)
    out = tmp_path / "seen.parquet"
    ray.get(again.export.remote(str(out)))
    seen = pq.read_table(out)
    per_group = collections.Counter(seen.column("group_id").to_pylist())
    outcome = dict(zip(seen.column("group_id").to_pylist(), seen.column("buffer_outcome").to_pylist()))
    assert set(per_group.values()) == {GROUP}  # every group seen once, whole: nothing doubled
    assert len(held) == len(set(held))
    assert set(accepted) <= set(per_group)  # nothing accepted is lost...
    assert set(received) <= {g for g, o in outcome.items() if o == "consumed"}  # ...consumed stays consumed
    assert not set(received) & set(held)
    unreceived = set(accepted) - set(received)
    # accepted, not received: still held, or consumed by the get_batch the kill cut off
    assert unreceived - set(held) <= {g for g, o in outcome.items() if o == "consumed"} - set(received)
    assert len(unreceived - set(held)) <= 3
    assert set(held) == {g for g, o in outcome.items() if o == "buffered"}
    counts = ray.get(again.counts.remote())
    assert counts.accepted_groups == len(per_group) and counts.held_groups == len(held)
    # the recovered buffer serves on
    table = ray.get(again.get_batch.remote(min(3, len(held)), trainer_version=0, timeout=10)) if held else None
    assert table is None or runs(table) == held[: min(3, len(held))]
    ray.get(again.close.remote())


@pytest.mark.timeout(90)
def test_a_restarted_actor_recovers_its_log_by_itself(ray_cluster, tmp_path: Path) -> None:
    cfg = BufferConfig(spill_dir=str(tmp_path / "spill"))
    buffer = create_buffer_actor(cfg, recover=True, max_restarts=1)
    first = ray.get(buffer.ready.remote())
    for i in range(3):
        ray.get(buffer.put.remote(group(f"g{i}")))
    ray.get(buffer.get_batch.remote(1, trainer_version=0, timeout=10))
    ray.kill(buffer, no_restart=False)
    deadline = time.monotonic() + 60
    pid = first
    while pid == first:  # the kill is asynchronous; calls fail until Ray has restarted the actor
        assert time.monotonic() < deadline, "the buffer actor was not restarted"
        try:
            pid = ray.get(buffer.ready.remote(), timeout=30)
        except RayActorError:
            time.sleep(0.2)
    assert ray.get(buffer.group_ids.remote()) == ["g1", "g2"]
    assert ray.get(buffer.counts.remote()).accepted_groups == 3
    ray.get(buffer.close.remote())


@pytest.mark.timeout(60)
def test_groups_outlive_the_writer_that_put_them(ray_cluster) -> None:
    """Puts over ~100 KiB reach the actor through the object store; a dead rollout manager
    (the owner of those objects) must not take its accepted groups with it."""
    buffer = create_buffer_actor(BufferConfig(capacity_groups=16))
    writer = Writer.remote(buffer, "dying")
    assert group("probe", tokens=8192).nbytes > 200_000
    ray.get(writer.run.remote(3, tokens=8192))
    ray.kill(writer)
    junk = [ray.put(b"x" * 30_000_000) for _ in range(3)]  # churn the object store
    table = ray.get(buffer.get_batch.remote(3, trainer_version=0, timeout=10))
    del junk
    assert runs(table) == ["dying-0", "dying-1", "dying-2"]
    assert table.column("response_ids").to_pylist() == [list(range(8192))] * (3 * GROUP)


@pytest.mark.timeout(90)
def test_more_blocked_writers_than_writer_threads_do_not_starve_the_reader(ray_cluster) -> None:
    buffer = create_buffer_actor(BufferConfig(capacity_groups=1), max_concurrency=2)  # 2 writer threads
    ray.get(buffer.put.remote(group("first")))
    blocked = [buffer.put.remote(group(f"w{i}"), timeout=60) for i in range(4)]  # 2 block, 2 queue
    ready, _ = ray.wait(blocked, timeout=0.5)
    assert ready == []
    assert ray.get(buffer.counts.remote(), timeout=10).held_groups == 1  # control calls still served
    served = [runs(ray.get(buffer.get_batch.remote(1, trainer_version=0, timeout=30), timeout=40)) for _ in range(5)]
    assert served[0] == ["first"]
    assert sorted(g for s in served[1:] for g in s) == ["w0", "w1", "w2", "w3"]  # each freed slot let a writer in
    assert ray.get(blocked, timeout=10) == [1, 1, 1, 1]
    ray.get(buffer.close.remote(), timeout=10)
