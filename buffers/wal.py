"""Write-ahead log of the replay buffer in ``spill_dir``: nothing accepted is lost.

    put      ─► log-G.arrow       one Arrow IPC record per group, written before put returns
    get/drop ─► consumed-G.arrow  one record per call: group ids, outcome, trainer version, staleness
    compact  ─► meta-(G+1).json ─► log-(G+1).arrow (live groups, tmp + rename = commit point)
                ─► move G's log + consumption records to history/ (for export), or delete them
    recover  ─► newest committed generation G; live = groups of log-G − consumed-G

A record torn by a crash (only the last one of a file can be) is ignored: a torn group
record means its ``put`` never returned, a torn consumption record means that ``get_batch``
never returned, so the group is still live. Recovery then compacts at once, so appends
never follow torn bytes. ``LOCK`` (flock) keeps a second buffer from writing the same log
while a killed owner's process is still going away.

Files of generation G (8-digit number): ``meta-G.json`` (stats and version at the start of
G, and ``carried_groups``: how many leading records of log-G were live groups copied from
G-1), ``log-G.arrow`` (SAMPLE_SCHEMA stream), ``consumed-G.arrow`` (CONSUMED_SCHEMA stream).
Retired generations sit in ``history/`` unchanged; ``iter_history`` emits each group from
the generation that consumed it, so every sample comes out once.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from slime_rl.buffers.schema import SAMPLE_SCHEMA, SCHEMA_VERSION

logger = logging.getLogger(__name__)

CONSUMED_SCHEMA = pa.schema(
    [
        pa.field("group_id", pa.string(), nullable=False),
        pa.field("outcome", pa.string(), nullable=False),
        pa.field("version", pa.int64(), nullable=False),
        pa.field("staleness", pa.int64(), nullable=False),
        pa.field("num_samples", pa.int64(), nullable=False),
    ]
)
"""One row per group leaving the buffer; ``outcome`` is ``consumed`` or ``dropped_stale``."""

HISTORY_SCHEMA = SAMPLE_SCHEMA.append(pa.field("buffer_outcome", pa.string(), nullable=False)).append(
    pa.field("buffer_version", pa.int64(), nullable=True)
)
"""Rows of ``export``: the sample, how it left the buffer (``consumed`` | ``dropped_stale`` |
``buffered`` = still held) and the trainer version at that moment (null while buffered)."""

_READ_ERRORS = (pa.ArrowInvalid, pa.ArrowException, OSError, ValueError)


@dataclasses.dataclass
class Recovered:
    """What a committed generation holds, for the buffer to rebuild itself from."""

    live: list[pa.RecordBatch]
    """Accepted, unconsumed groups in arrival order (compact copies)."""
    new_puts: list[pa.RecordBatch]
    """Groups put during the generation (for counters); carried-over groups excluded."""
    consumed: list[dict[str, Any]]
    """Consumption records of the generation (CONSUMED_SCHEMA rows)."""
    seen_ids: set[str]
    meta: dict[str, Any]
    torn: bool


def group_record(batch: pa.RecordBatch) -> pa.Buffer:
    """One group as an IPC message; serialising a slice writes only the slice's rows."""
    return batch.serialize()


def read_group_record(buf: pa.Buffer) -> pa.RecordBatch:
    return pa.ipc.read_record_batch(buf, SAMPLE_SCHEMA)


class SpillLog:
    """Append-only Arrow IPC log of one buffer, with compaction and crash recovery."""

    def __init__(self, spill_dir: str | Path, *, fsync: bool, keep_history: bool, compact_min_bytes: int, lock_timeout_s: float = 30.0) -> None:
        self.dir = Path(spill_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._fsync = fsync
        self._keep_history = keep_history
        self._compact_min_bytes = compact_min_bytes
        self._gen: int | None = None
        self._log_fd: int | None = None
        self._consumed_fd: int | None = None
        self._log_bytes = 0
        self._consumed_bytes = 0
        self._gen_groups = 0
        self._gen_outcomes: dict[str, tuple[str, int]] = {}
        self._lock_fd = self._acquire_lock(lock_timeout_s)

    # ---- ownership -------------------------------------------------------------------
    def _acquire_lock(self, timeout_s: float) -> int:
        fd = os.open(self.dir / "LOCK", os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    owner = os.pread(fd, 64, 0).decode(errors="replace").strip()
                    os.close(fd)
                    raise RuntimeError(
                        f"spill_dir {self.dir} is in use by another buffer (pid {owner or '?'}) for over {timeout_s:.0f}s; "
                        "stop that buffer first or use another buffer.spill_dir"
                    ) from None
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        return fd

    def has_log(self) -> bool:
        return bool(self._generations())

    @property
    def log_bytes(self) -> int:
        return self._log_bytes + self._consumed_bytes

    @property
    def generation(self) -> int | None:
        return self._gen

    def _generations(self) -> list[int]:
        return sorted(int(p.name[4:12]) for p in self.dir.glob("log-*.arrow") if p.name[4:12].isdigit())

    def _path(self, kind: str, gen: int) -> Path:
        ext = "json" if kind == "meta" else "arrow"
        return self.dir / f"{kind}-{gen:08d}.{ext}"

    # ---- appends ---------------------------------------------------------------------
    def append_groups(self, records: list[pa.Buffer]) -> None:
        """Append one IPC record per group; on error the file is cut back and nothing is kept."""
        self._log_bytes = self._append(self._log_fd, self._log_bytes, records)
        self._gen_groups += len(records)

    def append_consumed(self, rows: list[dict[str, Any]]) -> None:
        """Record groups leaving the buffer (CONSUMED_SCHEMA rows) as one record: all or none survive a crash."""
        records = [pa.RecordBatch.from_pylist(rows, schema=CONSUMED_SCHEMA).serialize()]
        self._consumed_bytes = self._append(self._consumed_fd, self._consumed_bytes, records)
        for r in rows:
            self._gen_outcomes[r["group_id"]] = (r["outcome"], r["version"])

    def _append(self, fd: int | None, size: int, records: list[pa.Buffer]) -> int:
        assert fd is not None, "spill log is closed"
        try:
            for rec in records:
                view = memoryview(rec)
                while view:
                    view = view[os.write(fd, view) :]
            if self._fsync:
                os.fsync(fd)
        except BaseException:
            os.ftruncate(fd, size)
            raise
        return size + sum(r.size for r in records)

    # ---- compaction ------------------------------------------------------------------
    def should_compact(self) -> bool:
        consumed = len(self._gen_outcomes)
        return self.log_bytes >= self._compact_min_bytes and consumed > 0 and 2 * consumed >= self._gen_groups

    def compact(self, live: list[pa.RecordBatch], meta: dict[str, Any]) -> None:
        """Start a new generation holding ``live`` (compact group batches), archive the old one."""
        old = self._gen
        new = 0 if old is None else old + 1
        meta = {**meta, "generation": new, "schema_version": SCHEMA_VERSION, "carried_groups": len(live)}
        _write_atomic(self._path("meta", new), [json.dumps(meta).encode()])
        log_records = [SAMPLE_SCHEMA.serialize()] + [group_record(b) for b in live]
        _write_atomic(self._path("log", new), log_records)  # the commit point of the new generation
        _write_atomic(self._path("consumed", new), [CONSUMED_SCHEMA.serialize()])
        _fsync_dir(self.dir)
        self._close_fds()
        self._log_fd = os.open(self._path("log", new), os.O_WRONLY | os.O_APPEND)
        self._consumed_fd = os.open(self._path("consumed", new), os.O_WRONLY | os.O_APPEND)
        self._log_bytes = sum(r.size for r in log_records)
        self._consumed_bytes = CONSUMED_SCHEMA.serialize().size
        self._gen, self._gen_groups, self._gen_outcomes = new, len(live), {}
        for gen in self._generations():
            if gen < new:
                self._retire(gen)
        logger.debug("buffer log compacted into generation %d (%d live groups)", new, len(live))

    def _retire(self, gen: int) -> None:
        """Move generation ``gen``'s log to ``history/`` (if kept; a rename, no copy) or delete it."""
        history = self.dir / "history"
        if self._keep_history:
            history.mkdir(exist_ok=True)
        for kind in ("consumed", "log"):  # log last: it marks the generation as present
            path = self._path(kind, gen)
            if self._keep_history and path.exists():
                os.replace(path, history / path.name)
            else:
                path.unlink(missing_ok=True)
        self._path("meta", gen).unlink(missing_ok=True)

    # ---- recovery --------------------------------------------------------------------
    def recover(self) -> Recovered | None:
        """Read the newest committed generation; None when the folder holds no log."""
        for tmp in self.dir.glob("*.tmp"):
            tmp.unlink()
        gens = self._generations()
        if not gens:
            return None
        gen = gens[-1]
        meta_path = self._path("meta", gen)
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        if meta.get("schema_version", SCHEMA_VERSION) != SCHEMA_VERSION:
            raise ValueError(
                f"spill_dir {self.dir} holds a log of sample schema v{meta['schema_version']}, this code writes "
                f"v{SCHEMA_VERSION}; export it with the old version or use an empty buffer.spill_dir"
            )
        batches, torn_log = _read_stream(self._path("log", gen))
        consumed, torn_consumed = self._read_consumed(gen)
        if torn_log or torn_consumed:
            logger.warning("buffer log generation %d in %s ends with a torn record (crash mid-write); ignoring it", gen, self.dir)
        gone = {r["group_id"] for r in consumed}
        live = [read_group_record(b.serialize()) for b in batches if b.column("group_id")[0].as_py() not in gone]
        self._gen = gen
        carried = int(meta.get("carried_groups", 0))
        return Recovered(
            live=live,
            new_puts=batches[carried:],
            consumed=consumed,
            seen_ids={b.column("group_id")[0].as_py() for b in batches},
            meta=meta,
            torn=torn_log or torn_consumed,
        )

    def _read_consumed(self, gen: int) -> tuple[list[dict[str, Any]], bool]:
        batches, torn = _read_stream(self._path("consumed", gen))
        return [row for b in batches for row in b.to_pylist()], torn

    # ---- export ----------------------------------------------------------------------
    def iter_history(self) -> Iterator[pa.RecordBatch]:
        """Every sample the log has seen, once, as HISTORY_SCHEMA batches.

        A group is emitted from the generation that consumed (or dropped) it; carried-over
        copies in later generations are skipped; still-held groups come from the live log.
        """
        history = self.dir / "history"
        for log in sorted(history.glob("log-*.arrow")):
            consumed, _ = _read_stream(history / log.name.replace("log-", "consumed-"))
            outcomes = {r["group_id"]: (r["outcome"], r["version"]) for b in consumed for r in b.to_pylist()}
            for b in _read_stream(log)[0]:
                gid = b.column("group_id")[0].as_py()
                if gid in outcomes:
                    yield with_outcome(b, *outcomes[gid])
        if self._gen is None:
            return
        for b in _read_stream(self._path("log", self._gen))[0]:
            outcome, version = self._gen_outcomes.get(b.column("group_id")[0].as_py(), ("buffered", None))
            yield with_outcome(b, outcome, version)

    # ---- shutdown --------------------------------------------------------------------
    def _close_fds(self) -> None:
        for fd in (self._log_fd, self._consumed_fd):
            if fd is not None:
                os.close(fd)
        self._log_fd = self._consumed_fd = None

    def close(self) -> None:
        self._close_fds()
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None


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


def _read_stream(path: Path) -> tuple[list[pa.RecordBatch], bool]:
    """All complete records of an IPC stream file, and whether a torn record followed them."""
    try:
        data = pa.py_buffer(path.read_bytes())
    except FileNotFoundError:
        return [], False
    try:
        reader = pa.ipc.open_stream(data)
    except _READ_ERRORS:
        return [], data.size > 0
    out: list[pa.RecordBatch] = []
    while True:
        try:
            out.append(reader.read_next_batch())
        except StopIteration:
            return out, False
        except _READ_ERRORS:
            return out, True


def _write_atomic(path: Path, chunks: list[pa.Buffer | bytes]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for chunk in chunks:
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
