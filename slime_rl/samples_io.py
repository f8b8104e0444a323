"""Trained batches on disk: `samples/step_NNNNNN.parquet`, readable and trainable again.

Each file is the batch the trainer took at that step (SAMPLE_SCHEMA columns) plus decoded
`prompt_text` and `response_text` (special tokens kept) and the reward terms
(`reward_metrics`, JSON), for inspection with pandas/duckdb. `read_batch` returns the
SAMPLE_SCHEMA part, which `run.train_only` trains on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from slime_rl.buffers.schema import OPTIONAL_COLUMNS, SAMPLE_SCHEMA, conform_batch
from slime_rl.buffers.validation import validate_batch


def readable_samples(table: pa.Table, tokenizer: Any) -> pa.Table:
    """`table` with `prompt_text` and `response_text` columns appended."""
    prompts = table.column("prompt_ids").to_pylist()
    responses = table.column("response_ids").to_pylist()
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731
    return table.append_column("prompt_text", pa.array([decode(p) for p in prompts], pa.string())).append_column(
        "response_text", pa.array([decode(r) for r in responses], pa.string())
    )


def saved_steps(folder: str | Path) -> dict[int, Path]:
    """The `step_NNNNNN.parquet` files of a samples folder by step, in step order ({} if none)."""
    out = {}
    for path in Path(folder).glob("step_*.parquet"):
        digits = path.stem.removeprefix("step_")
        if digits.isdigit():
            out[int(digits)] = path
    return dict(sorted(out.items()))


def read_batch(path: str | Path) -> pa.Table:
    """The SAMPLE_SCHEMA columns of a saved batch, validated.

    Raises:
        ValueError: the file lacks sample columns (names the file and the column).
    """
    table = pq.read_table(path)
    missing = [n for n in SAMPLE_SCHEMA.names if n not in table.schema.names and n not in OPTIONAL_COLUMNS]
    if missing:
        raise ValueError(f"{path}: not a slime-rl sample file, missing column(s) {missing}")
    # files of an older schema lack the optional columns: conform_batch adds them, empty
    table = conform_batch(table.select([n for n in SAMPLE_SCHEMA.names if n in table.schema.names])).cast(SAMPLE_SCHEMA)
    validate_batch(table)
    return table
