"""Write-ahead log of the replay buffer in ``spill_dir``: nothing accepted is lost.

    put      ─► log-G.arrow       one Arrow IPC record per group, written before put returns
    get/drop ─► consumed-G.arrow  one record per call: group ids, outcome, trainer version, staleness
    compact  ─► consumed-(G+1), meta-(G+1).json (counters, seen ids) ─► log-(G+1).arrow (live
                groups; tmp + rename = the commit point, last) ─► move G to history/ (capped), or delete
    recover  ─► newest committed generation G; live = groups of log-G − consumed-G

A record torn by a crash (only the last one of a file can be) is ignored: a torn group
record means its ``put`` never returned, a torn consumption record means that ``get_batch``
never returned, so the group is still live. Recovery then compacts at once, so appends
never follow torn bytes. ``LOCK`` (flock) keeps a second buffer from writing the same log
while a killed owner's process is still going away.

Files of generation G (8-digit number): ``meta-G.json`` (stats and version at the start of
G, and ``carried_groups``: how many leading records of log-G were live groups copied from
G-1), ``log-G.arrow`` (SAMPLE_SCHEMA stream), ``consumed-G.arrow`` (CONSUMED_SCHEMA stream).
Retired generations sit in ``history/`` unchanged (the oldest deleted beyond
``history_max_mb``); ``history.iter_history`` reads them for ``export``. ``meta-G.json`` also lists every group id accepted
before G (``seen_ids``), so duplicate protection survives compaction and recovery.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa
from slime_rl.buffers.schema import SAMPLE_SCHEMA, SCHEMA_VERSION

logger = logging.getLogger(__name__)

CONSUMED_SCHEMA = pa.schema(
    [
        pa.field("group_id", pa.string(), nullable=False),
        pa.field("outcome", pa.string(), nullable=False),
        pa.field("version", pa.int64(), nullable=False),
        pa.field("staleness", pa.int64(), nullable=False),
        pa.field("num_samples", pa.int64(), nullable=False),
        pa.field("max_staleness", pa.int64(), nullable=True),
    ]
)
"""One row per group leaving the buffer; ``outcome`` is ``consumed`` or ``dropped_stale``;
``max_staleness`` is the bound of that call (so ``served_stale`` survives recovery)."""

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
    """Every group id ever accepted: ``meta['seen_ids']`` (written at compaction) + ids in log-G."""
    meta: dict[str, Any]
    torn: bool


def group_record(batch: pa.RecordBatch) -> pa.Buffer:
    """One group as an IPC message; serialising a slice writes only the slice's rows."""
    return batch.serialize()


def read_group_record(buf: pa.Buffer) -> pa.RecordBatch:
    return pa.ipc.read_record_batch(buf, SAMPLE_SCHEMA)


class SpillLog:
    """Append-only Arrow IPC log of one buffer, with compaction and crash recovery."""

    def __init__(
        self,
        spill_dir: str | Path,
        *,
        fsync: bool,
        keep_history: bool,
        compact_min_bytes: int,
        history_max_bytes: int = 2**62,
        lock_timeout_s: float = 30.0,
    ) -> None:
        self.dir = Path(spill_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._fsync = fsync
        self._keep_history = keep_history
        self._compact_min_bytes = compact_min_bytes
        self._history_max_bytes = history_max_bytes
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
            _write_all(fd, records)
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
        """Start a new generation holding ``live`` (compact group batches), archive the old one.

        Order: consumed-(G+1) and meta-(G+1) first, then log-(G+1) is written as a tmp file
        and renamed -- that rename is the commit point and the last step that can lose data.
        An error before it leaves generation G current (the error is raised, nothing is
        lost); errors after it (dir fsync, retiring G) are only logged.
        """
        old = self._gen
        new = 0 if old is None else old + 1
        meta = {**meta, "generation": new, "schema_version": SCHEMA_VERSION, "carried_groups": len(live)}
        log_records = [SAMPLE_SCHEMA.serialize()] + [group_record(b) for b in live]
        log_path, log_tmp = self._path("log", new), self._path("log", new).with_name(self._path("log", new).name + ".tmp")
        log_fd = consumed_fd = None
        try:
            _write_atomic(self._path("consumed", new), [CONSUMED_SCHEMA.serialize()])
            _write_atomic(self._path("meta", new), [json.dumps(meta).encode()])
            consumed_fd = os.open(self._path("consumed", new), os.O_WRONLY | os.O_APPEND)
            log_fd = os.open(log_tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
            _write_all(log_fd, log_records)
            os.fsync(log_fd)
            os.replace(log_tmp, log_path)  # the commit point of the new generation; the fd follows the file
        except BaseException:
            for fd in (log_fd, consumed_fd):
                if fd is not None:
                    os.close(fd)
            log_tmp.unlink(missing_ok=True)
            raise
        old_fds = (self._log_fd, self._consumed_fd)
        self._log_fd, self._consumed_fd = log_fd, consumed_fd
        self._log_bytes = sum(r.size for r in log_records)
        self._consumed_bytes = CONSUMED_SCHEMA.serialize().size
        self._gen, self._gen_groups, self._gen_outcomes = new, len(live), {}
        try:
            for fd in old_fds:
                if fd is not None:
                    os.close(fd)
            _fsync_dir(self.dir)
            for gen in self._generations():
                if gen < new:
                    self._retire(gen)
            self._cap_history()
        except Exception:  # committed already: the new generation is complete and current
            logger.exception("buffer log: cleanup after compacting into generation %d failed (nothing lost)", new)
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

    def _cap_history(self) -> None:
        """Delete the oldest retired generations while ``history/`` exceeds ``history_max_bytes``."""
        history = self.dir / "history"
        if not history.is_dir():
            return
        logs = sorted(history.glob("log-*.arrow"))
        sizes = [p.stat().st_size + _size(history / p.name.replace("log-", "consumed-")) for p in logs]
        total = sum(sizes)
        for log, size in zip(logs, sizes):
            if total <= self._history_max_bytes:
                break
            log.unlink()  # log first: a consumed file without its log is ignored
            (history / log.name.replace("log-", "consumed-")).unlink(missing_ok=True)
            total -= size
            logger.info("buffer history over buffer.history_max_mb: deleted %s", log.name)

    def history_bytes(self) -> int:
        history = self.dir / "history"
        return sum(p.stat().st_size for p in history.glob("*.arrow")) if history.is_dir() else 0

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
            seen_ids=set(meta.get("seen_ids", ())) | {b.column("group_id")[0].as_py() for b in batches},
            meta=meta,
            torn=torn_log or torn_consumed,
        )

    def _read_consumed(self, gen: int) -> tuple[list[dict[str, Any]], bool]:
        batches, torn = _read_stream(self._path("consumed", gen))
        return [row for b in batches for row in b.to_pylist()], torn

    # ---- export ----------------------------------------------------------------------
    def snapshot_history(self) -> HistorySnapshot:
        """Open handles on every history file and the live log, for ``iter_history`` to read later.

        Cheap (no reads), so the buffer lock is held only for this; open handles keep the
        data readable while compaction renames or the history cap deletes the files.
        """
        history = self.dir / "history"
        gens: list[tuple[BinaryIO, BinaryIO | None]] = []
        for log in sorted(history.glob("log-*.arrow")) if history.is_dir() else []:
            try:
                log_f = open(log, "rb")  # noqa: SIM115 -- closed by iter_history
            except FileNotFoundError:
                continue
            try:
                consumed_f: BinaryIO | None = open(history / log.name.replace("log-", "consumed-"), "rb")  # noqa: SIM115
            except FileNotFoundError:
                consumed_f = None
            gens.append((log_f, consumed_f))
        live = None
        if self._gen is not None:
            live = (open(self._path("log", self._gen), "rb"), self._log_bytes, dict(self._gen_outcomes))  # noqa: SIM115
        return HistorySnapshot(gens, live)

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


@dataclasses.dataclass
class HistorySnapshot:
    """Open files of the retired generations and of the live log (with its size and outcomes then)."""

    retired: list[tuple[BinaryIO, BinaryIO | None]]
    live: tuple[BinaryIO, int, dict[str, tuple[str, int]]] | None


def _read_stream(path: Path) -> tuple[list[pa.RecordBatch], bool]:
    """All complete records of an IPC stream file, and whether a torn record followed them."""
    try:
        data = pa.py_buffer(path.read_bytes())
    except FileNotFoundError:
        return [], False
    return read_batches(data)


def read_batches(data: pa.Buffer) -> tuple[list[pa.RecordBatch], bool]:
    """All complete records of an IPC stream in ``data``, and whether a torn record followed them."""
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
        _write_all(fd, chunks)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _write_all(fd: int, chunks: list[pa.Buffer | bytes]) -> None:
    for chunk in chunks:
        view = memoryview(chunk)
        while view:
            view = view[os.write(fd, view) :]


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
