"""TrainerWorker: one Ray actor = one rank of the trainer's torch.distributed group.

    TrainerGroup ──address()──► rank 0 (picks MASTER_ADDR / a free port)
                 ──setup(addr, port)──► every rank: init_process_group (gloo on CPU, NCCL on
                                        GPU, with trainer.timeout_s) ─► TrainerCore (FSDP2)
                 ──train_step(global table or ObjectRef)──► every rank checks the global batch
                                        and takes its own whole groups of each mini-batch
                                        (split_batch(table, M, updates)[rank]) ─► metrics
                 ──weight_buckets / put_weight_buckets / publish_weights / save_checkpoint /
                   export_hf──► collectives on all ranks (rank 0 holds the result)
                 ──publish_weight_buckets(bytes, sink, dtype)──► gather bucket by bucket (LoRA:
                                        the adapter tensors, or merged weights); rank 0
                                        hands each to sink (ray.put, a file, a broadcast) ─►
                                        (handles, stats): 2 returns, handles go to the engines

Errors raised here name the rank and the step; the group adds the actor.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import torch
import torch.distributed as dist
from slime_rl.trainer.config import TrainerConfig
from slime_rl.trainer.core import TrainerCore, set_torch_threads
from slime_rl.trainer.lora import is_lora, publish_state
from slime_rl.trainer.weights import WeightBucket, iter_weight_buckets, weight_layout

if TYPE_CHECKING:
    import ray

logger = logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


class TrainerWorker:
    """Plain class; ``TrainerGroup`` turns it into a Ray actor with ``ray.remote(TrainerWorker)``."""

    def __init__(self, cfg: TrainerConfig, model_path: str, rank: int, world_size: int) -> None:
        self.cfg = cfg
        self.model_path = str(model_path)
        self.rank = rank
        self.world_size = world_size
        self.core: TrainerCore | None = None
        set_torch_threads(cfg.num_threads)  # also on GPU workers (their CPU-side ops)

    def node_info(self) -> dict[str, Any]:
        """Where this rank runs: `{"node_id", "node_ip", "pid"}`."""
        import ray

        return {"node_id": ray.get_runtime_context().get_node_id(), "node_ip": ray.util.get_node_ip_address(),
                "pid": os.getpid()}

    def address(self) -> tuple[str, int]:
        """This node's IP and a free TCP port (rank 0 hosts the rendezvous)."""
        import ray

        return ray.util.get_node_ip_address(), _free_port()

    def setup(self, master_addr: str, master_port: int) -> dict[str, Any]:
        """Join the process group and load the models; returns rank, device, step and version."""
        use_gpu = self.cfg.num_gpus_per_worker > 0
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port))
        dist.init_process_group(
            backend="nccl" if use_gpu else "gloo",
            init_method=f"tcp://{master_addr}:{master_port}",
            rank=self.rank,
            world_size=self.world_size,
            timeout=datetime.timedelta(seconds=self.cfg.timeout_s),
        )
        device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")
        if use_gpu:
            torch.cuda.set_device(device)
        self.core = TrainerCore(self.cfg, self.model_path, device)
        return self.status()

    def status(self) -> dict[str, Any]:
        core = self._core()
        return {"rank": self.rank, "device": str(core.device), "step": core.step, "version": core.version}

    def _core(self) -> TrainerCore:
        if self.core is None:
            raise RuntimeError(f"trainer worker rank {self.rank} is not set up; call setup() first")
        return self.core

    def train_step(self, table: pa.Table) -> dict[str, float]:
        """Train on this rank's share of the global batch ``table`` (whole groups); the core
        checks the whole table and takes its share, so every rank refuses a bad batch alike."""
        core = self._core()
        try:
            return core.train_step(table)
        except Exception as e:
            if str(e).startswith(f"trainer rank {self.rank} "):
                raise  # already names the rank and step
            raise RuntimeError(f"trainer rank {self.rank} step {core.step + 1}: {type(e).__name__}: {e}") from e

    def weight_buckets(self, bucket_bytes: int, include_tied: bool = False) -> list[WeightBucket] | None:
        """All buckets of the current weights on rank 0 (None elsewhere; every rank must be called)."""
        core = self._core()
        buckets = list(iter_weight_buckets(core.policy, core.version, bucket_bytes, include_tied,
                                           state=self._lora_state()))
        return buckets if self.rank == 0 else None

    def put_weight_buckets(self, bucket_bytes: int, include_tied: bool = False) -> list[ray.ObjectRef] | None:
        """Gather bucket by bucket; rank 0 ``ray.put``s each ``WeightBucket`` as soon as it is
        complete and returns the refs in bucket order (None elsewhere; every rank must be
        called). The tensors reach engines through the object store, never the driver."""
        import ray

        return self.publish_weight_buckets(bucket_bytes, ray.put, include_tied)[0]

    def gradients(self) -> dict[str, torch.Tensor] | None:
        """Full gradients of the last update on rank 0 (None elsewhere; every rank must be called)."""
        grads = self._core().gradients()
        return grads if self.rank == 0 else None

    def publish_weights(
        self, bucket_bytes: int, sink: Callable[[WeightBucket], Any], include_tied: bool = False
    ) -> int:
        """Gather bucket by bucket and call ``sink(bucket)`` on rank 0 only; returns the bucket count."""
        return int(self.publish_weight_buckets(bucket_bytes, sink, include_tied)[1]["buckets"])

    def publish_weight_buckets(
        self,
        bucket_bytes: int,
        sink: Callable[[WeightBucket], Any],
        include_tied: bool = False,
        dtype: str | None = None,
    ) -> tuple[list[Any] | None, dict[str, float]]:
        """Gather bucket by bucket (cast to ``dtype`` when given) and hand each to ``sink`` on
        rank 0 as soon as it is complete (every rank must be called: the gathers are
        collectives). Returns ``(handles, stats)``: what ``sink`` returned per bucket, in bucket
        order, on rank 0 (None elsewhere), and seconds gathering (``gather_s``) and in the sink
        (``hand_off_s``), ``bytes`` and ``buckets``. Call it with ``num_returns=2`` so the
        handles can go to the engines while the stats go to the driver."""
        core = self._core()
        handles: list[Any] = []
        t0, sink_s, nbytes, count = time.perf_counter(), 0.0, 0, 0
        for bucket in iter_weight_buckets(core.policy, core.version, bucket_bytes, include_tied, dtype,
                                          self._lora_state()):
            count += 1
            if self.rank == 0:
                t1 = time.perf_counter()
                handles.append(sink(bucket))
                sink_s += time.perf_counter() - t1
                nbytes += bucket.nbytes
            del bucket  # (a gathered bucket is freed before the next one is made)
        stats = {"gather_s": time.perf_counter() - t0 - sink_s, "hand_off_s": sink_s, "bytes": float(nbytes),
                 "buckets": float(count)}
        self._publish_stats = stats
        return (handles if self.rank == 0 else None), stats

    def weight_layout(
        self, bucket_bytes: int, include_tied: bool = False, dtype: str | None = None
    ) -> list[list[tuple[str, tuple[int, ...], str]]]:
        """``(name, shape, dtype)`` per tensor per bucket of a publish, without gathering (any rank)."""
        return weight_layout(self._core().policy, bucket_bytes, include_tied, dtype, self._lora_state(shapes_only=True))

    def _lora_state(self, shapes_only: bool = False) -> dict[str, torch.Tensor] | None:
        """With LoRA, what a publish ships (``trainer.lora.publish``: the adapter tensors, or the
        merged weights); None without LoRA (the full state dict)."""
        policy = self._core().policy
        if not is_lora(policy):
            return None
        return publish_state(policy, self.cfg.lora.publish, shapes_only)

    def weight_publish_stats(self) -> dict[str, float]:
        """Stats of the last publish on this rank (see ``publish_weight_buckets``)."""
        return dict(getattr(self, "_publish_stats", {}))

    def save_checkpoint(self, path: str) -> str:
        return str(self._core().save_checkpoint(path))

    def load_checkpoint(self, path: str) -> dict[str, int]:
        return self._core().load_checkpoint(path)

    def export_hf(self, out_dir: str, merged: bool = False) -> str | None:
        """HF export of the policy (LoRA: the PEFT adapter folder, + ``<out_dir>/merged`` when ``merged``)."""
        out = self._core().export_hf(out_dir, merged)
        return str(out) if out is not None else None

    def set_version(self, version: int) -> None:
        """Start counting policy versions from ``version`` (e.g. to match a resumed run)."""
        self._core().version = int(version)

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def model_dir(path: str | Path) -> str:
    """Absolute model folder path, checked to exist (actors may run in another working dir)."""
    p = Path(path).expanduser().resolve()
    if not (p / "config.json").exists():
        raise ValueError(f"model.path={path!s} has no config.json; point it at an HF model folder")
    return str(p)
