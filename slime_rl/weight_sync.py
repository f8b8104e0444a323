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

A LoRA policy (`trainer.lora.rank` > 0) publishes through the same path: its buckets hold the
adapter tensors only where the engine serves adapters (vllm, hf), else merged full weights
(`lora_sync_plan`; metric `weight_sync/lora_adapter_only`).

Every wait has a timeout (`weight_sync.timeout_s`) and a failure names the transport, the
version and the side that failed; a sync never waits forever. Engines check the version they
were sent against the buckets' version before committing.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import ray
import torch

from slime_rl.weight_transports import (  # noqa: F401  (the transports' handles, re-exported)
    CollectiveBucket,
    CollectiveSender,
    CollectiveSpec,
    DiskBucket,
    DiskWriter,
    _Groups,
)

logger = logging.getLogger(__name__)

TRANSPORTS = ("object_store", "collective", "disk")

ADAPTER_ENGINES = ("vllm", "hf")
"""Engines that serve a LoRA adapter, so a LoRA policy's sync can ship the adapter only."""


def resolve_lora_publish(publish: str, engine: str) -> str:
    """`trainer.lora.publish` for `rollout.engine`: `auto` -> `adapter` where the engine serves
    adapters, else `merged`; `adapter` on an engine that cannot serve one is refused."""
    if publish == "auto":
        return "adapter" if engine in ADAPTER_ENGINES else "merged"
    if publish == "adapter" and engine not in ADAPTER_ENGINES:
        raise ValueError(
            f"trainer.lora.publish=adapter but rollout.engine={engine!r} cannot serve a LoRA adapter (engines that "
            f"can: {list(ADAPTER_ENGINES)}); set trainer.lora.publish=merged (or auto) to ship merged full weights"
        )
    return publish


def lora_sync_plan(cfg: Any) -> tuple[Any, dict[str, Any] | None]:
    """For a run config with `trainer.lora.rank` > 0: the trainer config with `lora.publish`
    resolved against the engine, and the engines' `lora` argument (None when they get merged
    weights). Without LoRA: `(cfg.trainer, None)`."""
    lora = cfg.trainer.lora
    if lora.rank <= 0:
        return cfg.trainer, None
    publish = resolve_lora_publish(lora.publish, cfg.rollout.engine)
    trainer = dataclasses.replace(cfg.trainer, lora=dataclasses.replace(lora, publish=publish))
    if publish == "adapter":
        from slime_rl.trainer.lora import engine_adapter_config

        logger.info("trainer.lora: rank %d; weight syncs ship the adapter only (rollout.engine=%s serves it)",
                    lora.rank, cfg.rollout.engine)
        return trainer, engine_adapter_config(lora)
    logger.info("trainer.lora: rank %d; weight syncs ship merged full weights (rollout.engine=%s, "
                "trainer.lora.publish=%s)", lora.rank, cfg.rollout.engine, lora.publish)
    return trainer, None


class WeightSyncError(RuntimeError):
    """A weight sync failed or timed out; the message names the transport, version and side."""


# ---- the driver side ---------------------------------------------------------------------------
@dataclasses.dataclass
class PendingSync:
    """A weight sync in progress; `wait()` returns its metrics or raises `WeightSyncError`."""

    version: int
    transport: str
    refs: list[Any]
    """The engines' side: the manager's `update_weights` call."""
    nbytes: int
    started: float
    timeout_s: float
    cleanup: Any = None
    prep_s: float = 0.0
    """Seconds of the trainer's side (rank 0's gather + hand-off); known once `wait()` returned."""
    trainer_refs: list[Any] = dataclasses.field(default_factory=list)
    """Each rank's publish stats (rank 0 first): done when that rank gathered and handed off."""
    overlapped: bool = False
    """The trainer's hand-off and the engines' load run at the same time (collective)."""
    lora_adapter_only: bool | None = None
    """LoRA policy: True = the adapter only was shipped, False = merged full weights; None = no LoRA."""
    on_fail: Any = None
    """Called once when the sync fails (collective: the next publish makes a new group)."""
    _result: dict[str, float] | None = None

    def done(self) -> bool:
        if self._result is not None:
            return True
        refs = [*self.trainer_refs, *self.refs]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        return len(ready) == len(refs)

    def _call_on_fail(self) -> None:
        if self.on_fail is not None:
            self.on_fail, on_fail = None, self.on_fail
            on_fail()

    def _fail(self, side: str, e: BaseException) -> WeightSyncError:
        from slime_rl.errors import describe_error

        self._call_on_fail()
        return WeightSyncError(f"weight sync of version {self.version} over {self.transport} failed on {side}: "
                               f"{describe_error(e)}")

    def wait(self) -> dict[str, float]:
        if self._result is not None:
            return self._result
        left = self.timeout_s - (time.monotonic() - self.started)
        refs = [*self.trainer_refs, *self.refs]
        _, pending = ray.wait(refs, num_returns=len(refs), timeout=max(left, 0.0))
        if pending:
            self._call_on_fail()
            side = "trainer rank 0 (gather or hand-off)" if set(pending) & set(self.trainer_refs) else "the rollout engines"
            raise WeightSyncError(
                f"weight sync of version {self.version} over {self.transport} did not finish within "
                f"{self.timeout_s:.0f} s (weight_sync.timeout_s); {side} is stuck"
            )
        try:  # the trainer's side first: when it failed, the engines' call fails with the same cause
            stats = ray.get(self.trainer_refs)
        except Exception as e:
            raise self._fail("the trainer side (gather or hand-off)", e) from e
        try:
            results = ray.get(self.refs)
        except Exception as e:
            raise self._fail("the engine side (transfer or load)", e) from e
        waited = time.monotonic() - self.started
        rank0 = stats[0] if stats else {}
        self.prep_s = float(rank0.get("gather_s", 0.0)) + float(rank0.get("hand_off_s", 0.0))
        self.nbytes = int(rank0.get("bytes", 0)) or self.nbytes
        engine_s = max((float(r.get("rollout/weight_update_s", 0.0)) for r in results if isinstance(r, dict)), default=0.0)
        # The sync's own duration: the trainer's side, then (or, collective: during) the engines'
        # load. (`waited` also counts however long the driver took to come back and ask.)
        if not engine_s:
            seconds = waited
        else:
            seconds = max(self.prep_s, engine_s) if self.overlapped else self.prep_s + engine_s
        out = {
            "weight_sync/seconds": seconds,
            "weight_sync/prep_s": self.prep_s,
            "weight_sync/gather_s": float(rank0.get("gather_s", 0.0)),
            "weight_sync/hand_off_s": float(rank0.get("hand_off_s", 0.0)),
            "weight_sync/bytes": float(self.nbytes),
            "weight_sync/gb_per_s": self.nbytes / 1e9 / max(seconds, 1e-9),
            "weight_sync/version": float(self.version),
        }
        if self.lora_adapter_only is not None:
            out["weight_sync/lora_adapter_only"] = float(self.lora_adapter_only)
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


def put_bucket(bucket: Any) -> ray.ObjectRef:
    """Sink of the object_store transport (run inside trainer rank 0): one `ray.put` per bucket
    (a `WeightBucket` pickles its tensors out of band: one copy into the store, none out)."""
    return ray.put(bucket)


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
        dtype: str | None = None,
        lora_adapter_only: bool | None = None,
    ) -> None:
        """`dtype`: cast the published weights to it (e.g. `"bfloat16"` for engines serving bf16:
        half the bytes to move); None publishes the trainer's own (fp32) weights.
        `lora_adapter_only`: with a LoRA policy, whether its publishes ship the adapter only
        (True) or merged full weights (False), as `lora_sync_plan` decided; reported as the
        metric `weight_sync/lora_adapter_only`. None: no LoRA."""
        if transport not in TRANSPORTS:
            raise ValueError(f"weight_sync.transport={transport!r}; choose one of {TRANSPORTS}")
        from slime_rl.trainer.weights import resolve_dtype

        resolve_dtype(dtype)  # refuses a bad name now, not at the first publish
        self.transport = transport
        self.trainer = trainer
        self.manager = manager
        self.bucket_bytes = bucket_bytes
        self.run_dir = Path(run_dir)
        self.timeout_s = timeout_s
        self.dtype = dtype
        self.lora_adapter_only = lora_adapter_only
        self._layout: list[list[tuple[str, tuple[int, ...], str]]] | None = None
        self._spec: CollectiveSpec | None = None
        self._members: tuple[str, ...] = ()
        """Engines of the current collective group (rank i + 1 = members[i]); a new group is made
        whenever engines come or go, so a restarted or added engine joins at the next publish."""
        self._backend = "nccl" if use_gpu else "gloo"

    def _layout_of(self) -> list[list[tuple[str, tuple[int, ...], str]]]:
        """Names, shapes and dtypes of every bucket (fixed for a run; read once from rank 0,
        from the shapes alone: no tensor moves)."""
        if self._layout is None:
            self._layout = self.trainer.weight_layout(self.bucket_bytes, False, self.dtype)
        return self._layout

    def publish(self, version: int) -> PendingSync:
        """Publish the trainer's current weights as `version` to every engine; returns at once.

        The trainer ranks gather bucket by bucket and rank 0 hands each bucket to the transport
        (object_store: `ray.put`; disk: a file; collective: a broadcast) as one call queued on
        the trainer actors: it runs after the train steps already submitted and before the
        next one, so the trainer spends the gather and hand-off on it, never the engines'
        load. The engines start loading when rank 0 is done (object_store, disk) or receive
        while it sends (collective); `PendingSync.wait()` waits for both sides.

        Raises:
            WeightSyncError: the sync could not be started (names transport and version).
        """
        t0 = time.monotonic()
        try:
            refs, trainer_refs, nbytes, cleanup = getattr(self, f"_start_{self.transport}")(version)
        except Exception as e:
            from slime_rl.errors import describe_error

            raise WeightSyncError(f"weight sync of version {version} over {self.transport} could not start: "
                                  f"{describe_error(e)}") from e
        collective = self.transport == "collective"
        return PendingSync(version, self.transport, refs, nbytes, t0, self.timeout_s, cleanup,
                           trainer_refs=trainer_refs, overlapped=collective,
                           lora_adapter_only=self.lora_adapter_only,
                           on_fail=self._forget_group if collective else None)

    def _forget_group(self) -> None:
        """A failed collective sync leaves its group given up on every member: make a new one."""
        self._spec = None

    def nbytes(self) -> int:
        """Bytes of one full publish (from the layout)."""
        return sum(
            torch.empty((), dtype=getattr(torch, d)).element_size() * torch.Size(s).numel()
            for b in self._layout_of() for _, s, d in b
        )

    def _start_object_store(self, version: int) -> tuple[list[Any], list[Any], int, Any]:
        handles, stats = self.trainer.publish_weight_buckets_async(self.bucket_bytes, put_bucket, False, self.dtype)
        # `handles` (rank 0's list of refs) is resolved by Ray when rank 0 is done: nothing blocks here.
        return [self.manager.update_weights.remote(version, handles)], stats, 0, None

    def _start_disk(self, version: int) -> tuple[list[Any], list[Any], int, Any]:
        folder = self.run_dir / "weights" / f"v{version:06d}"
        handles, stats = self.trainer.publish_weight_buckets_async(
            self.bucket_bytes, DiskWriter(str(folder)), False, self.dtype
        )

        def cleanup() -> None:  # keep only the newest version on disk
            for old in (self.run_dir / "weights").glob("v*"):
                if old.name < folder.name:
                    shutil.rmtree(old, ignore_errors=True)

        return [self.manager.update_weights.remote(version, handles)], stats, 0, cleanup

    def _collective_group(self) -> tuple[CollectiveSpec | None, tuple[str, ...]]:
        """The group for the engines a sync must reach now: the same as last time, or a new one
        (a new rendezvous port on trainer rank 0's node) when engines came or went."""
        members = tuple(ray.get(self.manager.sync_members.remote(), timeout=self.timeout_s))
        if members != self._members or self._spec is None:
            host, port = self.trainer.call_rank0("address")  # rank 0 hosts the store: its node, a free port there
            self._spec = CollectiveSpec(host, port, 1 + len(members), self.timeout_s, self._backend) if members else None
            self._members = members
        return self._spec, members

    def _start_collective(self, version: int) -> tuple[list[Any], list[Any], int, Any]:
        layout = self._layout_of()
        spec, members = self._collective_group()
        if spec is None:  # no engine to send to
            return [self.manager.update_weights.remote(version, [], {})], [], 0, None
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
        _, stats = self.trainer.publish_weight_buckets_async(self.bucket_bytes, CollectiveSender(spec), False, self.dtype)
        recv = self.manager.update_weights.remote(version, [], per_engine)
        return [recv], stats, self.nbytes(), None
