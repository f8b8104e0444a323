"""Trainer checkpoints: sharded model + optimizer state, scheduler, counters and RNG.

    <dir>/dcp/            torch.distributed.checkpoint: policy (+ critic) weights and AdamW
                          state, written shard-by-shard by every rank (reshardable on load)
    <dir>/rank<r>.pt      per-rank: schedulers, step, version, torch CPU/CUDA RNG states
    <dir>/meta.json       step, version, world size (written by rank 0, last: its presence
                          marks a complete checkpoint)

Every rank calls ``save_checkpoint`` / ``load_checkpoint`` (collectives inside). Loading on
another world size works for weights and optimizer (DCP reshards); RNG comes from the same
rank's file when it exists, else rank 0's.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

if TYPE_CHECKING:
    from slime_rl.trainer.core import TrainerCore

logger = logging.getLogger(__name__)


def _app_state(core: TrainerCore) -> dict[str, Any]:
    model_sd, optim_sd = get_state_dict(core.policy, core.optimizer)
    state: dict[str, Any] = {"model": model_sd, "optim": optim_sd}
    if core.critic is not None:
        critic_sd, critic_optim_sd = get_state_dict(core.critic, core.critic_optimizer)
        state.update(critic=critic_sd, critic_optim=critic_optim_sd)
    return state


@contextlib.contextmanager
def _quiet_single_process(core: TrainerCore) -> Iterator[None]:
    """DCP warns that it assumes a single process when there is no process group: that is intended."""
    with warnings.catch_warnings():
        if not core.distributed:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _rng_state() -> dict[str, Any]:
    rng: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    return rng


def save_checkpoint(core: TrainerCore, path: str | Path) -> Path:
    """Write a checkpoint of ``core`` to folder ``path`` (every rank calls this)."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    with _quiet_single_process(core):
        dcp.save(_app_state(core), checkpoint_id=str(out / "dcp"), no_dist=not core.distributed)
    extra = {
        "scheduler": core.scheduler.state_dict(),
        "critic_scheduler": core.critic_scheduler.state_dict() if core.critic_scheduler is not None else None,
        "step": core.step,
        "version": core.version,
        "rng": _rng_state(),
    }
    torch.save(extra, out / f"rank{core.rank}.pt")
    core.barrier("save_checkpoint")
    if core.rank == 0:
        meta = {"step": core.step, "version": core.version, "world_size": core.world_size}
        (out / "meta.json").write_text(json.dumps(meta))
    logger.info("trainer rank %d saved checkpoint step %d to %s", core.rank, core.step, out)
    return out


def load_checkpoint(core: TrainerCore, path: str | Path) -> dict[str, int]:
    """Restore ``core`` from folder ``path`` (every rank calls this); returns step and version."""
    src = Path(path)
    if not (src / "meta.json").exists():
        raise ValueError(f"{src} is not a complete trainer checkpoint (no meta.json); pick a folder written by save_checkpoint")
    state = _app_state(core)
    with _quiet_single_process(core):
        dcp.load(state, checkpoint_id=str(src / "dcp"), no_dist=not core.distributed)
    set_state_dict(core.policy, core.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    if core.critic is not None:
        if "critic" not in state:
            raise ValueError(f"{src} has no critic state but trainer.advantage.estimator=gae needs one")
        set_state_dict(core.critic, core.critic_optimizer, model_state_dict=state["critic"], optim_state_dict=state["critic_optim"])
    rank_file = src / f"rank{core.rank}.pt"
    if not rank_file.exists():
        rank_file = src / "rank0.pt"
    extra = torch.load(rank_file, weights_only=False)
    core.scheduler.load_state_dict(extra["scheduler"])
    if core.critic_scheduler is not None and extra.get("critic_scheduler") is not None:
        core.critic_scheduler.load_state_dict(extra["critic_scheduler"])
    core.step = int(extra["step"])
    core.version = int(extra["version"])
    torch.set_rng_state(extra["rng"]["cpu"])
    if "cuda" in extra["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(extra["rng"]["cuda"])
    logger.info("trainer rank %d resumed step %d version %d from %s", core.rank, core.step, core.version, src)
    return {"step": core.step, "version": core.version}
