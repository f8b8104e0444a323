"""TrainerGroup: the driver's handle on M TrainerWorker actors that train as one.

    TrainerGroup(cfg, model_path)
      ├─ M actors (ray.remote(TrainerWorker), num_cpus / num_gpus from cfg)
      ├─ rank 0 .address() ─► (MASTER_ADDR, port) ─► all .setup() ─► process group + FSDP2 models
      ├─ train_step(table | ObjectRef) ─► ray.put once ─► every rank takes its groups ─► metrics
      │   (train_step_async(...) ─► PendingStep ─► .result(): the same, without blocking)
      ├─ weight_buckets(bytes) / publish_weights(bytes, sink) ─► versioned named-tensor buckets
      ├─ put_weight_buckets(bytes) ─► [ObjectRef[WeightBucket]] put by rank 0 (object store)
      ├─ publish_weight_buckets_async(bytes, sink) ─► (ObjectRef of rank 0's handles, stats refs),
      │   without blocking (what WeightSync.publish uses)
      ├─ save_checkpoint / load_checkpoint / export_hf ─► run on all ranks (collectives)
      └─ worker_handles() / call_rank0(method, *args) ─► direct access for the driver

Every remote call waits at most ``trainer.timeout_s``; a failure or timeout raises a
RuntimeError naming the actor, the rank, the call and the step. After such an error the
process group may be stuck: ``shutdown()`` the group and build a new one.

>>> group = TrainerGroup(TrainerConfig(num_workers=2), "path/to/hf_model")  # doctest: +SKIP
>>> metrics = group.train_step(table)            # pa.Table of SAMPLE_SCHEMA  # doctest: +SKIP
>>> pending = group.train_step_async(table)     # returns at once  # doctest: +SKIP
>>> metrics = pending.result()                   # blocks (trainer.timeout_s)  # doctest: +SKIP
>>> buckets = group.weight_buckets(64 << 20)     # [WeightBucket(version=1, ...)]  # doctest: +SKIP
>>> refs = group.put_weight_buckets(64 << 20)    # [ObjectRef] for the engines  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import torch
from slime_rl.trainer.config import TrainerConfig
from slime_rl.trainer.weights import WeightBucket
from slime_rl.trainer.worker import TrainerWorker, model_dir

if TYPE_CHECKING:
    import ray
    from ray.actor import ActorHandle

logger = logging.getLogger(__name__)


class TrainerGroup:
    """M trainer workers forming one torch.distributed group (FSDP2), driven as one trainer."""

    def __init__(
        self,
        cfg: TrainerConfig,
        model_path: str,
        actor_options: Callable[[int], dict[str, Any]] | None = None,
        name: str = "trainer",
    ) -> None:
        """``actor_options(rank)`` adds Ray options per actor (e.g. a placement-group strategy)."""
        import ray

        self.cfg = cfg
        self.name = name
        self.model_path = model_dir(model_path)
        self.step = 0
        self.version = 0
        self._in_flight = 0  # steps handed to the workers whose result() has not returned or raised
        remote_cls = ray.remote(TrainerWorker)
        self.actors = []
        for rank in range(cfg.num_workers):
            opts: dict[str, Any] = {
                "num_cpus": cfg.num_threads if cfg.num_gpus_per_worker == 0 else 1,
                "num_gpus": cfg.num_gpus_per_worker,
                "name": f"{name}-rank{rank}-{id(self):x}",
            }
            opts.update(actor_options(rank) if actor_options else {})
            self.actors.append(remote_cls.options(**opts).remote(cfg, self.model_path, rank, cfg.num_workers))
        try:
            addr, port = self._call_one(0, "address")
            status = self._call_all("setup", addr, port)
        except BaseException:
            self.shutdown()  # no half-started group left holding resources
            raise
        logger.info("trainer group %s ready: %s", name, status)

    # -- remote-call plumbing ----------------------------------------------------------------
    def _actor_name(self, rank: int) -> str:
        return f"{self.name} actor rank {rank}"

    def _wait(self, refs: list, what: str, timeout: float | None = None, step: int | None = None) -> list:
        """ray.get with ``timeout`` (default trainer.timeout_s); the first failure or a timeout
        names the actor and the trainer step (default: the next one). ``refs[i]`` is rank i's."""
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        step = self.step + 1 if step is None else step
        limit = self.cfg.timeout_s if timeout is None else timeout
        pending = {ref: rank for rank, ref in enumerate(refs)}
        results: dict[int, Any] = {}
        deadline = time.monotonic() + limit
        while pending:
            left = deadline - time.monotonic()
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(left, 0.0))
            if not ready:
                ranks = sorted(pending.values())
                raise RuntimeError(
                    f"{what} at trainer step {step}: no answer from {', '.join(self._actor_name(r) for r in ranks)} "
                    f"within {limit}s (trainer.timeout_s={self.cfg.timeout_s}s)"
                )
            for ref in ready:
                rank = pending.pop(ref)
                try:
                    results[rank] = ray.get(ref)
                except (RayTaskError, RayActorError) as e:
                    cause = getattr(e, "cause", None) if isinstance(e, RayTaskError) else None
                    reason = f"{type(cause).__name__}: {cause}" if cause is not None else str(e)
                    raise RuntimeError(f"{what} failed on {self._actor_name(rank)} at trainer step {step}: {reason}") from e
        return [results[r] for r in range(len(refs))]

    def _call_all(self, method: str, *args: Any) -> list:
        refs = [getattr(a, method).remote(*args) for a in self.actors]
        return self._wait(refs, method)

    def _call_one(self, rank: int, method: str, *args: Any) -> Any:
        return self._wait([getattr(self.actors[rank], method).remote(*args)], method)[0]

    # -- public API --------------------------------------------------------------------------
    def train_step_async(self, table: pa.Table | Any) -> PendingStep:
        """Start one train step on a global batch of whole groups (a pa.Table or an ObjectRef to
        one) and return at once; ``PendingStep.result()`` waits for its metrics. Steps submitted
        one after another run in order (each actor runs its calls one at a time)."""
        import ray

        ref = table if isinstance(table, ray.ObjectRef) else ray.put(table)
        refs = [a.train_step.remote(ref) for a in self.actors]
        self._in_flight += 1
        return PendingStep(self, refs, self.step + self._in_flight)

    def train_step(self, table: pa.Table | Any) -> dict[str, float]:
        """One train step (``train_step_async(table).result()``): metrics, slash-namespaced."""
        return self.train_step_async(table).result()

    def worker_handles(self) -> list[ActorHandle]:
        """The Ray actor handles of the workers, in rank order (for the driver's own calls)."""
        return list(self.actors)

    def call_rank0(self, method: str, *args: Any) -> Any:
        """Call ``TrainerWorker.<method>(*args)`` on rank 0 only and return its result, with the
        group's timeout and error naming. Only for methods that are not collectives (a
        collective called on one rank waits for the others until trainer.timeout_s)."""
        return self._call_one(0, method, *args)

    def put_weight_buckets(self, bucket_bytes: int, include_tied: bool = False) -> list[ray.ObjectRef]:
        """The current weights as ``ObjectRef[WeightBucket]``s in bucket order, put into the
        Ray object store by rank 0 (the other ranks take part in the gathers): engines can
        ``ray.get`` them without the tensors passing through the driver. The objects are
        owned by rank 0's actor: they live while a ref is held and rank 0 is alive."""
        return self._call_all("put_weight_buckets", bucket_bytes, include_tied)[0]

    def weight_buckets(self, bucket_bytes: int, include_tied: bool = False) -> list[WeightBucket]:
        """Every bucket of the current weights (gathered on rank 0, returned through Ray)."""
        return self._call_all("weight_buckets", bucket_bytes, include_tied)[0]

    def gradients(self) -> dict[str, torch.Tensor]:
        """Full policy gradients of the last update (after clipping), gathered on rank 0 (for tests and debugging)."""
        return self._call_all("gradients")[0]

    def publish_weights(
        self, bucket_bytes: int, sink: Callable[[WeightBucket], Any], include_tied: bool = False
    ) -> int:
        """Stream buckets into ``sink`` (a picklable callable run inside rank 0); returns the count."""
        return self._call_all("publish_weights", bucket_bytes, sink, include_tied)[0]

    def publish_weight_buckets_async(
        self, bucket_bytes: int, sink: Callable[[WeightBucket], Any], include_tied: bool = False, dtype: str | None = None
    ) -> tuple[ray.ObjectRef, list[ray.ObjectRef]]:
        """Start a publish on every rank (``TrainerWorker.publish_weight_buckets``) and return at
        once: ``(handles, stats)``, an ObjectRef of rank 0's list of sink results (pass it as a
        task argument: Ray hands the list to the task when rank 0 is done, the driver never
        blocks on the gather) and one ObjectRef of stats per rank (rank 0 first). Runs after
        the train steps already submitted and before the ones submitted later."""
        refs = [
            a.publish_weight_buckets.options(num_returns=2).remote(bucket_bytes, sink, include_tied, dtype)
            for a in self.actors
        ]
        return refs[0][0], [stats for _, stats in refs]

    def weight_layout(
        self, bucket_bytes: int, include_tied: bool = False, dtype: str | None = None
    ) -> list[list[tuple[str, tuple[int, ...], str]]]:
        """``(name, shape, dtype)`` per tensor per bucket of a publish, from rank 0 (no data moved)."""
        return self._call_one(0, "weight_layout", bucket_bytes, include_tied, dtype)

    def save_checkpoint(self, path: str) -> str:
        return self._call_all("save_checkpoint", str(path))[0]

    def load_checkpoint(self, path: str) -> dict[str, int]:
        out = self._call_all("load_checkpoint", str(path))[0]
        self.step, self.version = out["step"], out["version"]
        return out

    def export_hf(self, out_dir: str, merged: bool = False) -> str:
        """HF export of the policy (LoRA: PEFT adapter folder, + ``<out_dir>/merged`` when ``merged``)."""
        return self._call_all("export_hf", str(out_dir), merged)[0]

    def set_version(self, version: int) -> None:
        self._call_all("set_version", version)
        self.version = int(version)

    def shutdown(self) -> None:
        """Leave the process group and kill the actors (safe to call twice)."""
        import ray

        if not self.actors:
            return
        try:
            ray.get([a.shutdown.remote() for a in self.actors], timeout=min(self.cfg.timeout_s, 30.0))
        except Exception as e:  # a stuck or dead rank must not block the kill
            logger.warning("trainer group %s: clean shutdown failed (%s); killing the actors", self.name, e)
        for a in self.actors:
            ray.kill(a)
        self.actors = []


class PendingStep:
    """A train step in flight (from ``TrainerGroup.train_step_async``)."""

    def __init__(self, group: TrainerGroup, refs: list[ray.ObjectRef], step: int) -> None:
        self._group = group
        self._refs = refs
        self.step = step
        """The trainer step this will complete (1-based)."""
        self._metrics: dict[str, float] | None = None
        self._settled = False

    def done(self) -> bool:
        """Whether every rank has finished (successfully or not); never blocks."""
        import ray

        if self._metrics is not None:
            return True
        ready, _ = ray.wait(self._refs, num_returns=len(self._refs), timeout=0)
        return len(ready) == len(self._refs)

    def result(self, timeout: float | None = None) -> dict[str, float]:
        """Wait at most ``timeout`` seconds (default trainer.timeout_s) and return the step's
        metrics; updates the group's ``step`` and ``version``. Calling it again returns the
        same metrics. Raises RuntimeError naming the actor and step on failure or timeout
        (then ``shutdown()`` the group: its process group may be stuck)."""
        if self._metrics is None:
            try:
                metrics = self._group._wait(self._refs, "train_step", timeout=timeout, step=self.step)[0]
            except RuntimeError:
                self._settle()  # a failed step never completes: later steps keep their numbers
                raise
            self._settle()
            self._group.step = int(metrics["train/step"])
            self._group.version = int(metrics["train/version"])
            self._metrics = metrics
        return self._metrics

    def _settle(self) -> None:
        if not self._settled:
            self._settled = True
            self._group._in_flight -= 1
