"""The replay buffer as a Ray actor shared by the rollout manager and one or more trainers.

    rollout actors ──put.remote(RecordBatch)──┐  "writers" threads (default group, max_concurrency)
    trainer        ──get_batch / take_batch ──┼─► "readers" threads (READER_THREADS) ─┐
    driver         ──counts/stats/close...  ──┘  "control" threads (CONTROL_THREADS) ─┴─ ReplayBuffer
                                                                                       (lock + conditions)

A threaded actor with Ray concurrency groups: ``put`` runs in the default group
(``max_concurrency`` threads), ``get_batch``/``set_version`` in ``readers``, everything else
(``counts``, ``stats``, ``close``, checkpoints, export) in ``control``. However many writers
block on a full buffer, a trainer and the driver always find a thread, and a blocked
reader never takes a writer's thread. Arguments and results
above ~100 KiB travel through Ray's object store; Arrow buffers pickle out-of-band, so a
batch is copied once into the store and read without unpickling Python objects.
Exceptions keep their type across Ray: ``except BufferTimeoutError`` works around
``ray.get(handle.get_batch.remote(...))``.

>>> handle = create_buffer_actor(BufferConfig(), group_size=4)      # doctest: +SKIP
>>> ray.get(handle.put.remote(batch))                               # doctest: +SKIP
>>> table = ray.get(handle.get_batch.remote(8, trainer_version=3))  # doctest: +SKIP
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray
from slime_rl.buffers.config import BufferConfig
from slime_rl.buffers.replay_buffer import ReplayBuffer
from slime_rl.buffers.stats import BufferCounts

READER_THREADS = 8
"""Threads for ``get_batch``/``set_version`` (trainer workers that may wait at once)."""
CONTROL_THREADS = 4
"""Threads for the quick calls (``counts``, ``stats``, ``close``, ``ready``...) and checkpoints/export."""
_READERS = ray.method(concurrency_group="readers")
_CONTROL = ray.method(concurrency_group="control")


class BufferActor:
    """Ray actor body: a ``ReplayBuffer`` with the same methods (create it with ``create_buffer_actor``)."""

    def __init__(self, config: BufferConfig, group_size: int | None = None, recover: bool = False) -> None:
        # A restart by Ray (max_restarts) continues the log whatever the first start was told.
        with warnings.catch_warnings():  # Ray 2.60's own property reads its deprecated `actor_id`
            warnings.simplefilter("ignore", DeprecationWarning)
            restarted = ray.is_initialized() and ray.get_runtime_context().was_current_actor_reconstructed
        self._buf = ReplayBuffer(config, group_size=group_size, recover=recover or restarted)

    @_CONTROL
    def ready(self) -> int:
        """The actor's pid, once its buffer is built (and recovered)."""
        return os.getpid()

    @_CONTROL
    def node_info(self) -> dict[str, Any]:
        """Where this actor runs: `{"node_id", "node_ip", "pid"}`."""
        return {"node_id": ray.get_runtime_context().get_node_id(), "node_ip": ray.util.get_node_ip_address(),
                "pid": os.getpid()}

    def put(self, data: pa.RecordBatch | pa.Table, timeout: float | None = None) -> int:
        return self._buf.put(data, timeout)

    @_READERS
    def get_batch(self, global_batch_groups: int, trainer_version: int, max_staleness: int | None = None, timeout: float | None = None) -> pa.Table:
        return self._buf.get_batch(global_batch_groups, trainer_version, max_staleness, timeout)

    @ray.method(num_returns=2, concurrency_group="readers")
    def take_batch(
        self, global_batch_groups: int, trainer_version: int, max_staleness: int | None = None, timeout: float | None = None
    ) -> tuple[dict[str, int], pa.Table]:
        """`get_batch` as two objects, `(summary, table)`: a caller that only passes the batch on
        (the driver, to the trainer workers) gets the small summary and hands the table's
        ObjectRef on, so the Arrow data never leaves the object store for it."""
        table = self._buf.get_batch(global_batch_groups, trainer_version, max_staleness, timeout)
        return {"num_samples": table.num_rows, "num_groups": global_batch_groups}, table

    @_READERS
    def set_version(self, trainer_version: int, max_staleness: int | None = None) -> None:
        self._buf.set_version(trainer_version, max_staleness)

    @_CONTROL
    def counts(self) -> BufferCounts:
        return self._buf.counts()

    @_CONTROL
    def stats(self) -> dict[str, float]:
        return self._buf.stats()

    @_CONTROL
    def group_ids(self) -> list[str]:
        return self._buf.group_ids()

    @_CONTROL
    def state_dict(self) -> dict[str, Any]:
        return self._buf.state_dict()

    @_CONTROL
    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._buf.load_state_dict(state)

    @_CONTROL
    def save(self, folder: str) -> str:
        return str(self._buf.save(folder))

    @_CONTROL
    def load(self, folder: str) -> None:
        self._buf.load(folder)

    @_CONTROL
    def export(self, path: str) -> int:
        return self._buf.export(Path(path))

    @_CONTROL
    def close(self) -> None:
        self._buf.close()


RemoteBufferActor = ray.remote(concurrency_groups={"readers": READER_THREADS, "control": CONTROL_THREADS})(BufferActor)
"""``BufferActor`` as a Ray actor class (use ``create_buffer_actor`` for sensible options)."""


def create_buffer_actor(
    config: BufferConfig,
    *,
    group_size: int | None = None,
    recover: bool = False,
    name: str | None = None,
    max_concurrency: int = 64,
    num_cpus: float = 0,
    **options: Any,
) -> ray.actor.ActorHandle:
    """Start the buffer actor; ``recover=True`` continues the log in ``config.spill_dir`` if any.

    ``options`` go to ``.options()`` (``namespace``, ``lifetime``, ``max_restarts``...). With
    ``max_restarts`` and ``recover=True`` a restarted actor rebuilds itself from its log.
    ``max_concurrency`` is the number of ``put`` calls served at once (writers blocked by
    backpressure each hold one); readers and control calls have their own threads.
    Call ``ray.get(handle.ready.remote())`` to wait until it is built.
    """
    return RemoteBufferActor.options(name=name, max_concurrency=max_concurrency, num_cpus=num_cpus, **options).remote(
        config, group_size=group_size, recover=recover
    )
