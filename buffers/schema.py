"""The one Arrow schema of a rollout sample, and a plain-Python view of it.

Every other part of slime-rl reads the layout of a sample from here:

    rollout manager --(RecordBatch, SAMPLE_SCHEMA)--> ReplayBuffer --(pa.Table)--> trainer
                         ^ Sample.to_arrow()                 rewards see Sample views

One row is one sample; a *group* is the rows sharing ``group_id`` (one prompt x
``n_samples_per_prompt``). Token columns are ``list<int32>``, per-token float columns
``list<float32>``; every per-token column has exactly ``len(response_ids)`` entries.

>>> s = Sample(sample_id="g0-0", group_id="g0", prompt_ids=[1, 2], response_ids=[3, 4],
...            response_logprobs=[-0.1, -0.2], reward=1.0)
>>> batch = samples_to_batch([s])
>>> batch_to_samples(batch)[0].response_ids
[3, 4]

Checking a batch against this schema (naming the bad row and column) is ``buffers/validation.py``.

Schema v2 added ``routed_experts`` (MoE routing recorded by the engine, for rollout routing
replay). It is *optional*: data of schema v1 (without it) still validates, and
``conform_batch`` adds it as empty lists, the value that means "not recorded" (dense models,
engines that do not record). Schema v3 added ``teacher_logprobs`` (on-policy distillation: the
teacher's log-prob of each sampled response token), optional the same way: empty = not scored.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from collections.abc import Sequence
from typing import Any

import pyarrow as pa

SCHEMA_VERSION = 3
"""Bumped whenever a column is added, removed or changes type (v2: ``routed_experts``, v3:
``teacher_logprobs``)."""

READABLE_SCHEMA_VERSIONS = (1, 2, 3)
"""Versions whose data this code still loads (through ``conform_batch``)."""


class Status(str, enum.Enum):
    """How a sample's generation ended."""

    COMPLETED = "completed"
    TRUNCATED = "truncated"
    ABORTED = "aborted"
    FAILED = "failed"


class Mode(str, enum.Enum):
    """Whether the sample was generated with a reasoning block (think) or a direct answer."""

    THINK = "think"
    NON_THINK = "non_think"


_TOKENS = pa.list_(pa.int32())
_FLOATS = pa.list_(pa.float32())
_ROUTING = pa.list_(pa.list_(pa.int16()))

SAMPLE_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("group_id", pa.string(), nullable=False),
        pa.field("prompt_ids", _TOKENS, nullable=False),
        pa.field("response_ids", _TOKENS, nullable=False),
        pa.field("response_logprobs", _FLOATS, nullable=False),
        pa.field("loss_mask", _TOKENS, nullable=False),
        pa.field("token_versions", _TOKENS, nullable=False),
        pa.field("reward", pa.float32(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("policy_version", pa.int64(), nullable=False),
        pa.field("policy_version_end", pa.int64(), nullable=False),
        pa.field("mode", pa.string(), nullable=False),
        pa.field("label", pa.string(), nullable=True),
        pa.field("metadata", pa.string(), nullable=False),
        pa.field("created_at", pa.float64(), nullable=False),
        pa.field("gen_seconds", pa.float32(), nullable=False),
        pa.field("reward_seconds", pa.float32(), nullable=False),
        pa.field("routed_experts", _ROUTING, nullable=False),
        pa.field("teacher_logprobs", _FLOATS, nullable=False),
    ],
    metadata={"slime_rl.schema_version": str(SCHEMA_VERSION)},
)
"""Arrow schema of one sample row (``SCHEMA_VERSION`` is in its metadata)."""

PER_TOKEN_COLUMNS = ("response_logprobs", "loss_mask", "token_versions")
"""Columns that carry one entry per response token."""

OPTIONAL_COLUMNS = ("routed_experts", "teacher_logprobs")
"""Columns a batch may lack (data written before they existed); ``conform_batch`` adds them
as empty lists."""

MAX_EXPERT_ID = 32767
"""Largest expert index ``routed_experts`` can hold (int16)."""

@dataclasses.dataclass
class Sample:
    """A Python view of one sample row, for code that wants objects (reward functions).

    Defaults fill in what a freshly generated sample does not know yet: an all-ones
    ``loss_mask``, ``token_versions`` equal to ``policy_version``, and so on.
    ``prompt``/``response``/``messages``/``tool_calls`` are decoded text that rewards
    read; they are not Arrow columns (rollout decodes them, ``metadata`` may keep them).
    """

    sample_id: str
    group_id: str
    prompt_ids: list[int]
    response_ids: list[int]
    response_logprobs: list[float] | None = None
    loss_mask: list[int] | None = None
    token_versions: list[int] | None = None
    reward: float = 0.0
    status: str = Status.COMPLETED.value
    policy_version: int = 0
    policy_version_end: int | None = None
    mode: str = Mode.NON_THINK.value
    label: str | None = None
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    created_at: float = 0.0
    gen_seconds: float = 0.0
    reward_seconds: float = 0.0
    routed_experts: list[list[int]] | None = None
    """MoE routing the engine used, one entry per position the trainer scores (the prompt and
    response tokens except the last: ``len(prompt_ids) + len(response_ids) - 1`` entries),
    each the experts chosen at every MoE layer, layer-major (``[l0k0, l0k1, l1k0, ...]``).
    Empty (the default) = not recorded."""
    teacher_logprobs: list[float] | None = None
    """On-policy distillation: the teacher's log-prob of each response token (``rollout/teacher.py``),
    one per response token. Empty (the default) = not scored."""
    # Decoded views, not stored as columns.
    prompt: str = ""
    response: str = ""
    messages: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    tool_calls: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.response_ids)
        if self.response_logprobs is None:
            self.response_logprobs = [0.0] * n
        if self.loss_mask is None:
            self.loss_mask = [1] * n
        if self.token_versions is None:
            self.token_versions = [self.policy_version] * n
        if self.policy_version_end is None:
            self.policy_version_end = self.policy_version
        if self.routed_experts is None:
            self.routed_experts = []
        if self.teacher_logprobs is None:
            self.teacher_logprobs = []
        if isinstance(self.status, Status):
            self.status = self.status.value
        if isinstance(self.mode, Mode):
            self.mode = self.mode.value

    def to_row(self) -> dict[str, Any]:
        """The sample as one Arrow row (a dict keyed by ``SAMPLE_SCHEMA`` names)."""
        row = {name: getattr(self, name) for name in SAMPLE_SCHEMA.names}
        row["metadata"] = json.dumps(self.metadata, default=str)
        return row

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Sample:
        """Build a view from one Arrow row (``Table.to_pylist()`` element)."""
        kwargs = {name: row[name] for name in SAMPLE_SCHEMA.names if name in row}
        kwargs["metadata"] = json.loads(row.get("metadata") or "{}")
        return cls(**kwargs)


def samples_to_batch(samples: Sequence[Sample]) -> pa.RecordBatch:
    """Convert Sample views to one RecordBatch of ``SAMPLE_SCHEMA``."""
    rows = [s.to_row() for s in samples]
    return pa.RecordBatch.from_pylist(rows, schema=SAMPLE_SCHEMA)


def batch_to_samples(data: pa.RecordBatch | pa.Table) -> list[Sample]:
    """Convert a RecordBatch or Table of ``SAMPLE_SCHEMA`` to Sample views."""
    return [Sample.from_row(r) for r in data.to_pylist()]


def conform_batch(data: pa.RecordBatch | pa.Table) -> pa.RecordBatch | pa.Table:
    """``data`` with the columns in ``SAMPLE_SCHEMA`` order and every missing optional column
    (``OPTIONAL_COLUMNS``, e.g. ``routed_experts`` in data of schema v1) added as empty lists.
    Returns the same kind (RecordBatch or Table). Does not validate: call
    ``validation.validate_batch`` first; a missing required column is left missing for it to name."""
    columns, fields = [], []
    for field in SAMPLE_SCHEMA:
        if field.name in data.schema.names:
            columns.append(data.column(field.name))
        elif field.name in OPTIONAL_COLUMNS:
            columns.append(pa.array([[]] * data.num_rows, type=field.type))
        else:
            continue
        fields.append(field)
    schema = pa.schema(fields, metadata=SAMPLE_SCHEMA.metadata)
    if isinstance(data, pa.RecordBatch):
        return pa.RecordBatch.from_arrays(
            [c.combine_chunks() if isinstance(c, pa.ChunkedArray) else c for c in columns], schema=schema
        )
    return pa.Table.from_arrays(columns, schema=schema)


def empty_table() -> pa.Table:
    """A zero-row table with the sample schema."""
    return SAMPLE_SCHEMA.empty_table()
