"""The replay buffer between the rollout manager (writer) and trainer workers (readers).

    rollout manager ──put(RecordBatch of whole groups)──► validate ─► [full? block/reject]
                                                         ─► write-ahead log (spill_dir) ─► held groups
    trainer ──get_batch(n, version, max_staleness)──► drop stale (counted) ─► pick n (fifo|freshest)
                                                         ─► consumption record ─► pa.Table

Thread-safe: one lock, two conditions (room for writers, groups for readers). Data stays
Arrow end to end; a group is a compact RecordBatch that is never split. ``close()`` wakes
every blocked caller with ``BufferClosedError``.

Staleness of a group is ``trainer_version - min(policy_version of its samples)``: the
version a sample started with is no newer than any of its tokens, so this is the
conservative bound. The exact per-token versions stay in the ``token_versions`` column
(``groups.token_staleness``) for off-policy correction.

Checkpoint state (``state_dict``/``load_state_dict``/``save``/``load``), log recovery and
compaction live in ``checkpoint.BufferCheckpoint``, which ``ReplayBuffer`` inherits.

>>> from slime_rl.buffers import BufferConfig, ReplayBuffer, Sample, samples_to_batch
>>> buf = ReplayBuffer(BufferConfig(capacity_groups=8, max_staleness=1))
>>> group = [Sample(sample_id=f"g0-{i}", group_id="g0", prompt_ids=[1], response_ids=[2, 3]) for i in range(2)]
>>> buf.put(samples_to_batch(group))
1
>>> buf.get_batch(1, trainer_version=0, timeout=1.0).num_rows
2
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from slime_rl.buffers.checkpoint import BufferCheckpoint, one_chunk
from slime_rl.buffers.config import BufferConfig
from slime_rl.buffers.errors import BufferClosedError, BufferFullError, BufferTimeoutError
from slime_rl.buffers.groups import Group, group_spans, min_versions, normalize_batch
from slime_rl.buffers.history import iter_history, with_outcome, write_parquet
from slime_rl.buffers.stats import BufferCounts, BufferStats
from slime_rl.buffers.wal import SpillLog, group_record, read_group_record

logger = logging.getLogger(__name__)


class ReplayBuffer(BufferCheckpoint):
    """Arrow-backed, staleness-aware group buffer with backpressure and an optional write-ahead log.

    Args:
        config: the ``buffer`` config section.
        group_size: if set, every group must have exactly this many samples.
        recover: with ``config.spill_dir`` holding a log, continue from it (see ``recover``);
            without it such a folder is refused so runs never mix by accident.
        lock_timeout_s: how long to wait for a previous owner of ``spill_dir`` to exit.
    """

    def __init__(self, config: BufferConfig | None = None, *, group_size: int | None = None, recover: bool = False, lock_timeout_s: float = 30.0) -> None:
        self.config = config or BufferConfig()
        if group_size is not None and group_size < 1:
            raise ValueError(f"group_size must be >= 1 (samples per group), got {group_size}")
        self.group_size = group_size
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)
        self._ready = threading.Condition(self._lock)
        self._groups: OrderedDict[str, Group] = OrderedDict()
        self._seen: set[str] = set()
        self._history: deque[tuple[pa.RecordBatch, str, int, int]] = deque()  # memory-only mode: (data, outcome, version, nbytes)
        self._history_bytes = 0
        self._floor = 2**62  # no held group has a min_version below this
        self._stats = BufferStats()
        self._version = 0
        self._seq = 0
        self._bytes = 0
        self._closed = False
        self._log: SpillLog | None = None
        if self.config.spill_dir is not None:
            self._log = SpillLog(
                self.config.spill_dir,
                fsync=self.config.fsync,
                keep_history=self.config.keep_history,
                compact_min_bytes=int(self.config.compact_min_mb * 2**20),
                history_max_bytes=int(self.config.history_max_mb * 2**20),
                lock_timeout_s=lock_timeout_s,
            )
            if self._log.has_log() and not recover:
                self._log.close()
                raise ValueError(
                    f"buffer.spill_dir {self.config.spill_dir} already holds a buffer log; pass recover=True "
                    "(ReplayBuffer.recover) to continue it, or choose an empty folder"
                )
            try:
                self._restore(self._log.recover())
            except BaseException:
                self._log.close()  # release the folder's lock for whoever fixes and retries
                raise

    @classmethod
    def recover(cls, spill_dir: str | Path, config: BufferConfig | None = None, **kwargs: Any) -> ReplayBuffer:
        """Rebuild a buffer from ``spill_dir``: exactly the accepted, unconsumed groups, with counters."""
        config = dataclasses.replace(config or BufferConfig(), spill_dir=str(spill_dir))
        return cls(config, recover=True, **kwargs)

    # ---- writers -----------------------------------------------------------------------
    def put(self, data: pa.RecordBatch | pa.Table, timeout: float | None = None) -> int:
        """Add one or more whole groups; return how many groups were newly accepted.

        Idempotent per group: a group whose ``group_id`` this buffer (or the run it was
        recovered/loaded from) already accepted is skipped and counted in
        ``buffer/duplicate_groups``, so a writer may simply retry a put whose reply it lost
        (actor crash or restart) -- nothing is trained twice. A put of only such groups
        returns 0 at once, even when the buffer is full.

        Blocks while the buffer is full (``put_policy=block``, up to ``timeout`` or
        ``put_timeout_s``). With a spill_dir the groups are in the log before this returns.

        Raises:
            ValueError: bad data (column and row named); the buffer is unchanged.
            BufferFullError: no room (rejected, or still full after the timeout).
            BufferClosedError: the buffer is closed.
        """
        if self._closed:
            raise BufferClosedError("buffer closed; put refused")
        try:
            batch = normalize_batch(data)
            spans = group_spans(batch, self.group_size)
            if len(spans) > self.config.capacity_groups:
                raise ValueError(
                    f"put holds {len(spans)} groups but buffer.capacity_groups is {self.config.capacity_groups}; put fewer groups per call"
                )
        except ValueError:
            with self._lock:
                self._stats.rejected_invalid += 1
            raise
        if not spans:
            return 0
        versions = min_versions(batch, spans)
        parts = [batch.slice(start, n) for _, start, n in spans]
        records = None
        if self._log is not None:  # the log record is a compact copy: hold that instead of the slice
            records = [group_record(p) for p in parts]  # outside the lock: other callers go on meanwhile
        timeout = self.config.put_timeout_s if timeout is None else timeout
        deadline = time.monotonic() + timeout
        with self._lock:
            new = [i for i, (gid, _, _) in enumerate(spans) if gid not in self._seen]  # before waiting for room
            if new:
                t0 = time.monotonic()
                while not self._closed and len(self._groups) + len(new) > self.config.capacity_groups:
                    left = deadline - time.monotonic()
                    if self.config.put_policy == "reject" or left <= 0:
                        self._stats.rejected_full += 1
                        self._stats.put_wait_s += time.monotonic() - t0
                        how = "rejected (put_policy=reject)" if self.config.put_policy == "reject" else f"still full after {timeout:.1f}s"
                        raise BufferFullError(
                            f"buffer full: {len(self._groups)}/{self.config.capacity_groups} groups held, put of {len(new)} "
                            f"group(s) {how}; the trainer is not keeping up (or raise buffer.capacity_groups)"
                        )
                    self._room.wait(left)
                self._stats.put_wait_s += time.monotonic() - t0
                if self._closed:
                    raise BufferClosedError("buffer closed; put refused")
                new = [i for i in new if spans[i][0] not in self._seen]  # a concurrent put may have taken some
            if len(new) < len(spans):
                self._stats.duplicate_groups += len(spans) - len(new)
                logger.warning("buffer put: %d of %d group(s) were already accepted (a retried put?); skipped", len(spans) - len(new), len(spans))
            if not new:
                return 0
            per_row = batch.get_total_buffer_size() / batch.num_rows  # a slice's exact size is costly to compute
            if records is not None:
                self._log.append_groups([records[i] for i in new])
            for i in new:
                if records is not None:
                    self._add(read_group_record(records[i]), versions[i])
                else:
                    self._add(parts[i], versions[i], int(per_row * parts[i].num_rows))
            self._stats.on_put(len(new), sum(spans[i][2] for i in new))
            self._ready.notify_all()
        return len(new)

    def _add(self, data: pa.RecordBatch, min_version: int | None = None, nbytes: int | None = None) -> None:
        gid = data.column("group_id")[0].as_py()
        if min_version is None:
            min_version = pc.min(data.column("policy_version")).as_py()
        group = Group(gid, data, min_version, self._seq, data.get_total_buffer_size() if nbytes is None else nbytes)
        self._groups[gid] = group
        self._seq += 1
        self._seen.add(gid)
        self._bytes += group.nbytes
        self._floor = min(self._floor, min_version)

    # ---- readers -----------------------------------------------------------------------
    def get_batch(self, global_batch_groups: int, trainer_version: int, max_staleness: int | None = None, timeout: float | None = None) -> pa.Table:
        """Take ``global_batch_groups`` whole groups within ``max_staleness`` of ``trainer_version``.

        Waits up to ``timeout`` (default ``get_timeout_s``) for enough eligible groups.
        ``stale_policy=drop`` removes groups beyond the bound (counted as ``dropped_stale``);
        ``keep`` serves them too (counted as ``served_stale``) for off-policy correction.

        Returns:
            A ``pa.Table`` of SAMPLE_SCHEMA, each group's rows contiguous, groups in
            ``order`` (oldest: lowest ``policy_version`` first, then arrival; fifo: arrival;
            freshest: newest ``policy_version`` first).

        Raises:
            BufferTimeoutError: not enough eligible groups within the timeout (never polls forever).
            BufferClosedError: the buffer was closed.
            ValueError: ``global_batch_groups`` outside 1..capacity_groups.
        """
        if not 1 <= global_batch_groups <= self.config.capacity_groups:
            raise ValueError(f"global_batch_groups={global_batch_groups} must be in 1..buffer.capacity_groups ({self.config.capacity_groups}); the buffer could never hold that many")
        bound = self.config.max_staleness if max_staleness is None else max_staleness
        if bound < 0:
            raise ValueError(f"max_staleness={bound} must be >= 0 (0 = only groups of the current version)")
        timeout = self.config.get_timeout_s if timeout is None else timeout
        deadline = time.monotonic() + timeout
        with self._lock:
            t0 = time.monotonic()
            self._version = max(self._version, trainer_version)
            while True:
                if self._closed:
                    raise BufferClosedError("buffer closed; get_batch gave up")
                if self.config.stale_policy == "drop":
                    self._drop_stale(trainer_version, bound)
                if len(self._groups) >= global_batch_groups:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    self._stats.get_timeouts += 1
                    self._stats.get_wait_s += time.monotonic() - t0
                    raise BufferTimeoutError(
                        f"get_batch waited {timeout:.1f}s for {global_batch_groups} groups within staleness {bound} of version "
                        f"{trainer_version}: {len(self._groups)} eligible, {self._stats.dropped_stale} dropped as stale so far; "
                        "check that the rollout manager is alive and producing"
                    )
                self._ready.wait(left)
            self._stats.get_wait_s += time.monotonic() - t0
            chosen = self._select(global_batch_groups)
            self._leave(chosen, "consumed", trainer_version, bound)
            table = one_chunk([g.data for g in chosen])
            self._batch_stats(chosen, table, trainer_version)
            self._maybe_compact()
            self._room.notify_all()
        return table

    def _select(self, n: int) -> list[Group]:
        groups = list(self._groups.values())
        if self.config.order == "freshest":
            groups.sort(key=lambda g: (-g.min_version, g.seq))
        elif self.config.order == "oldest":
            groups.sort(key=lambda g: (g.min_version, g.seq))
        return groups[:n]

    def _drop_stale(self, trainer_version: int, bound: int) -> None:
        if trainer_version - self._floor <= bound:
            return  # nothing held can be too stale: skip the scan
        stale = [g for g in self._groups.values() if g.staleness(trainer_version) > bound]
        self._floor = min((g.min_version for g in self._groups.values() if g.staleness(trainer_version) <= bound), default=2**62)
        if stale:
            self._leave(stale, "dropped_stale", trainer_version, bound)
            self._maybe_compact()
            self._room.notify_all()
            logger.debug("buffer dropped %d groups staler than %d at version %d", len(stale), bound, trainer_version)

    def _leave(self, groups: list[Group], outcome: str, version: int, bound: int) -> None:
        rows = [
            {
                "group_id": g.group_id,
                "outcome": outcome,
                "version": version,
                "staleness": g.staleness(version),
                "num_samples": g.num_samples,
                "max_staleness": bound,
            }
            for g in groups
        ]
        if self._log is not None:
            self._log.append_consumed(rows)  # first: if it fails, the groups stay
        for g, r in zip(groups, rows):
            del self._groups[g.group_id]
            self._bytes -= g.nbytes
            self._stats.on_leave(outcome, r["staleness"], g.num_samples, bound)
            if self._log is None and self.config.keep_history:
                self._remember(g, outcome, version)

    def _remember(self, g: Group, outcome: str, version: int) -> None:
        """Memory-only history for ``export``, the oldest forgotten beyond ``history_max_mb``."""
        self._history.append((g.data, outcome, version, g.nbytes))
        self._history_bytes += g.nbytes
        while self._history and self._history_bytes > self.config.history_max_mb * 2**20:
            self._history_bytes -= self._history.popleft()[3]

    def _batch_stats(self, chosen: list[Group], table: pa.Table, version: int) -> None:
        stale = [g.staleness(version) for g in chosen]
        self._stats.batch_staleness_mean = sum(stale) / len(stale)
        self._stats.batch_staleness_max = float(max(stale))
        flat = pc.list_flatten(table.column("token_versions"))
        if len(flat):
            self._stats.batch_token_staleness_mean = version - pc.mean(flat).as_py()
            self._stats.batch_token_staleness_max = float(version - pc.min(flat).as_py())

    def set_version(self, trainer_version: int, max_staleness: int | None = None) -> None:
        """Tell the buffer the trainer's version; with ``stale_policy=drop`` it frees stale groups now."""
        with self._lock:
            self._version = max(self._version, trainer_version)
            if self.config.stale_policy == "drop":
                self._drop_stale(trainer_version, self.config.max_staleness if max_staleness is None else max_staleness)

    # ---- export ------------------------------------------------------------------------
    def export(self, path: str | Path) -> int:
        """Write every sample seen (consumed, dropped and still held) to Parquet; return the row count.

        Columns: SAMPLE_SCHEMA plus ``buffer_outcome`` (consumed | dropped_stale | buffered)
        and ``buffer_version`` (trainer version when it left). Without ``keep_history`` only
        the held groups are written.
        """
        with self._lock:  # a snapshot only; the Parquet file is written without the lock
            if self._log is not None:
                batches: Iterable[pa.RecordBatch] = iter_history(self._log.snapshot_history())
            else:
                kept = [(data, outcome, version) for data, outcome, version, _ in self._history]
                batches = (with_outcome(*h) for h in [*kept, *((g.data, "buffered", None) for g in self._groups.values())])
        return write_parquet(path, batches)

    # ---- introspection and shutdown ------------------------------------------------------
    def counts(self) -> BufferCounts:
        with self._lock:
            s = self._stats
            return BufferCounts(s.groups_in, s.groups_out, s.dropped_stale, len(self._groups), self.config.capacity_groups, self._version)

    def stats(self) -> dict[str, float]:
        """Slash-namespaced metrics (``buffer/groups_in``, ``buffer/dropped_stale``, ``buffer/staleness_hist/0``...)."""
        with self._lock:
            out = self._stats.metrics()
            out["buffer/size_groups"] = float(len(self._groups))
            out["buffer/size_samples"] = float(sum(g.num_samples for g in self._groups.values()))
            out["buffer/bytes"] = float(self._bytes)
            out["buffer/capacity_groups"] = float(self.config.capacity_groups)
            out["buffer/version"] = float(self._version)
            if self._groups:
                stale = [g.staleness(self._version) for g in self._groups.values()]
                out["buffer/held_staleness_max"] = float(max(stale))
            if self._log is not None:
                out["buffer/log_bytes"] = float(self._log.log_bytes)
            return out

    def group_ids(self) -> list[str]:
        """Ids of the held groups in arrival order."""
        with self._lock:
            return list(self._groups)

    def __len__(self) -> int:
        return len(self._groups)

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Shut down: blocked and later put/get calls raise ``BufferClosedError``; the log is released."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._room.notify_all()
            self._ready.notify_all()
            if self._log is not None:
                self._log.close()

