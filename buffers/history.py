"""Export history: every sample the buffer has seen, with how it left, to one Parquet file.

    SpillLog.snapshot_history() (under the buffer lock: open files only)
        -> iter_history()   retired generations, then the live log (without the lock)
        -> write_parquet()  HISTORY_SCHEMA row groups of ~4k rows

A group is emitted from the generation that consumed (or dropped) it, so every sample
comes out once even though compaction copies live groups into each new generation.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from slime_rl.buffers.schema import SAMPLE_SCHEMA
from slime_rl.buffers.wal import HistorySnapshot, read_batches

HISTORY_SCHEMA = SAMPLE_SCHEMA.append(pa.field("buffer_outcome", pa.string(), nullable=False)).append(
    pa.field("buffer_version", pa.int64(), nullable=True)
)
"""Rows of ``export``: the sample, how it left the buffer (``consumed`` | ``dropped_stale`` |
``buffered`` = still held) and the trainer version at that moment (null while buffered)."""


def iter_history(snap: HistorySnapshot) -> Iterator[pa.RecordBatch]:
    """Every sample of a snapshot, once, as HISTORY_SCHEMA batches; closes the snapshot's files.

    A group is emitted from the generation that consumed (or dropped) it; carried-over
    copies in later generations are skipped; still-held groups come from the live log.
    """
    try:
        for log_f, consumed_f in snap.retired:
            consumed = read_batches(pa.py_buffer(consumed_f.read()))[0] if consumed_f is not None else []
            outcomes = {r["group_id"]: (r["outcome"], r["version"]) for b in consumed for r in b.to_pylist()}
            for b in read_batches(pa.py_buffer(log_f.read()))[0]:
                gid = b.column("group_id")[0].as_py()
                if gid in outcomes:
                    yield with_outcome(b, *outcomes[gid])
        if snap.live is not None:
            log_f, size, outcomes = snap.live
            for b in read_batches(pa.py_buffer(log_f.read(size)))[0]:
                outcome, version = outcomes.get(b.column("group_id")[0].as_py(), ("buffered", None))
                yield with_outcome(b, outcome, version)
    finally:
        for f in [f for pair in snap.retired for f in pair] + ([snap.live[0]] if snap.live else []):
            if f is not None:
                f.close()


def with_outcome(batch: pa.RecordBatch, outcome: str, version: int | None) -> pa.RecordBatch:
    """``batch`` (SAMPLE_SCHEMA) plus the two HISTORY_SCHEMA columns, same value on every row."""
    n = batch.num_rows
    cols = [batch.column(i) for i in range(batch.num_columns)]
    cols += [pa.array([outcome] * n, pa.string()), pa.array([version] * n, pa.int64())]
    return pa.RecordBatch.from_arrays(cols, schema=HISTORY_SCHEMA)


def write_parquet(path: str | Path, batches: Iterable[pa.RecordBatch]) -> int:
    """Write HISTORY_SCHEMA batches to one Parquet file in row groups of ~4k rows; return rows written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows, pending = 0, []
    with pq.ParquetWriter(str(path), HISTORY_SCHEMA) as writer:
        for b in batches:
            pending.append(b)
            rows += b.num_rows
            if sum(p.num_rows for p in pending) >= 4096:  # one group per row group would bloat the file
                writer.write_table(pa.Table.from_batches(pending, schema=HISTORY_SCHEMA))
                pending = []
        if pending:
            writer.write_table(pa.Table.from_batches(pending, schema=HISTORY_SCHEMA))
    return rows
