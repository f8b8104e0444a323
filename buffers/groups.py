"""Cut a validated sample batch into whole groups, and the staleness arithmetic on them.

    RecordBatch (SAMPLE_SCHEMA, 1+ groups, rows of a group contiguous)
        -> normalize_batch()   column order/types of SAMPLE_SCHEMA, one chunk
        -> group_spans()       [(group_id, first_row, num_rows)], refusing split groups
        -> Group               one group's rows + its min policy_version, held by the buffer

Staleness of a group is ``trainer_version - min(policy_version)`` over its samples:
``policy_version`` is the weights version a sample *started* with, which is no newer than
any of its tokens (``token_versions``), so this is the conservative (largest) staleness.
Per-token staleness is ``trainer_version - token_versions`` (see ``token_staleness``).
"""

from __future__ import annotations

import dataclasses

import pyarrow as pa
import pyarrow.compute as pc
from slime_rl.buffers.schema import SAMPLE_SCHEMA, conform_batch
from slime_rl.buffers.validation import validate_batch


@dataclasses.dataclass(frozen=True, slots=True)
class Group:
    """One group held by the buffer: all samples of one prompt, never split."""

    group_id: str
    data: pa.RecordBatch
    """The group's rows (SAMPLE_SCHEMA), compact: serialising it moves only these rows."""
    min_version: int
    """Oldest ``policy_version`` among the group's samples."""
    seq: int
    """Arrival order in the buffer (FIFO key)."""
    nbytes: int
    """Arrow size of ``data`` (cached: computing it walks every buffer)."""

    @property
    def num_samples(self) -> int:
        return self.data.num_rows

    def staleness(self, trainer_version: int) -> int:
        return trainer_version - self.min_version


def normalize_batch(data: pa.RecordBatch | pa.Table) -> pa.RecordBatch:
    """Validate ``data`` against SAMPLE_SCHEMA and return it as one RecordBatch in schema order.

    Raises:
        ValueError: naming the column and row of the first problem (see ``validate_batch``).
    """
    if not isinstance(data, (pa.RecordBatch, pa.Table)):
        raise ValueError(
            f"put expects a pyarrow.RecordBatch or Table of SAMPLE_SCHEMA, got {type(data).__name__}; "
            "build one with slime_rl.buffers.samples_to_batch(samples)"
        )
    validate_batch(data)
    data = conform_batch(data)  # data of an older schema gets the optional columns, empty
    if isinstance(data, pa.Table):
        if data.num_rows == 0:
            return pa.RecordBatch.from_pylist([], schema=SAMPLE_SCHEMA)
        batches = data.combine_chunks().to_batches()
        data = batches[0] if len(batches) == 1 else _concat(batches)
    columns = [data.column(name) for name in SAMPLE_SCHEMA.names]
    return pa.RecordBatch.from_arrays(columns, schema=SAMPLE_SCHEMA)


def _concat(batches: list[pa.RecordBatch]) -> pa.RecordBatch:
    table = pa.Table.from_batches(batches).combine_chunks()
    return pa.RecordBatch.from_arrays([table.column(n).chunk(0) for n in table.column_names], schema=table.schema)


def group_spans(batch: pa.RecordBatch, group_size: int | None = None) -> list[tuple[str, int, int]]:
    """Return ``(group_id, first_row, num_rows)`` per group, in row order.

    Raises:
        ValueError: an empty ``group_id``, a group whose rows are not contiguous (a split
            group), a repeated ``sample_id``, or (with ``group_size``) a group of the wrong
            size; the message names the column and row.
    """
    ids = batch.column("group_id").to_pylist()
    spans: list[tuple[str, int, int]] = []
    first_row: dict[str, int] = {}
    for row, gid in enumerate(ids):
        if gid == "":
            raise ValueError(f"column 'group_id' row {row} is empty; every sample needs the id of its group")
        if spans and spans[-1][0] == gid:
            name, start, n = spans[-1]
            spans[-1] = (name, start, n + 1)
            continue
        if gid in first_row:
            raise ValueError(
                f"column 'group_id' row {row}: group {gid!r} already appeared at row {first_row[gid]} with other "
                "groups' rows in between; put each group's samples next to each other, whole, in one call"
            )
        first_row[gid] = row
        spans.append((gid, row, 1))
    sample_ids = batch.column("sample_id").to_pylist()
    seen: dict[str, int] = {}
    for row, sid in enumerate(sample_ids):
        if sid in seen:
            raise ValueError(f"column 'sample_id' row {row} repeats {sid!r} of row {seen[sid]}; sample ids must be unique")
        seen[sid] = row
    if group_size is not None:
        for gid, start, n in spans:
            if n != group_size:
                raise ValueError(
                    f"column 'group_id' row {start}: group {gid!r} has {n} samples but this buffer expects "
                    f"whole groups of {group_size} (n_samples_per_prompt); put complete groups only"
                )
    return spans


def min_versions(batch: pa.RecordBatch, spans: list[tuple[str, int, int]]) -> list[int]:
    """Oldest ``policy_version`` of each span's rows."""
    versions = batch.column("policy_version").to_numpy()
    return [int(versions[start : start + n].min()) for _, start, n in spans]


def token_staleness(data: pa.RecordBatch | pa.Table, trainer_version: int) -> pa.ListArray | pa.ChunkedArray:
    """Per-token staleness ``trainer_version - token_versions``, same list layout as ``response_ids``."""
    col = data.column("token_versions")
    chunks = col.chunks if isinstance(col, pa.ChunkedArray) else [col]
    out = []
    for chunk in chunks:
        offsets = chunk.offsets
        if len(chunk):
            offsets = pc.subtract(offsets, offsets[0])  # a sliced list array's offsets do not start at 0
        flat = pc.subtract(pa.scalar(trainer_version, pa.int32()), chunk.flatten())
        out.append(pa.ListArray.from_arrays(offsets, flat))
    return pa.chunked_array(out, type=pa.list_(pa.int32())) if isinstance(col, pa.ChunkedArray) else out[0]


def group_staleness(data: pa.RecordBatch | pa.Table, trainer_version: int) -> dict[str, int]:
    """Staleness per group id (``trainer_version - min policy_version``), in first-seen order."""
    out: dict[str, int] = {}
    for gid, v in zip(data.column("group_id").to_pylist(), data.column("policy_version").to_pylist()):
        s = trainer_version - v
        if gid not in out or s > out[gid]:
            out[gid] = s
    return out
