"""TrainerGroup: the driver's handle on M TrainerWorker actors that train as one.

    TrainerGroup(cfg, model_path)
      ├─ M actors (ray.remote(TrainerWorker), num_cpus / num_gpus from cfg)
      ├─ rank 0 .address() ─► (MASTER_ADDR, port) ─► all .setup() ─► process group + FSDP2 models
      ├─ train_step(table | ObjectRef) ─► ray.put once ─► every rank takes its groups ─► metrics
      ├─ weight_buckets(bytes) / publish_weights(bytes, sink) ─► versioned named-tensor buckets
      └─ save_checkpoint / load_checkpoint / export_hf ─► run on all ranks (collectives)

Every remote call waits at most ``trainer.timeout_s``; a failure or timeout raises a
RuntimeError naming the actor, the rank, the call and the step. After such an error the
process group may be stuck: ``shutdown()`` the group and build a new one.

>>> group = TrainerGroup(TrainerConfig(num_workers=2), "path/to/hf_model")  # doctest: +SKIP
>>> metrics = group.train_step(table)            # pa.Table of SAMPLE_SCHEMA  # doctest: +SKIP
>>> buckets = group.weight_buckets(64 << 20)     # [WeightBucket(version=1, ...)]  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import torch
from slime_rl.trainer.config import TrainerConfig
from slime_rl.trainer.weights import WeightBucket
from slime_rl.trainer.worker import TrainerWorker, model_dir

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

    def _wait(self, refs: list, what: str) -> list:
        """ray.get with trainer.timeout_s; the first failure or a timeout names the actor and step."""
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        pending = {ref: rank for rank, ref in enumerate(refs)}
        results: dict[int, Any] = {}
        deadline = time.monotonic() + self.cfg.timeout_s
        while pending:
            left = deadline - time.monotonic()
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(left, 0.0))
            if not ready:
                ranks = sorted(pending.values())
                raise RuntimeError(
                    f"{what} at trainer step {self.step + 1}: no answer from {', '.join(self._actor_name(r) for r in ranks)} "
                    f"within trainer.timeout_s={self.cfg.timeout_s}s"
                )
            for ref in ready:
                rank = pending.pop(ref)
                try:
                    results[rank] = ray.get(ref)
                except (RayTaskError, RayActorError) as e:
                    cause = getattr(e, "cause", None) if isinstance(e, RayTaskError) else None
                    reason = f"{type(cause).__name__}: {cause}" if cause is not None else str(e)
                    raise RuntimeError(
                        f"{what} failed on {self._actor_name(rank)} at trainer step {self.step + 1}: {reason}"
                    ) from e
        return [results[r] for r in range(len(refs))]

    def _call_all(self, method: str, *args: Any) -> list:
        refs = [getattr(a, method).remote(*args) for a in self.actors]
        return self._wait(refs, method)

    def _call_one(self, rank: int, method: str, *args: Any) -> Any:
        return self._wait([getattr(self.actors[rank], method).remote(*args)], method)[0]

    # -- public API --------------------------------------------------------------------------
    def train_step(self, table: pa.Table | Any) -> dict[str, float]:
        """One train step on a global batch of whole groups (a pa.Table or an ObjectRef to one)."""
        import ray

        ref = table if isinstance(table, ray.ObjectRef) else ray.put(table)
        metrics = self._call_all("train_step", ref)[0]
        self.step = int(metrics["train/step"])
        self.version = int(metrics["train/version"])
        return metrics

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

    def save_checkpoint(self, path: str) -> str:
        return self._call_all("save_checkpoint", str(path))[0]

    def load_checkpoint(self, path: str) -> dict[str, int]:
        out = self._call_all("load_checkpoint", str(path))[0]
        self.step, self.version = out["step"], out["version"]
        return out

    def export_hf(self, out_dir: str) -> str:
        return self._call_all("export_hf", str(out_dir))[0]

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
