"""Versioned weight sync from the trainer to every rollout engine, by transport.

    trainer step v ─► WeightSync.publish(v) ─► PendingSync (the trainer goes on with step v+1)
        object_store: rank 0 ray.put()s each WeightBucket ─► refs ─► manager.update_weights(v, refs)
                      ─► every engine resolves the refs itself (no copy through the driver)
        disk:         rank 0 writes bucket-i.safetensors under <run_dir>/weights/v<v> ─► DiskBucket
                      handles ─► engines read the files (the folder of older versions is removed)
        collective:   a torch.distributed group (gloo on CPU, NCCL on GPU) of trainer rank 0 and
                      the engines; rank 0 broadcasts each bucket's tensors while the engines receive
                      them inside `CollectiveBucket.named_tensors()`
    PendingSync.wait() ─► {"weight_sync/seconds", "weight_sync/bytes", "weight_sync/gb_per_s", ...}

Every wait has a timeout (`weight_sync.timeout_s`) and a failure names the transport, the
version and the side that failed; a sync never waits forever. Engines check the version they
were sent against the buckets' version before committing.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import ray
import torch

logger = logging.getLogger(__name__)

TRANSPORTS = ("object_store", "collective", "disk")


class WeightSyncError(RuntimeError):
    """A weight sync failed or timed out; the message names the transport, version and side."""


# ---- disk ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DiskBucket:
    """A bucket written as one safetensors file; `named_tensors()` reads it where it is called."""

    path: str
    version: int
    index: int
    num_buckets: int

    def named_tensors(self) -> list[tuple[str, torch.Tensor]]:
        from safetensors.torch import load_file

        return list(load_file(self.path).items())


@dataclasses.dataclass(frozen=True)
class DiskWriter:
    """Sink run inside trainer rank 0: writes each bucket to `<folder>/bucket-<i>.safetensors`."""

    folder: str

    def __call__(self, bucket: Any) -> None:
        from safetensors.torch import save_file

        Path(self.folder).mkdir(parents=True, exist_ok=True)
        tmp = Path(self.folder) / f".bucket-{bucket.index}.tmp"
        save_file({n: t.contiguous() for n, t in bucket.named_tensors()}, str(tmp))
        tmp.rename(Path(self.folder) / f"bucket-{bucket.index}.safetensors")


# ---- collective ------------------------------------------------------------------------------
class _Groups:
    """Weight-sync process groups of this process, by rendezvous address (one per run)."""

    _lock = threading.Lock()
    _groups: dict[tuple[str, int], Any] = {}

    @classmethod
    def get(cls, host: str, port: int, rank: int, world: int, timeout_s: float, backend: str) -> Any:
        key = (host, port)
        with cls._lock:
            if key not in cls._groups:
                timeout = datetime.timedelta(seconds=timeout_s)
                store = torch.distributed.TCPStore(host, port, world, rank == 0, timeout=timeout)
                if backend == "nccl":
                    group = torch.distributed.ProcessGroupNCCL(store, rank, world)
                else:
                    group = torch.distributed.ProcessGroupGloo(store, rank, world, timeout)
                cls._groups[key] = group
            return cls._groups[key]


@dataclasses.dataclass(frozen=True)
class CollectiveSpec:
    host: str
    port: int
    world: int
    timeout_s: float
    backend: str = "gloo"


@dataclasses.dataclass(frozen=True)
class CollectiveSender:
    """Sink run inside trainer rank 0: broadcasts each bucket's tensors to the engines (rank 0)."""

    spec: CollectiveSpec

    def __call__(self, bucket: Any) -> None:
        s = self.spec
        group = _Groups.get(s.host, s.port, 0, s.world, s.timeout_s, s.backend)
        for _, t in bucket.named_tensors():
            t = t.contiguous()
            if s.backend == "nccl":
                t = t.cuda()
            group.broadcast(t, 0).wait()


@dataclasses.dataclass(frozen=True)
class CollectiveBucket:
    """A bucket that arrives by broadcast: `named_tensors()` (called inside engine `rank`) joins the
    group on first use and receives the tensors described by `names`/`shapes`/`dtypes`."""

    spec: CollectiveSpec
    rank: int
    version: int
    index: int
    num_buckets: int
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]

    def named_tensors(self) -> list[tuple[str, torch.Tensor]]:
        s = self.spec
        group = _Groups.get(s.host, s.port, self.rank, s.world, s.timeout_s, s.backend)
        device = "cuda" if s.backend == "nccl" else "cpu"
        out = []
        for name, shape, dtype in zip(self.names, self.shapes, self.dtypes):
            t = torch.empty(shape, dtype=getattr(torch, dtype), device=device)
            group.broadcast(t, 0).wait()
            out.append((name, t))
        return out


# ---- the driver side ---------------------------------------------------------------------------
@dataclasses.dataclass
class PendingSync:
    """A weight sync in progress; `wait()` returns its metrics or raises `WeightSyncError`."""

    version: int
    transport: str
    refs: list[Any]
    nbytes: int
    started: float
    timeout_s: float
    cleanup: Any = None
    prep_s: float = 0.0
    """Seconds the trainer side took before the engines' part began (gather, put or write)."""
    _result: dict[str, float] | None = None

    def done(self) -> bool:
        if self._result is not None:
            return True
        ready, _ = ray.wait(self.refs, num_returns=len(self.refs), timeout=0)
        return len(ready) == len(self.refs)

    def wait(self) -> dict[str, float]:
        if self._result is not None:
            return self._result
        left = self.timeout_s - (time.monotonic() - self.started)
        ready, pending = ray.wait(self.refs, num_returns=len(self.refs), timeout=max(left, 0.0))
        if pending:
            raise WeightSyncError(
                f"weight sync of version {self.version} over {self.transport} did not finish within "
                f"{self.timeout_s:.0f} s (weight_sync.timeout_s); the rollout engines or trainer rank 0 are stuck"
            )
        try:
            results = ray.get(self.refs)
        except Exception as e:
            raise WeightSyncError(f"weight sync of version {self.version} over {self.transport} failed: {e}") from e
        waited = time.monotonic() - self.started
        engine_s = max((float(r.get("rollout/weight_update_s", 0.0)) for r in results if isinstance(r, dict)), default=0.0)
        # The sync's own duration: trainer-side preparation + the engines' load. (`waited` also
        # counts however long the driver took to come back and ask, e.g. a whole train step.)
        seconds = self.prep_s + engine_s if engine_s else waited
        out = {
            "weight_sync/seconds": seconds,
            "weight_sync/prep_s": self.prep_s,
            "weight_sync/bytes": float(self.nbytes),
            "weight_sync/gb_per_s": self.nbytes / 1e9 / max(seconds, 1e-9),
            "weight_sync/version": float(self.version),
        }
        for r in results:
            if isinstance(r, dict):
                out.update({k: float(v) for k, v in r.items() if isinstance(v, (int, float))})
        if self.cleanup is not None:
            self.cleanup()
        self._result = out
        # Every step syncs in async mode: the first one at INFO, the rest at DEBUG (they are in the metrics).
        logger.log(
            logging.INFO if self.version <= 1 else logging.DEBUG,
            "weight sync v%d over %s: %.2f s, %.1f MB, %.2f GB/s",
            self.version, self.transport, seconds, self.nbytes / 1e6, out["weight_sync/gb_per_s"],
        )
        return out


class WeightSync:
    """Publishes the trainer's weights to the rollout manager's engines (see module docstring)."""

    def __init__(
        self,
        transport: str,
        trainer: Any,
        manager: Any,
        *,
        bucket_bytes: int,
        run_dir: Path,
        timeout_s: float,
        use_gpu: bool = False,
    ) -> None:
        if transport not in TRANSPORTS:
            raise ValueError(f"weight_sync.transport={transport!r}; choose one of {TRANSPORTS}")
        self.transport = transport
        self.trainer = trainer
        self.manager = manager
        self.bucket_bytes = bucket_bytes
        self.run_dir = Path(run_dir)
        self.timeout_s = timeout_s
        self._layout: list[list[tuple[str, tuple[int, ...], str]]] | None = None
        self._spec: CollectiveSpec | None = None
        self._members: tuple[str, ...] = ()
        """Engines of the current collective group (rank i + 1 = members[i]); a new group is made
        whenever engines come or go, so a restarted or added engine joins at the next publish."""
        self._backend = "nccl" if use_gpu else "gloo"

    def _layout_of(self) -> list[list[tuple[str, tuple[int, ...], str]]]:
        """Names, shapes and dtypes of every bucket (fixed for a run; read once from rank 0)."""
        if self._layout is None:
            buckets = self.trainer.weight_buckets(self.bucket_bytes)
            self._layout = [
                [(n, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for n, t in b.named_tensors()] for b in buckets
            ]
        return self._layout

    def publish(self, version: int) -> PendingSync:
        """Publish the trainer's current weights as `version` to every engine.

        Blocks while trainer rank 0 gathers the buckets and hands them to the transport
        (object_store: `ray.put`; disk: files written; collective: the broadcast is started
        and runs while this returns); the engines' load runs in the background until
        `PendingSync.wait()`.

        Raises:
            WeightSyncError: the gather or hand-off failed (names transport and version).
        """
        t0 = time.monotonic()
        try:
            refs, nbytes, cleanup = getattr(self, f"_start_{self.transport}")(version)
        except Exception as e:
            raise WeightSyncError(f"weight sync of version {version} over {self.transport} could not start: {e}") from e
        return PendingSync(version, self.transport, refs, nbytes, t0, self.timeout_s, cleanup, time.monotonic() - t0)

    def nbytes(self) -> int:
        """Bytes of one full publish (from the layout)."""
        return sum(
            torch.tensor([], dtype=getattr(torch, d)).element_size() * torch.Size(s).numel()
            for b in self._layout_of() for _, s, d in b
        )

    def _start_object_store(self, version: int) -> tuple[list[Any], int, Any]:
        refs = self.trainer.put_weight_buckets(self.bucket_bytes)
        return [self.manager.update_weights.remote(version, refs)], self.nbytes(), None

    def _start_disk(self, version: int) -> tuple[list[Any], int, Any]:
        folder = self.run_dir / "weights" / f"v{version:06d}"
        count = self.trainer.publish_weights(self.bucket_bytes, DiskWriter(str(folder)))
        buckets = [DiskBucket(str(folder / f"bucket-{i}.safetensors"), version, i, count) for i in range(count)]
        nbytes = sum(p.stat().st_size for p in folder.glob("bucket-*.safetensors"))

        def cleanup() -> None:  # keep only the newest version on disk
            for old in (self.run_dir / "weights").glob("v*"):
                if old.name < folder.name:
                    shutil.rmtree(old, ignore_errors=True)

        return [self.manager.update_weights.remote(version, buckets)], nbytes, cleanup

    def _collective_group(self) -> tuple[CollectiveSpec | None, tuple[str, ...]]:
        """The group for the engines a sync must reach now: the same as last time, or a new one
        (a new rendezvous port on trainer rank 0's node) when engines came or went."""
        members = tuple(ray.get(self.manager.sync_members.remote(), timeout=self.timeout_s))
        if members != self._members or self._spec is None:
            host, port = self.trainer.call_rank0("address")  # rank 0 hosts the store: its node, a free port there
            self._spec = CollectiveSpec(host, port, 1 + len(members), self.timeout_s, self._backend) if members else None
            self._members = members
        return self._spec, members

    def _start_collective(self, version: int) -> tuple[list[Any], int, Any]:
        layout = self._layout_of()
        spec, members = self._collective_group()
        if spec is None:  # no engine to send to
            return [self.manager.update_weights.remote(version, [], {})], 0, None
        per_engine = {
            name: [
                CollectiveBucket(
                    spec, rank, version, i, len(layout),
                    tuple(n for n, _, _ in b), tuple(s for _, s, _ in b), tuple(d for _, _, d in b),
                )
                for i, b in enumerate(layout)
            ]
            for rank, name in enumerate(members, start=1)
        }
        sender = CollectiveSender(spec)
        send = [w.publish_weights.remote(self.bucket_bytes, sender, False) for w in self.trainer.worker_handles()]
        recv = self.manager.update_weights.remote(version, [], per_engine)
        return [*send, recv], self.nbytes(), None
