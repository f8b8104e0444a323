"""Every kind of bad input is refused with a ValueError naming column and row; nothing changes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pytest
from slime_rl.buffers import (
    SAMPLE_SCHEMA,
    BufferConfig,
    ReplayBuffer,
    Sample,
    batch_to_samples,
    samples_to_batch,
)


def group(gid: str, n: int = 2, tokens: int = 3) -> pa.RecordBatch:
    return samples_to_batch(
        [Sample(sample_id=f"{gid}-{i}", group_id=gid, prompt_ids=[1], response_ids=list(range(tokens))) for i in range(n)]
    )


def replace(batch: pa.RecordBatch, name: str, values: list, type_: pa.DataType | None = None) -> pa.RecordBatch:
    """``batch`` with column ``name`` swapped for ``values`` (keeping the column's type unless given)."""
    type_ = type_ or SAMPLE_SCHEMA.field(name).type
    cols = {n: batch.column(n) for n in batch.schema.names}
    cols[name] = pa.array(values, type_)
    return pa.RecordBatch.from_arrays(list(cols.values()), names=list(cols))


def versions(batch: pa.RecordBatch, start: list[int], end: list[int], tokens: list[list[int]]) -> pa.RecordBatch:
    """``batch`` with its three version columns replaced."""
    batch = replace(batch, "policy_version", start)
    return replace(replace(batch, "policy_version_end", end), "token_versions", tokens)


def two_groups() -> pa.RecordBatch:
    return pa.Table.from_batches([group("x"), group("y")]).combine_chunks().to_batches()[0]


BAD: dict[str, tuple[Callable[[], object], str]] = {
    "missing column": (lambda: two_groups().drop_columns(["reward"]), r"missing column\(s\) \['reward'\]"),
    "unknown column": (lambda: two_groups().append_column("extra", pa.array([1, 2, 3, 4])), r"unknown column\(s\) \['extra'\]"),
    "wrong type": (lambda: replace(two_groups(), "reward", [1.0] * 4, pa.float64()), "column 'reward' has type double"),
    "wrong token type": (lambda: replace(two_groups(), "response_ids", [[1, 2, 3]] * 4, pa.list_(pa.int64())), "column 'response_ids' has type list<item: int64>"),
    "logprobs too short": (lambda: replace(two_groups(), "response_logprobs", [[0.0] * 3] * 3 + [[0.0] * 2]), "column 'response_logprobs' row 3 has 2 entries but response_ids has 3"),
    "loss_mask too long": (lambda: replace(two_groups(), "loss_mask", [[1] * 3, [1] * 4, [1] * 3, [1] * 3]), "column 'loss_mask' row 1 has 4 entries"),
    "token_versions short": (lambda: replace(two_groups(), "token_versions", [[0] * 3, [0] * 3, [], [0] * 3]), "column 'token_versions' row 2 has 0 entries"),
    "null token": (lambda: replace(two_groups(), "response_ids", [[1, 2, 3], [1, None, 3], [1, 2, 3], [1, 2, 3]]), "column 'response_ids' row 1 holds a null entry"),
    "nan reward": (lambda: replace(two_groups(), "reward", [0.0, 1.0, float("nan"), 0.0]), "column 'reward' row 2 is nan"),
    "inf reward": (lambda: replace(two_groups(), "reward", [float("-inf"), 1.0, 0.0, 0.0]), "column 'reward' row 0 is -inf"),
    "null required": (lambda: replace(two_groups(), "metadata", ["{}", None, "{}", "{}"]), "column 'metadata' row 1 is null"),
    "bad status": (lambda: replace(two_groups(), "status", ["completed", "completed", "done", "completed"]), "column 'status' row 2 is 'done'"),
    "bad mode": (lambda: replace(two_groups(), "mode", ["think", "thinking", "think", "think"]), "column 'mode' row 1 is 'thinking'"),
    "split group": (lambda: replace(two_groups(), "group_id", ["x", "y", "x", "y"], pa.string()), "column 'group_id' row 2: group 'x' already appeared at row 0"),
    "empty group id": (lambda: replace(two_groups(), "group_id", ["x", "x", "", ""], pa.string()), "column 'group_id' row 2 is empty"),
    "repeated sample id": (lambda: replace(two_groups(), "sample_id", ["a", "b", "c", "a"], pa.string()), "column 'sample_id' row 3 repeats 'a' of row 0"),
    "metadata not json": (lambda: replace(two_groups(), "metadata", ["{}", '{"turns": 2', "{}", "{}"]), r"column 'metadata' row 1 is not valid JSON"),
    "metadata not an object": (lambda: replace(two_groups(), "metadata", ["{}", "{}", "[1, 2]", "{}"]), r"column 'metadata' row 2 is a JSON list, not an object"),
    "metadata two objects": (lambda: replace(two_groups(), "metadata", ['{"a": 1}{"b": 2}', "{}", "{}", "{}"]), r"column 'metadata' row 0 is not valid JSON"),
    "loss_mask 2": (lambda: replace(two_groups(), "loss_mask", [[1] * 3, [1, 2, 1], [1] * 3, [1] * 3]), r"column 'loss_mask' row 1 holds 2 at response token 1; entries must be 1 .* or 0"),
    "loss_mask negative": (lambda: replace(two_groups(), "loss_mask", [[1] * 3, [1] * 3, [1] * 3, [0, 0, -1]]), r"column 'loss_mask' row 3 holds -1 at response token 2"),
    "version end before start": (lambda: versions(two_groups(), [0, 0, 2, 0], [0, 0, 1, 0], [[0] * 3, [0] * 3, [2] * 3, [0] * 3]), r"column 'policy_version_end' row 2 is 1, older than its policy_version 2"),
    "token version above end": (lambda: versions(two_groups(), [0] * 4, [0] * 4, [[0] * 3, [0, 1, 0], [0] * 3, [0] * 3]), r"column 'token_versions' row 1 holds version 1, outside the row's \[policy_version, policy_version_end\] = \[0, 0\]"),
    "token version below start": (lambda: versions(two_groups(), [1] * 4, [2] * 4, [[1, 2, 2], [1] * 3, [2, 0, 2], [2] * 3]), r"column 'token_versions' row 2 holds version 0, outside .* = \[1, 2\]"),
    "bad row in a later chunk": (lambda: pa.Table.from_batches([group("x"), replace(group("y"), "loss_mask", [[1] * 3, [1, 1, 3]]).cast(SAMPLE_SCHEMA)]), r"column 'loss_mask' row 3 holds 3"),
    "not arrow": (lambda: {"group_id": ["x"]}, "pyarrow.RecordBatch or Table"),
    "too many groups": (lambda: pa.Table.from_batches([group(f"m{i}") for i in range(5)]), "put holds 5 groups but buffer.capacity_groups is 4"),
}


@pytest.mark.parametrize("case", list(BAD))
@pytest.mark.parametrize("spill", [False, True], ids=["memory", "spill"])
def test_bad_input_is_refused_and_buffer_unchanged(case: str, spill: bool, tmp_path: Path) -> None:
    make, message = BAD[case]
    cfg = BufferConfig(capacity_groups=4, spill_dir=str(tmp_path / "spill") if spill else None)
    buf = ReplayBuffer(cfg)
    buf.put(group("held"))
    before = (buf.group_ids(), buf.counts(), buf.stats()["buffer/bytes"])
    with pytest.raises(ValueError, match=message):
        buf.put(make())
    assert (buf.group_ids(), buf.counts(), buf.stats()["buffer/bytes"]) == before
    assert buf.stats()["buffer/rejected_invalid"] == 1
    if spill:  # the log did not take the bad batch either
        buf.close()
        again = ReplayBuffer.recover(tmp_path / "spill", cfg)
        assert again.group_ids() == ["held"]
        assert again.counts().accepted_groups == 1


def test_wrong_group_size_is_refused() -> None:
    buf = ReplayBuffer(BufferConfig(), group_size=4)
    with pytest.raises(ValueError, match="column 'group_id' row 0: group 'g' has 2 samples but this buffer expects whole groups of 4"):
        buf.put(group("g", n=2))
    assert len(buf) == 0
    assert buf.put(group("h", n=4)) == 1


def test_column_order_does_not_matter_and_empty_put_is_a_no_op() -> None:
    batch = group("g")
    shuffled = batch.select(list(reversed(batch.schema.names)))
    buf = ReplayBuffer(BufferConfig())
    assert buf.put(shuffled) == 1
    assert buf.get_batch(1, 0, timeout=1).schema.names == SAMPLE_SCHEMA.names
    assert buf.put(SAMPLE_SCHEMA.empty_table()) == 0
    assert buf.counts().accepted_groups == 1


def test_bad_config_values_are_refused() -> None:
    with pytest.raises(ValueError, match="group_size must be >= 1"):
        ReplayBuffer(BufferConfig(), group_size=0)


def test_valid_edge_cases_are_accepted_and_read_back() -> None:
    """Mixed version ranges, 0/1 masks, metadata that is empty, pretty-printed (newlines), has
    NaN (json.loads reads it) or differs in shape between rows: all accepted, all readable."""
    import json

    batch = versions(two_groups(), [0, 1, 3, 3], [2, 1, 5, 3], [[0, 1, 2], [1, 1, 1], [3, 5, 4], [3, 3, 3]])
    batch = replace(batch, "loss_mask", [[1, 0, 1], [0, 0, 0], [1, 1, 1], [0, 1, 0]])
    meta = ["", json.dumps({"a": [1, {"b": None}]}, indent=2), '{"x": NaN}', '{"turns": 3, "tools": []}']
    batch = replace(batch, "metadata", meta)
    buf = ReplayBuffer(BufferConfig())
    assert buf.put(batch) == 2
    samples = batch_to_samples(buf.get_batch(2, 3, max_staleness=10, timeout=1))
    assert [s.metadata for s in samples][::3] == [{}, {"turns": 3, "tools": []}]
    assert samples[1].metadata == {"a": [1, {"b": None}]}
    assert [s.token_versions for s in samples][2] == [3, 5, 4]
