"""Duplicate protection across compaction/recovery/checkpoints, compaction faults, fsync.

A group id accepted once is never trained twice: a re-put (a writer retrying after a lost
reply) is skipped and counted, also after the log was compacted, the process restarted,
or a checkpoint was loaded. A compaction that fails at any step loses and repeats nothing.
"""

from __future__ import annotations

import collections
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from slime_rl.buffers import (
    BufferConfig,
    BufferFullError,
    ReplayBuffer,
    Sample,
    samples_to_batch,
    wal,
)


def group(gid: str, n: int = 2, version: int = 0) -> pa.RecordBatch:
    return samples_to_batch(
        [Sample(sample_id=f"{gid}-{i}", group_id=gid, prompt_ids=[1], response_ids=[1, 2, 3], policy_version=version) for i in range(n)]
    )


def spill(tmp_path: Path, **kw: object) -> BufferConfig:
    return BufferConfig(spill_dir=str(tmp_path / "spill"), compact_min_mb=0, **kw)


def test_a_consumed_group_is_not_accepted_again_after_compaction_and_recovery(tmp_path: Path) -> None:
    cfg = spill(tmp_path)
    buf = ReplayBuffer(cfg)
    buf.put(group("a"))
    buf.put(group("b"))
    buf.get_batch(1, 0, timeout=1)  # consumes a; half the log is gone: compacts (a not in the new log)
    assert buf.stats()["buffer/compactions"] == 1
    buf.close()
    again = ReplayBuffer.recover(tmp_path / "spill", cfg)
    assert again.put(group("a")) == 0  # would be trained twice otherwise
    assert again.put(pa.Table.from_batches([group("b"), group("c")])) == 1  # only c is new
    assert again.group_ids() == ["b", "c"]
    assert again.stats()["buffer/duplicate_groups"] == 2
    again.close()
    third = ReplayBuffer.recover(tmp_path / "spill", cfg)  # the ids survive a second restart too
    assert third.put(group("a")) == 0 and third.put(group("c")) == 0


def test_seen_ids_travel_with_state_dict_and_save_load(tmp_path: Path) -> None:
    buf = ReplayBuffer(BufferConfig())
    buf.put(group("a"))
    buf.put(group("b"))
    buf.get_batch(1, 0, timeout=1)
    other = ReplayBuffer(BufferConfig())
    other.load_state_dict(buf.state_dict())
    assert other.put(group("a")) == 0 and other.group_ids() == ["b"]
    buf.save(tmp_path / "ckpt")
    spilling = ReplayBuffer(spill(tmp_path))
    spilling.load(tmp_path / "ckpt")
    spilling.close()
    recovered = ReplayBuffer.recover(tmp_path / "spill", spill(tmp_path))
    assert recovered.put(group("a")) == 0 and recovered.put(group("b")) == 0
    assert recovered.group_ids() == ["b"]


@pytest.mark.timeout(20)
def test_a_retried_put_returns_at_once_even_when_the_buffer_is_full() -> None:
    buf = ReplayBuffer(BufferConfig(capacity_groups=2, put_timeout_s=600))
    buf.put(pa.Table.from_batches([group("a"), group("x")]))
    assert buf.put(group("a")) == 0  # checked before waiting for room: no 600 s block
    with pytest.raises(BufferFullError, match="2/2 groups held, put of 1 group"):
        buf.put(pa.Table.from_batches([group("a"), group("b")]), timeout=0.05)  # only b needs room


STEPS = ["consumed", "meta", "log-write", "log-commit", "fsync-dir", "retire"]


@pytest.mark.parametrize("step", STEPS)
def test_a_compaction_failing_at_any_step_loses_and_repeats_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str) -> None:
    cfg = spill(tmp_path)
    buf = ReplayBuffer(cfg)
    for gid in ("a", "b", "c"):
        buf.put(group(gid))
    failed = []

    def fail_once(what: str) -> None:
        if not failed:
            failed.append(what)
            raise OSError(f"injected failure at {what}")

    real_write, real_replace, real_fsync_dir, real_retire = wal._write_atomic, os.replace, wal._fsync_dir, wal.SpillLog._retire

    def write_atomic(path: Path, chunks: list) -> None:
        if path.name.startswith(step + "-"):
            fail_once(step)
        real_write(path, chunks)

    def replace(src: object, dst: object) -> None:
        if step == "log-commit" and Path(str(dst)).name.startswith("log-"):
            fail_once(step)
        real_replace(src, dst)

    def write_all(fd: int, chunks: list) -> None:
        if step == "log-write" and len(chunks) > 1:  # the new generation's log (header + groups)
            fail_once(step)
        wal_write_all(fd, chunks)

    wal_write_all = wal._write_all
    monkeypatch.setattr(wal, "_write_atomic", write_atomic)
    monkeypatch.setattr(wal.os, "replace", replace)
    monkeypatch.setattr(wal, "_write_all", write_all)
    monkeypatch.setattr(wal, "_fsync_dir", lambda p: (fail_once("fsync-dir") if step == "fsync-dir" else None, real_fsync_dir(p)))
    monkeypatch.setattr(wal.SpillLog, "_retire", lambda self, g: (fail_once("retire") if step == "retire" else None, real_retire(self, g)))
    served = buf.get_batch(2, 0, timeout=1)  # compacts (2 of 3 gone) and hits the failure
    assert failed == [step]
    assert served.column("group_id").to_pylist() == ["a", "a", "b", "b"]  # the recorded batch is delivered
    buf.put(group("d"))  # later puts must land in the generation recovery will read
    buf.get_batch(1, 0, timeout=1)  # c; compacts again, now without failures
    buf.put(group("e"))
    buf.close()
    again = ReplayBuffer.recover(tmp_path / "spill", cfg)
    assert again.group_ids() == ["d", "e"]
    assert [again.put(group(g)) for g in "abcde"] == [0] * 5
    c = again.counts()
    assert (c.accepted_groups, c.consumed_groups) == (5, 3)
    out = tmp_path / "all.parquet"
    again.export(out)
    per_group = collections.Counter(pq.read_table(out).column("group_id").to_pylist())
    assert per_group == {g: 2 for g in "abcde"}  # every sample once in the history


def test_fsync_true_syncs_every_put_and_get_and_recovers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real = os.fsync
    monkeypatch.setattr(wal.os, "fsync", lambda fd: (synced.append(fd), real(fd)))
    cfg = BufferConfig(spill_dir=str(tmp_path / "spill"), fsync=True)
    buf = ReplayBuffer(cfg)
    start = len(synced)
    buf.put(group("a"))
    buf.put(group("b"))
    assert len(synced) == start + 2  # one fsync per put, before it returns
    buf.get_batch(1, 0, timeout=1)
    assert len(synced) == start + 3  # and per consumption record
    buf.close()
    assert ReplayBuffer.recover(tmp_path / "spill", cfg).group_ids() == ["b"]


def test_without_fsync_puts_do_not_sync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    buf = ReplayBuffer(BufferConfig(spill_dir=str(tmp_path / "spill"), compact_min_mb=64))
    monkeypatch.setattr(wal.os, "fsync", lambda fd: synced.append(fd))
    buf.put(group("a"))
    buf.get_batch(1, 0, timeout=1)
    assert synced == []
