"""Write-ahead log, crash recovery (torn records too), compaction, checkpoints and export.

``close()`` writes nothing, so a closed spill_dir looks exactly like the one a killed
process leaves behind; the Ray test (tests/integration/test_buffer_actor.py) kills for real.
"""

from __future__ import annotations

import collections
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from slime_rl.buffers import SAMPLE_SCHEMA, BufferConfig, ReplayBuffer, Sample, samples_to_batch


def group(gid: str, n: int = 2, version: int = 0, tokens: int = 4) -> pa.RecordBatch:
    return samples_to_batch(
        [Sample(sample_id=f"{gid}-{i}", group_id=gid, prompt_ids=[1], response_ids=list(range(tokens)), policy_version=version) for i in range(n)]
    )


def spill_config(tmp_path: Path, **kw: object) -> BufferConfig:
    return BufferConfig(spill_dir=str(tmp_path / "spill"), **kw)


def the_file(tmp_path: Path, pattern: str) -> Path:
    (path,) = (tmp_path / "spill").glob(pattern)
    return path


def test_recover_restores_exactly_the_unconsumed_groups_and_counters(tmp_path: Path) -> None:
    cfg = spill_config(tmp_path, max_staleness=1)
    buf = ReplayBuffer(cfg)
    for i in range(6):
        buf.put(group(f"g{i}", version=i // 2))
    buf.get_batch(2, trainer_version=2, timeout=1)  # drops g0, g1 (version 0); serves g2, g3
    buf.close()
    again = ReplayBuffer.recover(tmp_path / "spill", cfg)
    assert again.group_ids() == ["g4", "g5"]
    c = again.counts()
    assert (c.accepted_groups, c.consumed_groups, c.dropped_groups, c.version) == (6, 2, 2, 2)
    assert again.stats()["buffer/staleness_hist/1"] == 2
    # the recovered buffer keeps logging: a second crash loses nothing either
    again.put(group("g6", version=2))
    again.get_batch(1, trainer_version=2, timeout=1)
    again.close()
    third = ReplayBuffer.recover(tmp_path / "spill", cfg)
    assert third.group_ids() == ["g5", "g6"]
    assert third.counts().accepted_groups == 7


def test_torn_last_group_record_is_ignored(tmp_path: Path) -> None:
    cfg = spill_config(tmp_path)
    buf = ReplayBuffer(cfg)
    for i in range(3):
        buf.put(group(f"g{i}"))
    buf.close()
    log = the_file(tmp_path, "log-*.arrow")
    log.write_bytes(log.read_bytes()[:-10])  # a crash in the middle of writing g2
    again = ReplayBuffer.recover(tmp_path / "spill", cfg)
    assert again.group_ids() == ["g0", "g1"]
    again.put(group("g3"))  # appends never follow the torn bytes
    again.close()
    assert ReplayBuffer.recover(tmp_path / "spill", cfg).group_ids() == ["g0", "g1", "g3"]


def test_torn_consumption_record_leaves_the_group_live(tmp_path: Path) -> None:
    cfg = spill_config(tmp_path)
    buf = ReplayBuffer(cfg)
    for i in range(3):
        buf.put(group(f"g{i}"))
    buf.get_batch(1, 0, timeout=1)
    buf.get_batch(1, 0, timeout=1)
    buf.close()
    consumed = the_file(tmp_path, "consumed-*.arrow")
    consumed.write_bytes(consumed.read_bytes()[:-7])  # that get_batch never returned
    assert ReplayBuffer.recover(tmp_path / "spill", cfg).group_ids() == ["g1", "g2"]


def test_a_log_in_spill_dir_is_only_continued_on_request(tmp_path: Path) -> None:
    cfg = spill_config(tmp_path)
    buf = ReplayBuffer(cfg)
    buf.put(group("g0"))
    buf.close()
    with pytest.raises(ValueError, match="already holds a buffer log; pass recover=True"):
        ReplayBuffer(cfg)
    assert ReplayBuffer(cfg, recover=True).group_ids() == ["g0"]


def test_recover_on_an_empty_folder_starts_fresh(tmp_path: Path) -> None:
    buf = ReplayBuffer.recover(tmp_path / "new", BufferConfig())
    assert len(buf) == 0
    buf.put(group("a"))
    assert buf.group_ids() == ["a"]


def test_a_live_owner_keeps_others_out_of_its_spill_dir(tmp_path: Path) -> None:
    cfg = spill_config(tmp_path)
    owner = ReplayBuffer(cfg)
    with pytest.raises(RuntimeError, match="is in use by another buffer"):
        ReplayBuffer(cfg, recover=True, lock_timeout_s=0.1)
    owner.close()
    assert len(ReplayBuffer(cfg, recover=True)) == 0


def test_compaction_bounds_the_log_and_keeps_history(tmp_path: Path) -> None:
    cfg = spill_config(tmp_path, compact_min_mb=0.002, max_staleness=0)  # ~2 KiB
    buf = ReplayBuffer(cfg)
    sizes = []
    for i in range(60):
        buf.put(group(f"g{i}", version=i // 10, tokens=16))
        buf.set_version(i // 10)  # drops the previous version's groups
        if i % 3 == 2 and len(buf) >= 2:
            buf.get_batch(2, trainer_version=i // 10, timeout=1)
            sizes.append(buf.stats()["buffer/log_bytes"])
    stats = buf.stats()
    assert stats["buffer/compactions"] >= 5
    assert max(sizes[len(sizes) // 2 :]) < 3 * max(sizes[:3]) + 4096  # does not grow with the run
    assert len(list((tmp_path / "spill").glob("log-*.arrow"))) == 1
    held = buf.group_ids()
    buf.close()
    again = ReplayBuffer.recover(tmp_path / "spill", cfg)
    assert again.group_ids() == held
    out = tmp_path / "all.parquet"
    rows = again.export(out)
    table = pq.read_table(out)
    assert rows == table.num_rows == 120
    per_group = collections.Counter(table.column("group_id").to_pylist())
    assert sorted(per_group) == sorted(f"g{i}" for i in range(60)) and set(per_group.values()) == {2}
    outcome = dict(zip(table.column("group_id").to_pylist(), table.column("buffer_outcome").to_pylist()))
    assert {g for g, o in outcome.items() if o == "buffered"} == set(held)
    assert sum(o == "consumed" for o in outcome.values()) == stats["buffer/groups_out"]
    assert sum(o == "dropped_stale" for o in outcome.values()) == stats["buffer/dropped_stale"]


def test_export_in_memory_writes_every_sample_seen(tmp_path: Path) -> None:
    buf = ReplayBuffer(BufferConfig(max_staleness=0))
    buf.put(group("old", version=0))
    buf.put(group("a", version=1))
    buf.put(group("b", version=1))
    buf.get_batch(1, trainer_version=1, timeout=1)
    assert buf.export(tmp_path / "x.parquet") == 6
    table = pq.read_table(tmp_path / "x.parquet")
    rows = {(g, o, v) for g, o, v in zip(table["group_id"].to_pylist(), table["buffer_outcome"].to_pylist(), table["buffer_version"].to_pylist())}
    assert rows == {("old", "dropped_stale", 1), ("a", "consumed", 1), ("b", "buffered", None)}
    assert table.schema.names[: len(SAMPLE_SCHEMA)] == SAMPLE_SCHEMA.names
    assert table["response_ids"].to_pylist()[0] == [0, 1, 2, 3]


def test_export_without_history_writes_held_groups_only(tmp_path: Path) -> None:
    buf = ReplayBuffer(BufferConfig(keep_history=False))
    buf.put(group("a"))
    buf.put(group("b"))
    buf.get_batch(1, 0, timeout=1)
    assert buf.export(tmp_path / "x.parquet") == 2


def test_state_dict_round_trip(tmp_path: Path) -> None:
    buf = ReplayBuffer(BufferConfig(max_staleness=1))
    for i in range(4):
        buf.put(group(f"g{i}", version=i))
    buf.get_batch(1, trainer_version=3, timeout=1)  # drops g0, g1; serves g2
    state = buf.state_dict()
    other = ReplayBuffer(BufferConfig(max_staleness=1))
    other.load_state_dict(state)
    assert other.group_ids() == ["g3"] and other.counts() == buf.counts()
    assert other.get_batch(1, trainer_version=3, timeout=1).equals(buf.get_batch(1, trainer_version=3, timeout=1))


def test_save_load_folder_and_into_a_spilling_buffer(tmp_path: Path) -> None:
    buf = ReplayBuffer(BufferConfig())
    for i in range(3):
        buf.put(group(f"g{i}"))
    buf.get_batch(1, 0, timeout=1)
    buf.save(tmp_path / "ckpt")
    cfg = spill_config(tmp_path)
    spilling = ReplayBuffer(cfg)
    spilling.put(group("replaced"))
    spilling.load(tmp_path / "ckpt")
    assert spilling.group_ids() == ["g1", "g2"]
    assert spilling.counts().accepted_groups == 3
    spilling.close()
    assert ReplayBuffer.recover(tmp_path / "spill", cfg).group_ids() == ["g1", "g2"]


def test_state_of_another_schema_version_is_refused() -> None:
    buf = ReplayBuffer(BufferConfig())
    state = buf.state_dict()
    state["schema_version"] = 0
    with pytest.raises(ValueError, match="schema_version 0"):
        buf.load_state_dict(state)


def test_served_stale_and_histogram_survive_recovery(tmp_path: Path) -> None:
    cfg = spill_config(tmp_path, max_staleness=0, stale_policy="keep")
    buf = ReplayBuffer(cfg)
    buf.put(group("old", version=0))
    buf.put(group("new", version=2))
    buf.get_batch(2, trainer_version=2, timeout=1)  # old served with staleness 2 > 0
    before = {k: v for k, v in buf.stats().items() if "stale" in k and "batch_" not in k}
    assert before["buffer/served_stale"] == 1
    buf.close()
    after = ReplayBuffer.recover(tmp_path / "spill", cfg).stats()
    assert {k: v for k, v in after.items() if "stale" in k and "batch_" not in k} == before


def test_history_on_disk_is_capped_by_history_max_mb(tmp_path: Path) -> None:
    cfg = spill_config(tmp_path, compact_min_mb=0.001, history_max_mb=0.01)  # ~10 KiB of history
    buf = ReplayBuffer(cfg)
    for i in range(120):
        buf.put(group(f"g{i}", tokens=16))
        buf.get_batch(1, 0, timeout=1)
    history = tmp_path / "spill" / "history"
    size = sum(p.stat().st_size for p in history.iterdir())
    assert 0 < size <= 0.01 * 2**20
    rows = buf.export(tmp_path / "x.parquet")
    assert 0 < rows < 240  # the newest part of the run only
    newest = pq.read_table(tmp_path / "x.parquet").column("group_id").to_pylist()
    assert "g119" in newest and "g0" not in newest
