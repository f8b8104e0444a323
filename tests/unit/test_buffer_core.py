"""ReplayBuffer in-process: groups, staleness, ordering, backpressure, shutdown, metrics."""

from __future__ import annotations

import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from slime_rl.buffers import (
    BufferClosedError,
    BufferConfig,
    BufferFullError,
    BufferTimeoutError,
    ReplayBuffer,
    Sample,
    replay_buffer,
    samples_to_batch,
    token_staleness,
)


def group(gid: str, n: int = 2, version: int = 0, tokens: int = 3, versions: list[int] | None = None) -> pa.RecordBatch:
    """One group of ``n`` samples; ``versions`` sets each sample's policy_version."""
    versions = versions or [version] * n
    return samples_to_batch(
        [
            Sample(sample_id=f"{gid}-{i}", group_id=gid, prompt_ids=[1, 2], response_ids=list(range(tokens)), reward=float(i), policy_version=v)
            for i, v in enumerate(versions)
        ]
    )


def groups_of(table: pa.Table) -> list[str]:
    """Group ids in row order, collapsing each run of rows (a split group would show twice)."""
    out: list[str] = []
    for gid in table.column("group_id").to_pylist():
        if not out or out[-1] != gid:
            out.append(gid)
    return out


def test_groups_come_out_whole_in_fifo_order() -> None:
    buf = ReplayBuffer(BufferConfig(capacity_groups=8))
    both = pa.Table.from_batches([group("a", n=3), group("b", n=3)])
    assert buf.put(both) == 2
    assert buf.put(group("c", n=3)) == 1
    table = buf.get_batch(2, trainer_version=0, timeout=1)
    assert groups_of(table) == ["a", "b"]
    assert table.num_rows == 6
    assert table.column("sample_id").to_pylist() == ["a-0", "a-1", "a-2", "b-0", "b-1", "b-2"]
    assert buf.group_ids() == ["c"]


def test_a_batch_of_several_groups_is_stored_compactly() -> None:
    """A group from a multi-group put must not drag its put-mates' bytes along (through Ray)."""
    import pickle

    buf = ReplayBuffer(BufferConfig())
    big = pa.Table.from_batches([group(f"g{i}", tokens=2000) for i in range(4)])
    buf.put(big)
    one = buf.get_batch(1, 0, timeout=1)
    assert len(pickle.dumps(one)) < big.nbytes / 2


def test_freshest_order_serves_newest_policy_version_first() -> None:
    buf = ReplayBuffer(BufferConfig(order="freshest", max_staleness=5))
    for gid, v in [("old", 1), ("new", 3), ("mid", 2), ("new2", 3)]:
        buf.put(group(gid, version=v))
    assert groups_of(buf.get_batch(3, trainer_version=3, timeout=1)) == ["new", "new2", "mid"]


def test_stale_groups_are_dropped_and_counted() -> None:
    buf = ReplayBuffer(BufferConfig(max_staleness=1, stale_policy="drop"))
    for v in range(4):
        buf.put(group(f"v{v}", version=v))
    table = buf.get_batch(2, trainer_version=3, timeout=1)
    assert groups_of(table) == ["v2", "v3"]
    stats = buf.stats()
    assert stats["buffer/dropped_stale"] == 2
    assert stats["buffer/dropped_stale_samples"] == 4
    assert stats["buffer/groups_out"] == 2
    assert stats["buffer/staleness_hist/0"] == 1 and stats["buffer/staleness_hist/1"] == 1
    assert len(buf) == 0


def test_staleness_of_a_group_is_its_oldest_sample() -> None:
    buf = ReplayBuffer(BufferConfig(max_staleness=1))
    buf.put(group("mixed", versions=[3, 1]))  # one sample started at version 1: staleness 2 at v3
    buf.put(group("fresh", versions=[3, 3]))
    assert groups_of(buf.get_batch(1, trainer_version=3, timeout=1)) == ["fresh"]
    assert buf.stats()["buffer/dropped_stale"] == 1


def test_per_call_max_staleness_overrides_config() -> None:
    buf = ReplayBuffer(BufferConfig(max_staleness=0))
    buf.put(group("a", version=0))
    assert groups_of(buf.get_batch(1, trainer_version=2, max_staleness=2, timeout=1)) == ["a"]


def test_keep_policy_serves_stale_groups_and_counts_them() -> None:
    buf = ReplayBuffer(BufferConfig(max_staleness=0, stale_policy="keep"))
    buf.put(group("old", version=0))
    buf.put(group("new", version=4))
    table = buf.get_batch(2, trainer_version=4, timeout=1)
    assert groups_of(table) == ["old", "new"]
    stats = buf.stats()
    assert stats["buffer/served_stale"] == 1
    assert stats["buffer/dropped_stale"] == 0
    assert stats["buffer/staleness_hist/4"] == 1
    assert stats["buffer/batch_staleness_max"] == 4


def test_token_versions_give_per_token_staleness() -> None:
    s = Sample(sample_id="p-0", group_id="p", prompt_ids=[1], response_ids=[5, 6, 7], policy_version=1, policy_version_end=2, token_versions=[1, 1, 2])
    buf = ReplayBuffer(BufferConfig(max_staleness=2))
    buf.put(samples_to_batch([s]))
    table = buf.get_batch(1, trainer_version=3, timeout=1)
    assert token_staleness(table, 3).to_pylist() == [[2, 2, 1]]
    stats = buf.stats()
    assert stats["buffer/batch_token_staleness_max"] == 2
    assert stats["buffer/batch_token_staleness_mean"] == pytest.approx(5 / 3)


def test_set_version_frees_room_held_by_stale_groups() -> None:
    buf = ReplayBuffer(BufferConfig(capacity_groups=2, max_staleness=1, put_policy="reject"))
    buf.put(group("a", version=0))
    buf.put(group("b", version=0))
    with pytest.raises(BufferFullError):
        buf.put(group("c", version=2))
    buf.set_version(2)
    assert buf.put(group("c", version=2)) == 1
    assert buf.counts().dropped_groups == 2


def test_get_batch_times_out_with_a_named_error_and_takes_nothing() -> None:
    buf = ReplayBuffer(BufferConfig(max_staleness=1))
    buf.put(group("a"))
    with pytest.raises(BufferTimeoutError, match=r"2 groups .* 1 eligible.*rollout manager") as err:
        buf.get_batch(2, trainer_version=0, timeout=0.05)
    assert isinstance(err.value, TimeoutError)
    assert buf.group_ids() == ["a"]
    assert buf.stats()["buffer/get_timeouts"] == 1


def test_get_batch_refuses_impossible_sizes() -> None:
    buf = ReplayBuffer(BufferConfig(capacity_groups=4))
    with pytest.raises(ValueError, match="global_batch_groups=5 .*capacity_groups"):
        buf.get_batch(5, trainer_version=0, timeout=0.01)
    with pytest.raises(ValueError, match="global_batch_groups=0"):
        buf.get_batch(0, trainer_version=0, timeout=0.01)
    with pytest.raises(ValueError, match="max_staleness=-1 must be >= 0"):
        buf.get_batch(1, trainer_version=0, max_staleness=-1, timeout=0.01)


def test_blocked_reader_wakes_when_groups_arrive() -> None:
    buf = ReplayBuffer(BufferConfig())
    got: list[pa.Table] = []
    reader = threading.Thread(target=lambda: got.append(buf.get_batch(2, trainer_version=0, timeout=30)))
    reader.start()
    buf.put(group("a"))
    reader.join(0.2)
    assert reader.is_alive()  # one group is not enough
    buf.put(group("b"))
    reader.join(30)
    assert groups_of(got[0]) == ["a", "b"]


def test_full_buffer_blocks_put_until_a_reader_makes_room() -> None:
    buf = ReplayBuffer(BufferConfig(capacity_groups=2, put_policy="block"))
    buf.put(group("a"))
    buf.put(group("b"))
    done: list[int] = []
    writer = threading.Thread(target=lambda: done.append(buf.put(group("c"), timeout=30)))
    writer.start()
    writer.join(0.2)
    assert writer.is_alive() and buf.group_ids() == ["a", "b"]
    buf.get_batch(1, trainer_version=0, timeout=1)
    writer.join(30)
    assert done == [1] and buf.group_ids() == ["b", "c"]


def test_full_buffer_put_times_out() -> None:
    buf = ReplayBuffer(BufferConfig(capacity_groups=1, put_policy="block"))
    buf.put(group("a"))
    with pytest.raises(BufferFullError, match=r"1/1 groups held.*still full after 0.1s"):
        buf.put(group("b"), timeout=0.1)
    assert buf.group_ids() == ["a"]
    assert buf.stats()["buffer/rejected_full"] == 1


def test_reject_policy_refuses_at_once() -> None:
    buf = ReplayBuffer(BufferConfig(capacity_groups=1, put_policy="reject", put_timeout_s=600))
    buf.put(group("a"))
    with pytest.raises(BufferFullError, match="put_policy=reject"):
        buf.put(group("b"))
    assert buf.group_ids() == ["a"]


def test_close_wakes_blocked_writer_and_reader() -> None:
    buf = ReplayBuffer(BufferConfig(capacity_groups=2))
    buf.put(group("a"))  # a 2-group put cannot fit, a 2-group get cannot be served: both block
    errors: list[BaseException] = []

    def call(fn) -> None:
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            errors.append(e)

    threads = [
        threading.Thread(target=call, args=(lambda: buf.put(pa.Table.from_batches([group("b"), group("c")]), timeout=60),)),
        threading.Thread(target=call, args=(lambda: buf.get_batch(2, trainer_version=0, timeout=60),)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(0.2)
    assert all(t.is_alive() for t in threads)
    buf.close()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    assert len(errors) == 2 and all(isinstance(e, BufferClosedError) for e in errors)
    with pytest.raises(BufferClosedError):
        buf.put(group("c"))


def test_counts_and_metrics_for_admission_control() -> None:
    buf = ReplayBuffer(BufferConfig(capacity_groups=10, max_staleness=0))
    for i in range(4):
        buf.put(group(f"g{i}", n=3, version=i // 2))
    buf.get_batch(1, trainer_version=1, timeout=1)  # drops g0, g1 (version 0), serves g2
    c = buf.counts()
    assert (c.accepted_groups, c.consumed_groups, c.dropped_groups, c.held_groups, c.capacity_groups, c.version) == (4, 1, 2, 1, 10, 1)
    s = buf.stats()
    assert s["buffer/groups_in"] == 4 and s["buffer/samples_in"] == 12
    assert s["buffer/groups_out"] == 1 and s["buffer/samples_out"] == 3
    assert s["buffer/size_groups"] == 1 and s["buffer/size_samples"] == 3
    assert s["buffer/bytes"] > 0
    assert all(k.startswith("buffer/") for k in s)


def test_memory_history_is_capped_by_history_max_mb(tmp_path: Path) -> None:
    buf = ReplayBuffer(BufferConfig(history_max_mb=0.005))  # ~5 KiB
    for i in range(200):
        buf.put(group(f"g{i}"))
        buf.get_batch(1, trainer_version=0, timeout=1)
    rows = buf.export(tmp_path / "x.parquet")
    assert 0 < rows < 200 * 2
    assert "g199" in pq.read_table(tmp_path / "x.parquet").column("group_id").to_pylist()


def test_a_group_newer_than_the_trainer_counts_as_future_not_negative_staleness() -> None:
    buf = ReplayBuffer(BufferConfig(max_staleness=1))
    buf.put(group("ahead", version=3))
    buf.get_batch(1, trainer_version=1, timeout=1)
    stats = buf.stats()
    assert "buffer/staleness_hist/-2" not in stats
    assert stats["buffer/staleness_hist/0"] == 1 and stats["buffer/future_version"] == 1


@pytest.mark.timeout(30)
def test_export_writes_parquet_without_holding_the_buffer_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    buf = ReplayBuffer(BufferConfig())
    buf.put(group("a"))
    put_done = threading.Event()

    def slow_write(path: object, batches: object) -> int:
        rows = sum(b.num_rows for b in batches)
        writer = threading.Thread(target=lambda: (buf.put(group("b")), put_done.set()), daemon=True)
        writer.start()
        assert put_done.wait(10), "put blocked while export was writing"
        return rows

    monkeypatch.setattr(replay_buffer, "write_parquet", slow_write)
    assert buf.export(tmp_path / "x.parquet") == 2  # the snapshot: b came after it
    assert buf.group_ids() == ["a", "b"]
