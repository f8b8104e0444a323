"""The replay buffer as a Ray actor shared by many rollout workers and one or more trainers.

    rollout actors ──put.remote(RecordBatch)──┐
    rollout actors ──put.remote(RecordBatch)──┼─► BufferActor (threaded, max_concurrency)
    trainer        ──get_batch.remote(...)  ──┘        └─ ReplayBuffer (lock + conditions)

A threaded actor: each call runs in one of ``max_concurrency`` threads, so a writer blocked
by backpressure and a trainer blocked waiting for groups do not hold each other up (keep
``max_concurrency`` above writers + readers that may block at once). Arguments and results
above ~100 KiB travel through Ray's object store; Arrow buffers pickle out-of-band, so a
batch is copied once into the store and read without unpickling Python objects.
Exceptions keep their type across Ray: ``except BufferTimeoutError`` works around
``ray.get(handle.get_batch.remote(...))``.

>>> handle = create_buffer_actor(BufferConfig(), group_size=4)      # doctest: +SKIP
>>> ray.get(handle.put.remote(batch))                               # doctest: +SKIP
>>> table = ray.get(handle.get_batch.remote(8, current_version=3))  # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray
from slime_rl.buffers.config import BufferConfig
from slime_rl.buffers.replay_buffer import ReplayBuffer
from slime_rl.buffers.stats import BufferCounts


class BufferActor:
    """Ray actor body: a ``ReplayBuffer`` with the same methods (create it with ``create_buffer_actor``)."""

    def __init__(self, config: BufferConfig, group_size: int | None = None, recover: bool = False) -> None:
        self._buf = ReplayBuffer(config, group_size=group_size, recover=recover)

    def ready(self) -> int:
        """The actor's pid, once its buffer is built (and recovered)."""
        return os.getpid()

    def put(self, data: pa.RecordBatch | pa.Table, timeout: float | None = None) -> int:
        return self._buf.put(data, timeout)

    def get_batch(self, num_groups: int, current_version: int, max_staleness: int | None = None, timeout: float | None = None) -> pa.Table:
        return self._buf.get_batch(num_groups, current_version, max_staleness, timeout)

    def set_version(self, current_version: int, max_staleness: int | None = None) -> None:
        self._buf.set_version(current_version, max_staleness)

    def counts(self) -> BufferCounts:
        return self._buf.counts()

    def stats(self) -> dict[str, float]:
        return self._buf.stats()

    def group_ids(self) -> list[str]:
        return self._buf.group_ids()

    def state_dict(self) -> dict[str, Any]:
        return self._buf.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._buf.load_state_dict(state)

    def save(self, folder: str) -> str:
        return str(self._buf.save(folder))

    def load(self, folder: str) -> None:
        self._buf.load(folder)

    def export(self, path: str) -> int:
        return self._buf.export(Path(path))

    def close(self) -> None:
        self._buf.close()


RemoteBufferActor = ray.remote(BufferActor)
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
    Call ``ray.get(handle.ready.remote())`` to wait until it is built.
    """
    return RemoteBufferActor.options(name=name, max_concurrency=max_concurrency, num_cpus=num_cpus, **options).remote(
        config, group_size=group_size, recover=recover
    )
