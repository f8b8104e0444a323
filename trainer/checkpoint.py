"""Trainer checkpoints: sharded model + optimizer state, scheduler, counters and RNG.

    <dir>/dcp/            torch.distributed.checkpoint: policy (+ critic) weights and AdamW
                          state, written shard-by-shard by every rank (reshardable on load)
    <dir>/rank<r>.pt      per-rank: schedulers, step, version, RNG states (torch CPU/CUDA,
                          numpy, python ``random``)
    <dir>/hf/             the policy as an HF folder (transformers / vLLM load it), unless
                          ``trainer.checkpoint_hf=false``; with LoRA a PEFT adapter folder

With LoRA (``trainer.lora``) ``dcp/`` holds the adapter and its optimizer state only: the
frozen base is the model folder's (``model.path``), which a resume loads again.
    <dir>/meta.json       step, version, world size (written by rank 0, last)

Atomic: everything is written to ``<dir>.tmp``; rank 0 then adds meta.json and renames the
folder to ``<dir>`` (an older checkpoint at ``<dir>`` is replaced only after the new one is
complete). A crash mid-save leaves at most a ``<dir>.tmp`` that ``load_checkpoint`` refuses.

Every rank calls ``save_checkpoint`` / ``load_checkpoint`` (collectives inside) and all ranks
must see the same file system. Loading on another world size works for weights and
optimizer (DCP reshards); RNG comes from the same rank's file when it exists, else rank 0's.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

if TYPE_CHECKING:
    from slime_rl.trainer.core import TrainerCore

logger = logging.getLogger(__name__)


def _policy_options(core: TrainerCore) -> StateDictOptions:
    """LoRA: the frozen base is left out (it is the model folder's), so the checkpoint holds the
    adapter and its optimizer state only."""
    from slime_rl.trainer.lora import is_lora

    lora = is_lora(core.policy)
    return StateDictOptions(ignore_frozen_params=lora, strict=not lora)


def _app_state(core: TrainerCore) -> dict[str, Any]:
    model_sd, optim_sd = get_state_dict(core.policy, core.optimizer, options=_policy_options(core))
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
    rng: dict[str, Any] = {"cpu": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    return rng


def _set_rng_state(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["cpu"])
    if "numpy" in rng:
        np.random.set_state(rng["numpy"])
    if "python" in rng:
        random.setstate(rng["python"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])


def _tmp_path(out: Path) -> Path:
    return out.with_name(out.name + ".tmp")


def save_checkpoint(core: TrainerCore, path: str | Path, hf: bool | None = None) -> Path:
    """Write a checkpoint of ``core`` to folder ``path`` atomically (every rank calls this).

    ``hf`` (default ``trainer.checkpoint_hf``) adds ``<path>/hf``, an HF export of the policy.
    """
    from slime_rl.trainer.lora import export_policy_hf

    out = Path(path)
    tmp = _tmp_path(out)
    if core.rank == 0 and tmp.exists():
        shutil.rmtree(tmp)  # debris of an earlier crashed save
    core.barrier("save_checkpoint (start)")
    tmp.mkdir(parents=True, exist_ok=True)
    with _quiet_single_process(core):
        dcp.save(_app_state(core), checkpoint_id=str(tmp / "dcp"), no_dist=not core.distributed)
    extra = {
        "scheduler": core.scheduler.state_dict(),
        "critic_scheduler": core.critic_scheduler.state_dict() if core.critic_scheduler is not None else None,
        "step": core.step,
        "version": core.version,
        "rng": _rng_state(),
    }
    torch.save(extra, tmp / f"rank{core.rank}.pt")
    if core.cfg.checkpoint_hf if hf is None else hf:
        export_policy_hf(core.policy, tmp / "hf", core.model_path, write=core.rank == 0)  # collective
    core.barrier("save_checkpoint (written)")
    if core.rank == 0:
        meta = {"step": core.step, "version": core.version, "world_size": core.world_size}
        (tmp / "meta.json").write_text(json.dumps(meta))
        old = out.with_name(out.name + ".old")
        if out.exists():
            if old.exists():
                shutil.rmtree(old)
            out.rename(old)
        tmp.rename(out)  # atomic on one file system: <path> is complete or absent
        if old.exists():
            shutil.rmtree(old)
    core.barrier("save_checkpoint (renamed)")
    logger.info("trainer rank %d saved checkpoint step %d to %s", core.rank, core.step, out)
    return out


def load_checkpoint(core: TrainerCore, path: str | Path) -> dict[str, int]:
    """Restore ``core`` from folder ``path`` (every rank calls this); returns step and version."""
    src = Path(path)
    if not (src / "meta.json").exists():
        hint = f" ({_tmp_path(src)} exists: a save was interrupted)" if _tmp_path(src).exists() else ""
        raise ValueError(
            f"{src} is not a complete trainer checkpoint (no meta.json){hint}; pick a folder written by save_checkpoint"
        )
    state = _app_state(core)
    with _quiet_single_process(core):
        dcp.load(state, checkpoint_id=str(src / "dcp"), no_dist=not core.distributed)
    set_state_dict(core.policy, core.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=_policy_options(core))
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
    _set_rng_state(extra["rng"])
    logger.info("trainer rank %d resumed step %d version %d from %s", core.rank, core.step, core.version, src)
    return {"step": core.step, "version": core.version}
