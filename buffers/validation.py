"""Checks that a RecordBatch/Table really is sample data before anyone trusts it.

Kept apart from the schema (``buffers/schema.py``) because the checks are most of the code and
all of the cost: the buffer runs them on every ``put`` and the trainer on every batch, so they are
vectorised, and each error names the column, the row and the rule so the producer can be fixed.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from slime_rl.buffers.schema import (
    OPTIONAL_COLUMNS,
    PER_TOKEN_COLUMNS,
    SAMPLE_SCHEMA,
    SCHEMA_VERSION,
    Mode,
    Status,
)

_ENUM_COLUMNS = {"status": {s.value for s in Status}, "mode": {m.value for m in Mode}}


def validate_batch(data: pa.RecordBatch | pa.Table) -> None:
    """Refuse data that does not match the sample schema, naming the column and row.

    Checks: the exact set of columns (optional ones, ``OPTIONAL_COLUMNS``, may be absent)
    and their types, no nulls in non-nullable columns,
    per-token columns as long as ``response_ids`` in every row, finite rewards, known
    ``status``/``mode`` values, ``loss_mask`` entries of 0 or 1, ``policy_version <=
    policy_version_end``, every ``token_versions`` entry within ``[policy_version,
    policy_version_end]`` of its row, ``metadata`` a JSON object (``""`` counts as ``{}``), and
    ``routed_experts`` empty or one entry per scored position (``len(prompt_ids) +
    len(response_ids) - 1``), every entry of one width across the batch (one model), with
    expert ids in ``[0, MAX_EXPERT_ID]``.
    Column-wide checks are vectorised (numpy / Arrow compute, the JSON via Arrow's reader);
    Python walks rows only to name the first bad one.

    Raises:
        ValueError: on the first problem found, with the column and (where it applies)
            the row index.
    """
    names = set(data.schema.names)
    expected = set(SAMPLE_SCHEMA.names)
    missing = [n for n in SAMPLE_SCHEMA.names if n not in names and n not in OPTIONAL_COLUMNS]
    extra = sorted(names - expected)
    if missing:
        raise ValueError(f"sample batch is missing column(s) {missing}; expected schema v{SCHEMA_VERSION}: {SAMPLE_SCHEMA.names}")
    if extra:
        raise ValueError(f"sample batch has unknown column(s) {extra}; expected schema v{SCHEMA_VERSION}: {SAMPLE_SCHEMA.names}")
    for field in SAMPLE_SCHEMA:
        if field.name not in names:  # an optional column (checked above)
            continue
        got = data.schema.field(field.name).type
        if got != field.type:
            raise ValueError(f"column '{field.name}' has type {got}, expected {field.type}")
        col = data.column(field.name)
        if not field.nullable and col.null_count:
            row = _first_null(col)
            raise ValueError(f"column '{field.name}' row {row} is null; the column is required")
    if data.num_rows == 0:
        return
    # Vectorised checks; the Python walk to name the row runs only once a problem is found.
    resp_len = _list_lengths(data.column("response_ids"))
    for name in PER_TOKEN_COLUMNS:
        lens = _list_lengths(data.column(name))
        bad = np.flatnonzero(lens != resp_len)
        if bad.size:
            row = int(bad[0])
            raise ValueError(f"column '{name}' row {row} has {lens[row]} entries but response_ids has {resp_len[row]}; per-token columns need one entry per response token")
    for name in ("prompt_ids", "response_ids", *PER_TOKEN_COLUMNS):
        col = data.column(name)
        if pc.list_flatten(col).null_count:
            row = next(i for i, v in enumerate(col.to_pylist()) if None in v)
            raise ValueError(f"column '{name}' row {row} holds a null entry; token and log-prob lists must be fully filled")
    rewards = data.column("reward").to_numpy()
    bad = np.flatnonzero(~np.isfinite(rewards))
    if bad.size:
        row = int(bad[0])
        raise ValueError(f"column 'reward' row {row} is {float(rewards[row])}; rewards must be finite numbers")
    for name, allowed in _ENUM_COLUMNS.items():
        col = data.column(name)
        if not set(pc.unique(col).to_pylist()) <= allowed:
            for row, v in enumerate(col.to_pylist()):
                if v not in allowed:
                    raise ValueError(f"column '{name}' row {row} is {v!r}; allowed: {sorted(allowed)}")
    _check_loss_mask(data.column("loss_mask"), resp_len)
    _check_versions(data, resp_len)
    _check_metadata(data.column("metadata"))
    if "routed_experts" in names:
        _check_routed_experts(data, resp_len)
    if "teacher_logprobs" in names:
        _check_teacher_logprobs(data.column("teacher_logprobs"), resp_len)


def _check_teacher_logprobs(col: pa.ChunkedArray | pa.Array, resp_len: np.ndarray) -> None:
    """``teacher_logprobs``: per row empty (not scored) or one finite entry per response token."""
    lens = _list_lengths(col)
    bad = np.flatnonzero((lens != 0) & (lens != resp_len))
    if bad.size:
        row = int(bad[0])
        raise ValueError(f"column 'teacher_logprobs' row {row} has {lens[row]} entries, expected 0 (not scored) or "
                         f"{resp_len[row]} (one per response token)")
    flat = _flat_values(col) if pc.list_flatten(col).null_count == 0 else None
    if flat is None or not np.isfinite(flat).all():
        rows = [i for i, v in enumerate(col.to_pylist()) if any(x is None or not np.isfinite(x) for x in v)]
        raise ValueError(f"column 'teacher_logprobs' row {rows[0]} holds a null or non-finite entry; teacher log-probs "
                         "must be finite numbers")


def _list_lengths(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return np.asarray(pc.list_value_length(col).to_numpy(zero_copy_only=False))


def _first_null(col: pa.ChunkedArray | pa.Array) -> int:
    mask = pc.is_null(col).to_pylist()
    return mask.index(True)


def _flat_values(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Every list entry of a (null-free) list column, in row order, as one numpy array."""
    chunks = col.chunks if isinstance(col, pa.ChunkedArray) else [col]
    parts = [c.flatten().to_numpy(zero_copy_only=False) for c in chunks]  # flatten honours slices
    if not parts:
        return np.empty(0, dtype=np.int32)
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _row_of(flat_index: int, lengths: np.ndarray) -> int:
    """Row holding entry ``flat_index`` of a flattened list column with these row lengths."""
    return int(np.searchsorted(np.cumsum(lengths), flat_index, side="right"))


def _check_loss_mask(col: pa.ChunkedArray | pa.Array, lengths: np.ndarray) -> None:
    flat = _flat_values(col)  # int32 (the schema's type)
    # One pass without a temporary: as uint32, negatives are huge, so max() > 1 catches both.
    if not flat.size or flat.view(np.uint32).max() <= 1:
        return
    i = int(np.flatnonzero(flat.view(np.uint32) > 1)[0])
    row = _row_of(i, lengths)
    raise ValueError(
        f"column 'loss_mask' row {row} holds {int(flat[i])} at response token "
        f"{i - int(lengths[:row].sum())}; entries must be 1 (a generated token the trainer "
        "learns from) or 0 (a prompt/tool/environment token it skips)"
    )


def _check_versions(data: pa.RecordBatch | pa.Table, lengths: np.ndarray) -> None:
    start = np.asarray(data.column("policy_version").to_numpy())
    end = np.asarray(data.column("policy_version_end").to_numpy())
    bad = np.flatnonzero(end < start)
    if bad.size:
        row = int(bad[0])
        raise ValueError(
            f"column 'policy_version_end' row {row} is {int(end[row])}, older than its "
            f"policy_version {int(start[row])}; policy_version is the weights version a sample "
            "started with, policy_version_end the newest one that produced any of its tokens"
        )
    flat = _flat_values(data.column("token_versions"))
    if not flat.size:
        return
    # Fast path: every token lies within every row's range (one version range for the batch).
    if flat.min() >= start.max() and flat.max() <= end.min():
        return
    nonempty = np.flatnonzero(lengths)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])[nonempty]
    low = np.minimum.reduceat(flat, offsets)
    high = np.maximum.reduceat(flat, offsets)
    bad = np.flatnonzero((low < start[nonempty]) | (high > end[nonempty]))
    if bad.size:
        row = int(nonempty[bad[0]])
        values = flat[offsets[bad[0]] : offsets[bad[0]] + lengths[row]]
        outside = values[(values < start[row]) | (values > end[row])]
        raise ValueError(
            f"column 'token_versions' row {row} holds version {int(outside[0])}, outside the row's "
            f"[policy_version, policy_version_end] = [{int(start[row])}, {int(end[row])}]; each "
            "token's version must lie between the versions the sample started and ended with"
        )


def _check_routed_experts(data: pa.RecordBatch | pa.Table, resp_len: np.ndarray) -> None:
    """``routed_experts``: per row empty or ``prompt + response - 1`` entries (the positions
    whose output the trainer scores), all entries of one width, no nulls, ids in range."""
    col = data.column("routed_experts")
    outer = _list_lengths(col)
    scored = _list_lengths(data.column("prompt_ids")) + resp_len - 1
    bad = np.flatnonzero((outer != 0) & (outer != scored))
    if bad.size:
        row = int(bad[0])
        raise ValueError(
            f"column 'routed_experts' row {row} has {outer[row]} entries, expected 0 (not recorded) or "
            f"len(prompt_ids) + len(response_ids) - 1 = {scored[row]}: one per position whose next-token "
            "prediction the trainer scores"
        )
    if not outer.any():
        return
    chunks = col.chunks if isinstance(col, pa.ChunkedArray) else [col]
    inner = pa.chunked_array([c.flatten() for c in chunks], type=col.type.value_type)
    if inner.null_count or pc.list_flatten(inner).null_count:
        row = next(i for i, v in enumerate(col.to_pylist()) if any(e is None or None in e for e in v))
        raise ValueError(f"column 'routed_experts' row {row} holds a null entry; routing lists must be fully filled")
    widths = _list_lengths(inner)
    if widths.min() != widths.max() or widths.min() == 0:
        usual = int(np.bincount(widths).argmax())
        i = int(np.flatnonzero(widths != usual)[0]) if widths.min() != widths.max() else 0
        raise ValueError(
            f"column 'routed_experts' row {_row_of(i, outer)} holds an entry of {widths[i]} expert ids where the "
            f"batch's entries have {usual}; every entry lists (MoE layers x experts per token) ids of one model, "
            "layer-major"
        )
    flat = _flat_values(inner)
    if flat.size and flat.min() < 0:
        i = int(np.flatnonzero(flat < 0)[0]) // int(widths[0])
        raise ValueError(
            f"column 'routed_experts' row {_row_of(i, outer)} holds expert id {int(flat.min())}; expert ids are >= 0"
        )


def _check_metadata(col: pa.ChunkedArray | pa.Array) -> None:
    """Every ``metadata`` entry is a JSON object (or ``""``): what ``Sample.from_row`` reads."""
    if pc.all(pc.equal(col, "{}")).as_py():  # no metadata at all: the common cheap case
        return
    if _json_objects_fast(col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col):
        return
    for row, text in enumerate(col.to_pylist()):  # name the first bad row, with json's reason
        if text == "":
            continue
        try:
            value = json.loads(text)
        except ValueError as e:
            raise ValueError(
                f"column 'metadata' row {row} is not valid JSON ({e}): {text[:80]!r}; metadata "
                "must be a JSON object, e.g. json.dumps(dict)"
            ) from None
        if not isinstance(value, dict):
            raise ValueError(
                f"column 'metadata' row {row} is a JSON {type(value).__name__}, not an object: "
                f"{text[:80]!r}; metadata must be a JSON object, e.g. json.dumps(dict)"
            )


def _json_objects_fast(values: pa.Array) -> bool:
    """True when every string is exactly one JSON object, checked with Arrow's JSON reader
    (one object per line, several times faster than ``json.loads`` per row). False means
    "not proven": the caller then checks row by row.

    Each row must start with ``{``, end with ``}`` and hold no line break, so it is one
    line that yields at least one object; the reader must then find exactly one object per
    row (``{..}{..}`` on one line would make two)."""
    if not (pc.all(pc.starts_with(values, "{")).as_py() and pc.all(pc.ends_with(values, "}")).as_py()):
        return False
    one_list = pa.ListArray.from_arrays(pa.array([0, len(values)], pa.int32()), values)
    text = pc.binary_join(one_list, "\n")[0].as_buffer()
    raw = np.frombuffer(text, dtype=np.uint8)
    if np.count_nonzero(raw == 10) != len(values) - 1 or np.count_nonzero(raw == 13):
        return False  # a row holds a line break
    import pyarrow.json as pa_json

    try:
        parsed = pa_json.read_json(
            pa.BufferReader(text),
            read_options=pa_json.ReadOptions(use_threads=False, block_size=text.size + 1),  # one block
            parse_options=pa_json.ParseOptions(explicit_schema=pa.schema([]), unexpected_field_behavior="ignore"),
        )
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return False
    return parsed.num_rows == len(values)
