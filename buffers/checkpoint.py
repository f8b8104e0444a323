"""Checkpoint state of a ReplayBuffer: state_dict/load_state_dict, save/load, log recovery and compaction.

    ReplayBuffer ──state_dict()──► {groups: pa.Table, stats, version, seen_ids} ──save(folder)──► Arrow IPC + JSON
    folder ──load()──► load_state_dict() ──► [spill_dir? rewrite log first] ─► held groups, counters
    spill_dir log ──SpillLog.recover()──► _restore() ─► held groups, counters ─► compacted log

``BufferCheckpoint`` is a mixin: it works on the state ``ReplayBuffer`` owns (lock, held
groups, counters, log) and is never used on its own.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pyarrow as pa
from slime_rl.buffers.groups import Group, group_spans, normalize_batch
from slime_rl.buffers.schema import READABLE_SCHEMA_VERSIONS, SAMPLE_SCHEMA, SCHEMA_VERSION
from slime_rl.buffers.stats import BufferStats
from slime_rl.buffers.wal import SpillLog, group_record, read_group_record

logger = logging.getLogger(__name__)

_STATE_FILE = "buffer_state.json"
_GROUPS_FILE = "buffer_groups.arrow"


class BufferCheckpoint:
    """Checkpoint/restore methods of ``ReplayBuffer`` (which defines every attribute below)."""

    _lock: threading.Lock
    _ready: threading.Condition
    _groups: OrderedDict[str, Group]
    _seen: set[str]
    _floor: int
    _stats: BufferStats
    _version: int
    _bytes: int
    _log: SpillLog | None

    def _add(self, data: pa.RecordBatch, min_version: int | None = None, nbytes: int | None = None) -> None:
        raise NotImplementedError  # ReplayBuffer's

    def _restore(self, rec: Any) -> None:
        assert self._log is not None
        if rec is None:
            self._log.compact([], self._meta())
            return
        self._stats = BufferStats.from_dict(rec.meta.get("stats", {}))
        self._version = int(rec.meta.get("version", 0))
        for b in rec.new_puts:
            self._stats.on_put(1, b.num_rows)
        for r in rec.consumed:
            self._stats.on_leave(r["outcome"], r["staleness"], r["num_samples"], r.get("max_staleness"))
            self._version = max(self._version, r["version"])
        self._seen = set(rec.seen_ids)
        for b in rec.live:
            self._add(b)
        self._log.compact(list(b.data for b in self._groups.values()), self._meta())
        self._stats.compactions += 1
        logger.info("buffer recovered %d groups from %s (torn tail: %s)", len(self._groups), self._log.dir, rec.torn)

    def _meta(self) -> dict[str, Any]:
        return {"stats": self._stats.to_dict(), "version": self._version, "seen_ids": list(self._seen)}

    def _maybe_compact(self) -> None:
        """Compact the log if due; a failure is logged, never raised: the consumption is already
        recorded in the current generation, which stays valid, so the caller's batch is delivered."""
        if self._log is not None and self._log.should_compact():
            try:
                self._log.compact([g.data for g in self._groups.values()], self._meta())
                self._stats.compactions += 1
            except Exception:
                self._stats.compaction_errors += 1
                logger.exception("buffer log compaction failed; the current generation stays in use (nothing lost), retrying later")

    def state_dict(self) -> dict[str, Any]:
        """Held groups (``groups``: a pa.Table in FIFO order), counters and version, for checkpoints."""
        with self._lock:
            table = one_chunk([g.data for g in self._groups.values()])
            return {
                "schema_version": SCHEMA_VERSION,
                "groups": table,
                "stats": self._stats.to_dict(),
                "version": self._version,
                "seen_ids": list(self._seen),
            }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace the held groups and counters by a ``state_dict``; with a spill_dir the log is rewritten."""
        if state.get("schema_version") not in READABLE_SCHEMA_VERSIONS:  # older ones: normalize_batch conforms
            raise ValueError(
                f"buffer state has schema_version {state.get('schema_version')}, this code reads {list(READABLE_SCHEMA_VERSIONS)}"
            )
        batch = normalize_batch(state["groups"])
        spans = group_spans(batch)
        parts = [read_group_record(group_record(batch.slice(s, n))) for _, s, n in spans]
        stats = BufferStats.from_dict(state.get("stats", {}))
        version = int(state.get("version", 0))
        seen = set(state.get("seen_ids", ())) | {gid for gid, _, _ in spans}
        with self._lock:
            if self._log is not None:  # first: if rewriting the log fails, nothing changes
                self._log.compact(parts, {"stats": stats.to_dict(), "version": version, "seen_ids": list(seen)})
            self._groups.clear()
            self._bytes = 0
            self._floor = 2**62
            self._stats, self._version, self._seen = stats, version, seen
            for p in parts:
                self._add(p)
            self._ready.notify_all()

    def save(self, folder: str | Path) -> Path:
        """Write ``state_dict`` to ``folder`` (Arrow IPC file + JSON) for a run checkpoint."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = self.state_dict()
        with pa.OSFile(str(folder / _GROUPS_FILE), "wb") as f, pa.ipc.new_file(f, SAMPLE_SCHEMA) as w:
            w.write_table(state.pop("groups"))
        (folder / _STATE_FILE).write_text(json.dumps(state))
        return folder

    def load(self, folder: str | Path) -> None:
        """Load what ``save`` wrote."""
        folder = Path(folder)
        state = json.loads((folder / _STATE_FILE).read_text())
        with pa.OSFile(str(folder / _GROUPS_FILE), "rb") as f:
            state["groups"] = pa.ipc.open_file(f).read_all()
        self.load_state_dict(state)


def one_chunk(batches: list[pa.RecordBatch]) -> pa.Table:
    """The batches as one compact chunk: through Ray a table of 16 chunks costs ~10x more to
    (de)serialise than this copy, and a slice of a multi-group put would pickle its put-mates too."""
    if len(batches) == 1:
        return pa.Table.from_batches([read_group_record(group_record(batches[0]))])
    return pa.Table.from_batches(batches, schema=SAMPLE_SCHEMA).combine_chunks()
