"""Run checkpoints: what is saved so a killed run resumes where it stopped and loses no sample.

    <run_dir>/checkpoints/step_NNNNNN/
        trainer/          weights, optimizer, LR schedule, RNG, step and version (every rank)
        buffer/           the buffer's unconsumed groups (Arrow)
        run_state.json    step, version, mode, global_batch_groups, wall seconds, and the
                          rollout side's state: dataset cursor, admission counts, the groups in
                          flight (re-dispatched under the same ids on resume)

A checkpoint is written to `.step_NNNNNN.tmp` and renamed into place, so a crash mid-write
leaves the previous one usable. The driver writes the periodic one *before* publishing the
step's version: no group of that version exists yet, so on resume every one comes from the
restored weights, which `restore` pushes to the engines (slime #1695). Admission counts are
re-seeded from the checkpoint (AReaL #1388), the buffer keeps its groups (OpenRLHF #1322), and
the cursor continues the data order (slime #1558, verl #7401).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import ray

from slime_rl.config import Config
from slime_rl.errors import RunError, describe_error

logger = logging.getLogger(__name__)

RUN_STATE = "run_state.json"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run directory, oldest first."""
    root = Path(run_dir) / "checkpoints"
    return sorted(p for p in root.glob("step_*") if (p / RUN_STATE).exists()) if root.exists() else []


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run directory (`checkpoints/step_NNNNNN`), or None."""
    found = list_checkpoints(Path(run_dir))
    return found[-1] if found else None


def resume_point(cfg: Config) -> Path | None:
    """The checkpoint `checkpoint.resume` names (`auto`: the newest in the run directory), or None.

    Raises:
        RunError: an explicit path that is not a run checkpoint.
    """
    resume = cfg.checkpoint.resume
    if not resume:
        return None
    if resume == "auto":
        found = latest_checkpoint(cfg.run_dir)
        if found is None:
            logger.info("checkpoint.resume=auto: no checkpoint in %s, starting fresh", cfg.run_dir)
        return found
    path = Path(resume)
    if not (path / RUN_STATE).exists():
        raise RunError(f"checkpoint.resume={resume!r} is not a run checkpoint (no {RUN_STATE})")
    return path


class RunCheckpoints:
    """Writes and restores the checkpoints of one run (its actors: `RunActors`)."""

    def __init__(self, cfg: Config, actors: Any) -> None:
        self.cfg = cfg
        self.actors = actors
        self.run_dir = cfg.run_dir
        self.rollout_name = f"{cfg.run.name}-rollout"
        self.buffer_name = f"{cfg.run.name}-buffer"

    def _get(self, ref: Any, actor: str, what: str, step: int) -> Any:
        try:
            return ray.get(ref)
        except Exception as e:
            raise RunError(f"step {step}: {what} on {actor} failed: {describe_error(e)}") from e

    def save(self, step: int, version: int, wall_s: float, final: bool = False) -> Path:
        """Write `checkpoints/step_<step>` (and, when `final`, the HF export); keep the newest
        `checkpoint.keep_last`. A step already saved is not written twice."""
        a = self.actors
        root = self.run_dir / "checkpoints"
        final_dir = root / f"step_{step:06d}"
        if (final_dir / RUN_STATE).exists():  # the last step was also a periodic checkpoint
            if final:
                self.export_final_hf()
            return final_dir
        tmp = root / f".step_{step:06d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        t0 = time.monotonic()
        if a.trainer is not None:
            a.trainer.save_checkpoint(str(tmp / "trainer"))
        rollout_state = None
        if a.manager is not None:
            rollout_state = self._get(a.manager.snapshot.remote(str(tmp)), self.rollout_name, "snapshot", step)
        state = {
            "step": step, "version": version, "rollout": rollout_state, "mode": self.cfg.run.mode,
            "num_steps": self.cfg.run.num_steps, "global_batch_groups": self.cfg.trainer.global_batch_groups,
            "wall_s": wall_s,
        }
        if rollout_state is not None:  # where the buffer will be once the folder is renamed into place
            rollout_state["buffer"] = str(final_dir / "buffer")
        (tmp / RUN_STATE).write_text(json.dumps(state, indent=1, default=str))
        shutil.rmtree(final_dir, ignore_errors=True)
        tmp.rename(final_dir)
        for old in list_checkpoints(self.run_dir)[: -self.cfg.checkpoint.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        if final:
            self.export_final_hf()
        logger.info("checkpoint step %d written in %.1f s: %s", step, time.monotonic() - t0, final_dir)
        return final_dir

    def export_final_hf(self) -> None:
        if self.cfg.checkpoint.save_hf and self.actors.trainer is not None:
            # LoRA: final_hf/ is the PEFT adapter folder, final_hf/merged/ the merged model
            merged = self.cfg.checkpoint.save_hf_merged and self.cfg.trainer.lora.rank > 0
            self.actors.trainer.export_hf(str(self.run_dir / "final_hf"), merged)

    def restore(self, path: Path) -> dict[str, Any]:
        """Load a run checkpoint into the actors: trainer (weights, optimizer, LR schedule, RNG,
        step and version), buffer, dataset cursor, admission counts and in-flight groups.
        The caller then publishes the restored version to the engines.

        Returns:
            {"step": int, "version": int, "wall_s": float}
        Raises:
            RunError: the checkpoint does not fit this run (batch size) or is inconsistent.
        """
        a, B = self.actors, self.cfg.trainer.global_batch_groups
        state = json.loads((path / RUN_STATE).read_text())
        saved_b = int(state.get("global_batch_groups", state.get("batch_groups", B)))
        if saved_b != B:
            raise RunError(f"checkpoint {path} was written with trainer.global_batch_groups={saved_b}, "
                           f"this run has {B}: the staleness accounting would not match; resume with the same value")
        if state.get("mode", self.cfg.run.mode) != self.cfg.run.mode:
            logger.warning("checkpoint %s was written in run.mode=%s, resuming in %s", path, state["mode"], self.cfg.run.mode)
        step, version = int(state["step"]), int(state["version"])
        if a.trainer is not None:
            a.trainer.load_checkpoint(str(path / "trainer"))
            if a.trainer.version != version:
                raise RunError(f"checkpoint {path}: the trainer state holds version {a.trainer.version} but "
                               f"{RUN_STATE} {version}; the checkpoint is inconsistent")
        if a.manager is not None and state.get("rollout"):
            self._get(a.buffer.load.remote(str(path / "buffer")), self.buffer_name, "load", step + 1)
            self._get(a.manager.restore.remote(state["rollout"]), self.rollout_name, "restore", step + 1)
        logger.info("resumed from %s at step %d (version %d)", path, step, version)
        return {"step": step, "version": version, "wall_s": float(state.get("wall_s", 0.0))}

    def drop_samples_after(self, step: int) -> None:
        """On resume: batches saved after the checkpoint are trained again (maybe other groups), so
        the files of those steps go, as their metrics lines do."""
        from slime_rl.samples_io import saved_steps

        for s, path in saved_steps(self.run_dir / "samples").items():
            if s > step:
                path.unlink(missing_ok=True)
