"""Prompt datasets of the rollout side: read, check, render and walk in a seeded order.

    file (.jsonl / .parquet) --pyarrow--> rows --check fields--> messages, label, mode, tools
        --chat template (mode, system prompt, tools)--> text --batch tokenise--> Prompt

The seeded walk over the prompts (``DatasetCursor``) is in ``rollout/cursor.py``.

Bad rows never crash a load: with ``data.on_error=skip`` they are counted per reason and
reported in one warning; with ``raise`` the load stops with a :class:`DataError` naming the
file, row, field and problem. See docs/data.md.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.json as pa_json
import pyarrow.parquet as pq
from slime_rl.rollout.config import DataConfig
from slime_rl.rollout.cursor import seed64

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

MODES = ("think", "non_think")
ROLES = ("system", "user", "assistant", "tool")
REPORTED_ROWS = 5
"""Row numbers kept per bad-row reason (``PromptDataset.skipped_rows``, the warning)."""
_MODE_STREAM = 0x6D6F6465  # separates the mode_mix draws from other uses of the run seed
_JSON_BLOCK_BYTES = 16 << 20  # pyarrow block: bigger than any sane line, so no line straddles


class DataError(ValueError):
    """A dataset that cannot be used: missing/empty/unreadable file, unsupported suffix, no
    usable row, a tokenizer without a chat template, or (``data.on_error=raise``) a bad row.
    ``path`` and, for a bad row, ``row``/``field``/``reason`` say where."""

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        row: int | None = None,
        field: str | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(message)
        self.path, self.row, self.field, self.reason = path, row, field, reason


@dataclass(frozen=True, slots=True)
class Prompt:
    """One usable dataset row, rendered and tokenised."""

    row: int
    """Row number in the file: 1-based line for JSONL, 0-based row for Parquet."""
    uid: str
    """Stable id ``f"{dataset name}-{row}"`` (group ids are built from it)."""
    prompt_ids: tuple[int, ...]
    """Token ids of ``text`` (no special tokens added beyond the template's)."""
    text: str
    """The chat-template rendering with ``add_generation_prompt=True``."""
    messages: tuple[dict[str, Any], ...]
    """The messages that were rendered (the configured system prompt included)."""
    label: str | None
    """Reference answer as text (numbers via ``str``, bools/lists/dicts via ``json.dumps``)."""
    mode: str
    """``"think"`` or ``"non_think"``."""
    tools: tuple[dict[str, Any], ...] | None
    """OpenAI function schemas rendered into the prompt, if the row has any."""
    metadata: dict[str, Any]
    """Every other field of the row (JSON-able), e.g. verl's data_source, extra_info, ability."""
    data_source: str | None
    """The row's ``data_source`` field, if any (per-source eval metrics)."""


class _RowError(Exception):
    def __init__(self, reason: str, field: str, problem: str) -> None:
        super().__init__(problem)
        self.reason, self.field, self.problem = reason, field, problem


@dataclass(slots=True)
class _Bad:
    row: int
    reason: str
    field: str
    problem: str


# ---------------------------------------------------------------------------------------------
# Reading


def _read_jsonl(path: Path, label_key: str) -> tuple[list[Any], list[int], list[_Bad]]:
    """Records, their 1-based line numbers, and the lines that are not JSON.

    pyarrow parses the whole file at once; only when it refuses (a bad line, a field whose
    type changes between rows) or when the label may have lost its int formatting (pyarrow
    widens a column mixing ints and floats to float) are the lines parsed one by one."""
    data = path.read_bytes()
    lines = data.split(b"\n")
    line_nos = [i + 1 for i, line in enumerate(lines) if line.strip()]
    if not line_nos:
        return [], [], []
    try:
        table = pa_json.read_json(
            io.BytesIO(data), read_options=pa_json.ReadOptions(block_size=_JSON_BLOCK_BYTES)
        )
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        logger.debug("%s: pyarrow could not read it (%s); parsing line by line", path, e)
    else:
        if table.num_rows == len(line_nos) and not _has_float(_field_type(table.schema, label_key)):
            return table.to_pylist(), line_nos, []
    records, rows, bad = [], [], []
    for no in line_nos:
        try:
            records.append(json.loads(lines[no - 1]))
            rows.append(no)
        except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError
            bad.append(_Bad(no, "invalid_json", "<line>", f"not valid JSON ({e})"))
    return records, rows, bad


def _field_type(schema: pa.Schema, path: str) -> pa.DataType | None:
    """Arrow type at a dotted path (a literal top-level name wins), None when absent."""
    if path in schema.names:
        return schema.field(path).type
    node: pa.DataType | pa.Schema = schema
    for part in path.split("."):
        if isinstance(node, pa.Schema):
            if part not in node.names:
                return None
            node = node.field(part).type
        elif pa.types.is_struct(node) and node.get_field_index(part) >= 0:
            node = node.field(part).type
        else:
            return None
    return node  # type: ignore[return-value]


def _has_float(t: pa.DataType | None) -> bool:
    if t is None:
        return False
    if pa.types.is_struct(t):
        return any(_has_float(t.field(i).type) for i in range(t.num_fields))
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return _has_float(t.value_type)
    return pa.types.is_floating(t)


def _read_parquet(path: Path) -> tuple[list[Any], list[int]]:
    table = pq.read_table(path)
    records = table.to_pylist()
    if not _json_native(table.schema):
        records = [_jsonable(r) for r in records]
    return records, list(range(len(records)))


def _json_native(schema: pa.Schema) -> bool:
    def native(t: pa.DataType) -> bool:
        if pa.types.is_struct(t):
            return all(native(t.field(i).type) for i in range(t.num_fields))
        if pa.types.is_list(t) or pa.types.is_large_list(t):
            return native(t.value_type)
        if pa.types.is_dictionary(t):
            return native(t.value_type)
        return (
            pa.types.is_null(t)
            or pa.types.is_boolean(t)
            or pa.types.is_integer(t)
            or pa.types.is_floating(t)
            or pa.types.is_string(t)
            or pa.types.is_large_string(t)
        )

    return all(native(f.type) for f in schema)


def _jsonable(value: Any) -> Any:
    """Parquet values that JSON lacks (bytes, timestamps, decimals, maps) as JSON values."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)


# ---------------------------------------------------------------------------------------------
# Fields of one row


def _pop(record: dict[str, Any], path: str) -> Any:
    """Remove and return the value at a dotted path (None when absent). A literal top-level
    key wins (a flattened ``reward_model.ground_truth`` column); emptied parents are dropped."""
    if path in record:
        return record.pop(path)
    parts = path.split(".")
    parents = [record]
    for part in parts[:-1]:
        node = parents[-1].get(part)
        if not isinstance(node, dict):
            return None
        parents.append(node)
    value = parents[-1].pop(parts[-1], None)
    for depth in range(len(parts) - 1, 0, -1):
        if parents[depth]:
            break
        del parents[depth - 1][parts[depth - 1]]
    return value


def _drop_none(value: Any) -> Any:
    """Drop None-valued keys: Arrow fills struct fields that other rows have with nulls."""
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


def _messages(value: Any, key: str) -> list[dict[str, Any]]:
    if value is None:
        raise _RowError("missing_prompt", key, "no prompt")
    if isinstance(value, str):
        if not value.strip():
            raise _RowError("empty_prompt", key, "the prompt text is empty")
        return [{"role": "user", "content": value}]
    if not isinstance(value, list):
        raise _RowError(
            "wrong_type",
            key,
            f"expected text or a list of chat messages, got {type(value).__name__}",
        )
    messages = []
    for i, message in enumerate(value):
        where = f"{key}[{i}]"
        if not isinstance(message, dict):
            problem = f"expected a chat message (an object), got {type(message).__name__}"
            raise _RowError("wrong_type", where, problem)
        message = _drop_none(message)
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            problem = "has no role" if role is None else f"unknown role {role!r}"
            raise _RowError(
                "wrong_type", f"{where}.role", f"{problem}; expected {', '.join(ROLES)}"
            )
        if content is None and not (role == "assistant" and message.get("tool_calls")):
            raise _RowError("wrong_type", f"{where}.content", "message has no content")
        if content is not None and not isinstance(content, str):
            problem = f"expected a string, got {type(content).__name__}"
            raise _RowError("wrong_type", f"{where}.content", problem)
        messages.append(message)
    turns = [m for m in messages if m["role"] != "system"]
    if not any(m.get("content", "").strip() or m.get("tool_calls") for m in turns):
        raise _RowError("empty_prompt", key, "no non-empty user/assistant/tool message")
    return messages


def _label(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (bool, list, dict)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _mode(value: Any, key: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise _RowError("wrong_type", key, f"expected a string, got {type(value).__name__}")
    if value not in MODES:
        raise _RowError("bad_mode", key, f"mode {value!r} is not one of {', '.join(MODES)}")
    return value


def _tools(value: Any, key: str) -> tuple[dict[str, Any], ...] | None:
    if isinstance(value, str):  # Parquet files often keep tool schemas as a JSON string
        try:
            value = json.loads(value)
        except ValueError as e:
            problem = f"a string that is not a JSON tool list ({e})"
            raise _RowError("wrong_type", key, problem) from None
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        problem = f"expected a list of tool schemas (objects), got {type(value).__name__}"
        raise _RowError("wrong_type", key, problem)
    return tuple(_drop_none(t) for t in value) or None


# ---------------------------------------------------------------------------------------------
# The dataset


class PromptDataset(Sequence[Prompt]):
    """The usable rows of one prompt file, rendered and tokenised once at load.

    Example::

        ds = PromptDataset.load("train.jsonl", cfg.data, tokenizer, max_prompt_tokens=512,
                                seed=cfg.run.seed, name="train")
        cursor = DatasetCursor(len(ds), seed=cfg.run.seed, shuffle=cfg.data.shuffle)  # rollout.cursor
        i, epoch = cursor.next()
        ds[i].prompt_ids, ds[i].label, ds[i].mode
    """

    def __init__(
        self,
        prompts: list[Prompt],
        *,
        name: str,
        path: Path,
        num_rows: int,
        skipped: dict[str, int],
        skipped_rows: dict[str, list[int]],
    ) -> None:
        self._prompts = prompts
        self.name = name
        self.path = path
        self.num_rows = num_rows
        """Rows read from the file, bad ones included."""
        self.skipped = skipped
        """Bad rows per reason (``invalid_json``, ``missing_prompt``, ``empty_prompt``,
        ``wrong_type``, ``bad_mode``, ``render_error``, ``too_long``)."""
        self.skipped_rows = skipped_rows
        """The first few row numbers per reason."""

    def __len__(self) -> int:
        return len(self._prompts)

    def __getitem__(self, index: int) -> Prompt:  # type: ignore[override]
        return self._prompts[index]

    def __iter__(self) -> Iterator[Prompt]:
        return iter(self._prompts)

    def __repr__(self) -> str:
        return f"PromptDataset({self.name!r}, {str(self.path)!r}, {len(self)} prompts, skipped={self.skipped})"

    @classmethod
    def load(
        cls,
        path: str | Path,
        data_cfg: DataConfig,
        tokenizer: PreTrainedTokenizerBase,
        *,
        max_prompt_tokens: int = 0,
        seed: int = 0,
        name: str | None = None,
    ) -> PromptDataset:
        """Read ``path`` (``.jsonl``/``.json``: one JSON object per line; ``.parquet``), render
        every row with ``tokenizer``'s chat template and tokenise it.

        ``data_cfg`` names the fields (dotted paths), the system prompt, mode rules and bad-row
        policy; ``max_prompt_tokens`` > 0 makes longer prompts bad rows; ``seed`` (the run
        seed) draws ``mode_mix``; ``name`` (default: the file stem) prefixes the uids.

        Raises DataError: missing, empty or unreadable file, other suffix, tokenizer without
        a chat template, no usable row, or any bad row under ``on_error=raise``."""
        path = Path(path)
        name = name or path.stem
        if max_prompt_tokens < 0:
            raise ValueError(
                f"max_prompt_tokens must be >= 0 (0 = no limit), got {max_prompt_tokens}"
            )
        if not getattr(tokenizer, "chat_template", None):
            tok_name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
            raise DataError(
                f"tokenizer {tok_name!r} has no chat template; prompts are rendered with it "
                "(use an instruct/chat tokenizer or set tokenizer.chat_template)",
                path=str(path),
            )
        if not path.is_file():
            raise DataError(
                f"dataset file {path} does not exist (or is not a file)", path=str(path)
            )
        suffix = path.suffix.lower()
        bad: list[_Bad] = []
        try:
            if suffix in (".jsonl", ".json"):
                records, rows, bad = _read_jsonl(path, data_cfg.label_key)
            elif suffix == ".parquet":
                records, rows = _read_parquet(path)
            else:
                raise DataError(
                    f"dataset file {path}: unsupported suffix {suffix!r}; expected .jsonl, .json or .parquet",
                    path=str(path),
                )
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"dataset file {path} could not be read: {e}", path=str(path)) from e
        if not records and not bad:
            raise DataError(f"dataset file {path} is empty (no rows)", path=str(path))

        prompts = _build(records, rows, data_cfg, tokenizer, max_prompt_tokens, seed, name, bad)
        num_rows = len(records) + sum(b.reason == "invalid_json" for b in bad)
        return _finish(prompts, bad, path, name, num_rows, data_cfg.on_error, records, suffix)


def _build(
    records: list[Any],
    rows: list[int],
    cfg: DataConfig,
    tokenizer: PreTrainedTokenizerBase,
    max_prompt_tokens: int,
    seed: int,
    name: str,
    bad: list[_Bad],
) -> list[Prompt]:
    """Check and render every record; bad ones are appended to ``bad``."""
    parsed: list[tuple[int, list[dict[str, Any]], str | None, str | None, Any, dict[str, Any]]] = []
    for record, row in zip(records, rows):
        try:
            if not isinstance(record, dict):
                problem = f"expected a JSON object, got {type(record).__name__}"
                raise _RowError("wrong_type", "<row>", problem)
            messages = _messages(_pop(record, cfg.prompt_key), cfg.prompt_key)
            mode = _mode(_pop(record, cfg.mode_key), cfg.mode_key)
            tools = _tools(_pop(record, cfg.tools_key), cfg.tools_key)
            label = _label(_pop(record, cfg.label_key))
        except _RowError as e:
            bad.append(_Bad(row, e.reason, e.field, e.problem))
            continue
        if cfg.system_prompt and not any(m["role"] == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": cfg.system_prompt})
        parsed.append((row, messages, mode, label, tools, record))

    if cfg.mode_mix is not None and any(p[2] is None for p in parsed):
        # Value r of one stream seeded by (seed, _MODE_STREAM) decides row r: stable across
        # epochs, restarts and edits elsewhere in the file, and drawn in one call.
        rng = np.random.default_rng((seed64(seed), _MODE_STREAM))
        draws = rng.random(max(p[0] for p in parsed) + 1)
    texts: list[str] = []
    rendered = []
    for row, messages, mode, label, tools, metadata in parsed:
        if mode is None:
            mode = (
                cfg.default_mode if cfg.mode_mix is None else MODES[int(draws[row] >= cfg.mode_mix)]
            )
        try:
            text = tokenizer.apply_chat_template(
                messages,
                tools=list(tools) if tools else None,
                tokenize=False,
                add_generation_prompt=True,
                enable_thinking=mode == "think",
            )
        except Exception as e:  # a template may raise on any row it dislikes; that row is bad
            problem = f"the chat template failed: {type(e).__name__}: {e}"
            bad.append(_Bad(row, "render_error", cfg.prompt_key, problem))
            continue
        texts.append(text)
        rendered.append((row, messages, mode, label, tools, metadata))
    ids_list = []
    if texts:  # one batched call: the tokeniser is most of the load time
        ids_list = tokenizer(texts, add_special_tokens=False, return_attention_mask=False)[
            "input_ids"
        ]

    prompts = []
    for text, ids, (row, messages, mode, label, tools, metadata) in zip(texts, ids_list, rendered):
        if max_prompt_tokens and len(ids) > max_prompt_tokens:
            problem = f"{len(ids)} prompt tokens > max_prompt_tokens={max_prompt_tokens}"
            bad.append(_Bad(row, "too_long", cfg.prompt_key, problem))
            continue
        source = metadata.get("data_source")
        prompts.append(
            Prompt(
                row=row,
                uid=f"{name}-{row}",
                prompt_ids=tuple(ids),
                text=text,
                messages=tuple(messages),
                label=label,
                mode=mode,
                tools=tools,
                metadata=metadata,
                data_source=None if source is None else str(source),
            )
        )
    return prompts


def _finish(
    prompts: list[Prompt],
    bad: list[_Bad],
    path: Path,
    name: str,
    num_rows: int,
    on_error: str,
    records: list[Any],
    suffix: str,
) -> PromptDataset:
    where = "line" if suffix != ".parquet" else "row"
    bad.sort(key=lambda b: b.row)
    skipped: dict[str, int] = {}
    skipped_rows: dict[str, list[int]] = {}
    for b in bad:
        skipped[b.reason] = skipped.get(b.reason, 0) + 1
        if len(skipped_rows.setdefault(b.reason, [])) < REPORTED_ROWS:
            skipped_rows[b.reason].append(b.row)
    summary = "; ".join(
        f"{reason}: {n} ({where} {', '.join(map(str, skipped_rows[reason]))}"
        f"{', ...' if n > REPORTED_ROWS else ''})"
        for reason, n in sorted(skipped.items())
    )
    if bad and on_error == "raise":
        first = bad[0]
        more = f" ({len(bad) - 1} more bad rows: {summary})" if len(bad) > 1 else ""
        raise DataError(
            f"dataset file {path}, {where} {first.row}, field {first.field!r}: {first.problem} "
            f"[{first.reason}]{more}; fix the data or set data.on_error=skip",
            path=str(path),
            row=first.row,
            field=first.field,
            reason=first.reason,
        )
    if not prompts:
        hint = ""
        if skipped.get("missing_prompt") == num_rows:
            keys = sorted({k for r in records[:100] if isinstance(r, dict) for k in r})
            hint = f"; no row has the prompt field (data.prompt_key); fields present: {', '.join(keys)}"
        elif suffix != ".parquet":
            with path.open("rb") as f:
                if f.read(256).lstrip().startswith(b"["):
                    hint = "; the file looks like one JSON array: write one JSON object per line (JSONL)"
        raise DataError(f"dataset file {path} has no usable row: {summary}{hint}", path=str(path))
    if bad:
        logger.warning(
            "dataset %r (%s): skipped %d of %d rows (data.on_error=skip): %s",
            name,
            path,
            len(bad),
            num_rows,
            summary,
        )
    return PromptDataset(
        prompts, name=name, path=path, num_rows=num_rows, skipped=skipped, skipped_rows=skipped_rows
    )
