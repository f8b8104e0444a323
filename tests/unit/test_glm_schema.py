"""Sample schema v2: the optional `routed_experts` column (MoE routing for rollout routing
replay), v1 data without it, and how routing travels from engine results into samples."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from slime_rl.buffers import ReplayBuffer
from slime_rl.buffers.schema import (
    SAMPLE_SCHEMA,
    SCHEMA_VERSION,
    Sample,
    batch_to_samples,
    conform_batch,
    samples_to_batch,
)
from slime_rl.buffers.validation import validate_batch
from slime_rl.rollout.engines.base import FinishReason, GenerateResult
from slime_rl.rollout.engines.core import _Live
from slime_rl.rollout.samples import merge_results, routing_column

L, K = 2, 2  # MoE layers x experts per token of the rows below


def _routing(n: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 8, size=(n, L * K)).tolist()


def _samples(with_routing: bool = True) -> list[Sample]:
    out = []
    for g in range(2):
        for k in range(2):
            prompt, resp = [5, 6, 7 + g], [8, 9, 10 + k][: 2 + k]
            out.append(
                Sample(
                    sample_id=f"g{g}/{k}", group_id=f"g{g}", prompt_ids=prompt, response_ids=resp,
                    response_logprobs=[-0.5] * len(resp),
                    routed_experts=_routing(len(prompt) + len(resp) - 1, 10 * g + k) if with_routing else None,
                )
            )
    return out


def _v1(batch: pa.RecordBatch) -> pa.RecordBatch:
    """The same rows as schema v1 wrote them: no routed_experts column."""
    return batch.drop_columns(["routed_experts"])


def test_schema_v2_has_the_column_and_round_trips() -> None:
    assert SCHEMA_VERSION >= 2 and SAMPLE_SCHEMA.field("routed_experts").type == pa.list_(pa.list_(pa.int16()))
    batch = samples_to_batch(_samples())
    validate_batch(batch)
    back = batch_to_samples(batch)
    assert back[0].routed_experts == _samples()[0].routed_experts
    # dense models / engines that do not record: empty lists
    plain = samples_to_batch(_samples(with_routing=False))
    validate_batch(plain)
    assert batch_to_samples(plain)[0].routed_experts == []


def test_v1_data_without_the_column_validates_and_gets_it_empty() -> None:
    v1 = _v1(samples_to_batch(_samples()))
    validate_batch(v1)  # optional column: not required
    conformed = conform_batch(v1)
    assert conformed.schema.names == SAMPLE_SCHEMA.names
    assert conformed.column("routed_experts").to_pylist() == [[]] * v1.num_rows
    # a Table conforms to a Table (column order of the schema, whatever the input order)
    table = pa.Table.from_batches([v1]).select(list(reversed(v1.schema.names)))
    assert isinstance(conform_batch(table), pa.Table) and conform_batch(table).schema.names == SAMPLE_SCHEMA.names
    # a missing *required* column is still refused
    with pytest.raises(ValueError, match=r"missing column\(s\) \['reward'\]"):
        validate_batch(v1.drop_columns(["reward"]))


def test_buffer_takes_v1_and_v2_puts_and_loads_a_v1_state() -> None:
    buf = ReplayBuffer(group_size=2)
    v1 = _v1(samples_to_batch(_samples()))
    assert buf.put(v1.slice(0, 2)) == 1  # group g0 as schema v1 wrote it
    assert buf.put(samples_to_batch(_samples()).slice(2, 2)) == 1  # group g1 with routing
    out = buf.get_batch(2, trainer_version=0, timeout=1)
    assert out.schema.names == SAMPLE_SCHEMA.names
    routing = out.column("routed_experts").to_pylist()
    assert routing[:2] == [[], []] and routing[2] == _samples()[2].routed_experts
    # a buffer checkpoint written by schema v1 code loads (its groups get the column, empty)
    state = {"schema_version": 1, "groups": pa.Table.from_batches([v1]), "stats": {}, "version": 0, "seen_ids": []}
    fresh = ReplayBuffer(group_size=2)
    fresh.load_state_dict(state)
    assert fresh.get_batch(2, trainer_version=0, timeout=1).column("routed_experts").to_pylist() == [[]] * 4


def test_saved_sample_file_of_schema_v1_reads(tmp_path) -> None:
    from slime_rl.samples_io import read_batch

    path = tmp_path / "step_000001.parquet"
    pq.write_table(pa.Table.from_batches([_v1(samples_to_batch(_samples()))]), path)
    table = read_batch(path)
    assert table.schema.names == SAMPLE_SCHEMA.names and table.column("routed_experts").to_pylist() == [[]] * 4


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda r: r[:-1], r"row 0 has 3 entries, expected 0 \(not recorded\) or len\(prompt_ids\) \+ len\(response_ids\) - 1 = 4"),
        (lambda r: [r[0][:3]] + r[1:], r"row 0 holds an entry of 3 expert ids where the batch's entries have 4"),
        (lambda r: [[-1, 0, 1, 2]] + r[1:], r"row 0 holds expert id -1"),
    ],
)
def test_bad_routing_is_refused_naming_the_row(edit, message) -> None:
    samples = _samples()
    samples[0].routed_experts = edit(samples[0].routed_experts)
    with pytest.raises(ValueError, match=r"column 'routed_experts' " + message):
        validate_batch(samples_to_batch(samples))


def test_routing_of_a_later_row_with_another_width_is_refused() -> None:
    samples = _samples()
    samples[3].routed_experts = [row + [0] for row in samples[3].routed_experts]
    with pytest.raises(ValueError, match=r"column 'routed_experts' row 3 holds an entry of 5 expert ids"):
        validate_batch(samples_to_batch(samples))


def _result(tokens: int, routing: np.ndarray | None, rid: str = "r") -> GenerateResult:
    return GenerateResult(rid, list(range(tokens)), [-0.1] * tokens, FinishReason.STOP, [0] * tokens, 0, 0,
                          routed_experts=routing)


def test_continuations_keep_the_first_routing_of_each_position() -> None:
    """A response aborted by a weight update and continued: the continuation's prompt is the
    sequence so far, so its routing restarts at position 0; positions already covered keep the
    routing that produced their tokens."""
    P = 4
    first = np.full((P + 3 - 1, L, K), 1, dtype=np.int16)  # 3 tokens -> positions 0..5
    second = np.full((P + 3 + 2 - 1, L, K), 2, dtype=np.int16)  # 2 more tokens, prompt = P + 3
    merged = merge_results([_result(3, first), _result(2, second)])
    assert merged.routed_experts.shape == (P + 5 - 1, L, K)
    assert (merged.routed_experts[:6] == 1).all() and (merged.routed_experts[6:] == 2).all()
    column = routing_column(merged.routed_experts, P, 5)
    assert len(column) == P + 5 - 1 and column[0] == [1] * (L * K)
    # a piece without routing: the sample carries none (never a partial record)
    assert merge_results([_result(3, first), _result(2, None)]).routed_experts is None
    assert routing_column(None, P, 5) == [] and routing_column(first, P, 0) == []


def test_live_request_keeps_first_routing_and_drops_it_on_a_gap() -> None:
    import asyncio

    loop = asyncio.new_event_loop()
    try:
        live = _Live(request=None, future=loop.create_future(), policy_version=0)  # type: ignore[arg-type]
        live.add_routing(0, np.zeros((5, L, K), dtype=np.int16))
        live.add_routing(0, np.ones((6, L, K), dtype=np.int16))  # re-prefill after an update: only position 5 is new
        assert live.routed_experts().shape == (6, L, K) and live.routed_experts()[:5].max() == 0
        live.add_routing(8, np.ones((1, L, K), dtype=np.int16))  # positions 6, 7 never arrived
        assert live.routed_experts() is None
    finally:
        loop.close()
