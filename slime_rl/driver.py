"""The RL run: the rollout side and the trainer loop, joined by the buffer and the weight sync.

    rollout side (RolloutManagerActor, its own event loop; never stops in async mode):
        dataset ─► admission (staleness bound) ─► engines ─► rewards ─► filter ─► buffer.put
                                                    ▲
    trainer loop (this process):                    │ weights v (object store | collective | disk)
        for step in 1..N:                           │
            buffer.get_batch(B, v, S) ─(polls; checks the rollout side is alive)─► table
            trainer.train_step(table) ─► v += 1
            every weight_sync.interval steps: WeightSync.start(v)  (runs while the next step trains;
                                              the next sync first waits for this one)
            every eval.interval steps: manager.evaluate()  (results logged when they arrive,
                                              tagged with the version they ran on; never waited on)
            metrics (trainer + rollout window + buffer + sync) ─► MetricsLogger (JSONL, PNG, wandb)
            every checkpoint.interval steps: trainer + rollout snapshot (buffer, cursor, in-flight
                                              groups) + run state, written atomically

`run.mode: sync` is the same loop with `max_staleness = 0`: no group starts before the weights it
will be trained against are loaded, so generation and training alternate. Any failure (an actor
died, a sync timed out, the rollout side stopped) ends the run within seconds with the actor and
step named; every actor of the run is shut down on exit, also on error or Ctrl-C.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from slime_rl.config import Config
from slime_rl.metrics import MetricsLogger
from slime_rl.run_actors import RunActors
from slime_rl.weight_sync import PendingSync

logger = logging.getLogger(__name__)

POLL_S = 2.0
"""How often a wait on the buffer checks that the rollout side is alive."""

HEADLINE = {
    "policy_version": "train/version",
    "reward_mean": "train/reward_mean",
    "response_len_mean": "train/response_len",
    "loss": "train/loss",
    "grad_norm": "train/grad_norm",
    "lr": "train/lr",
    "staleness_mean": "buffer/batch_staleness_mean",
    "staleness_max": "buffer/batch_staleness_max",
    "rollout_idle_frac": "rollout/engine_idle_frac",
}
"""Unprefixed keys every metrics line carries (what users grep first) -> their source metric."""


class RunError(RuntimeError):
    """The run stopped; the message names the actor, the step and the cause."""


def _checkpoints(run_dir: Path) -> list[Path]:
    root = run_dir / "checkpoints"
    return sorted(p for p in root.glob("step_*") if (p / "run_state.json").exists()) if root.exists() else []


class Driver:
    """One run of `Config`: `run()` trains, logs, checkpoints and always shuts its actors down."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.run_dir = cfg.run_dir
        self.actors: RunActors | None = None
        self.log: MetricsLogger | None = None
        self.step = 0
        self.version = 0
        self.S = cfg.max_staleness()
        self.B = cfg.trainer.global_batch_groups
        self._sync: PendingSync | None = None
        self._last_sync: dict[str, float] = {}
        self._evals: list[tuple[int, Any]] = []
        self._stop_requested = False
        self._t_start = time.monotonic()

    # ---- entry ---------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Run to `run.num_steps`; returns the summary. Raises RunError on failure."""
        cfg = self.cfg
        previous = signal.getsignal(signal.SIGINT)
        signal.signal(signal.SIGINT, self._on_sigint)
        try:
            self.actors = RunActors.start(cfg)
            resume_from = self._resume_point()
            start_step = self._restore(resume_from) if resume_from else 0
            self.log = MetricsLogger(
                self.run_dir, cfg.run.num_steps, start_step=start_step, wandb_mode=cfg.logging.wandb_mode,
                wandb_project=cfg.logging.wandb_project, run_name=cfg.run.name, config=_plain_config(cfg),
                progress=cfg.logging.progress, plot_every=cfg.logging.plot_every, resume=resume_from is not None,
            )
            self._train(start_step)
            summary = self.log.close()
            table = self.log.summary_table()
            self.log = None
            return {"summary": summary, "table": table, "run_dir": str(self.run_dir)}
        finally:
            signal.signal(signal.SIGINT, previous)
            if self.log is not None:
                self.log.close(exit_code=1)
            if self.actors is not None:
                self.actors.shutdown()

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self._stop_requested:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        self._stop_requested = True
        logger.warning("Ctrl-C: finishing the current step, then checkpoint and shut down (Ctrl-C again to abort)")

    # ---- the loop ------------------------------------------------------------------------------
    def _train(self, start_step: int) -> None:
        cfg, a = self.cfg, self.actors
        if cfg.run.rollout_only:
            return self._rollout_only(start_step)
        if cfg.run.train_only:
            return self._train_only(start_step)
        self._queue_eval()  # version of the starting weights
        ray.get(a.manager.start.remote())
        last_done = time.monotonic()
        for step in range(start_step + 1, cfg.run.num_steps + 1):
            t0 = time.monotonic()
            table = self._next_batch()
            waited = time.monotonic() - t0
            metrics = a.trainer.train_step(table)
            self.step, self.version = step, a.trainer.version
            if step % cfg.weight_sync.interval == 0 or step == cfg.run.num_steps:
                self._publish()
            if cfg.eval.interval and step % cfg.eval.interval == 0 and step != cfg.run.num_steps:
                self._queue_eval(wait_sync=True)
            metrics.update(ray.get(a.manager.metrics.remote()))
            metrics.update(ray.get(a.buffer.stats.remote()))
            now = time.monotonic()
            self._log_step(step, table, metrics, now - last_done, waited)
            last_done = now
            self._drain_evals(block=False)
            if cfg.logging.save_samples:
                self._save_samples(step, table)
            if cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0:
                self._checkpoint()
            if self._stop_requested:
                logger.warning("stopping after step %d as asked", step)
                break
        self._finish()

    def _finish(self) -> None:
        if self._sync is not None:
            self._last_sync = self._sync.wait()
        if self.cfg.data.eval_path:
            self._queue_eval(wait_sync=True)
        self._drain_evals(block=True)
        if self.step:
            self._checkpoint(final=True)

    def _next_batch(self) -> pa.Table:
        """B groups within the staleness bound; polls so a dead rollout side stops the run quickly."""
        a = self.actors
        deadline = time.monotonic() + self.cfg.buffer.get_timeout_s
        from slime_rl.buffers.errors import BufferTimeoutError

        while True:
            ref = a.buffer.get_batch.remote(self.B, self.version, self.S, POLL_S)
            try:
                return ray.get(ref)
            except BufferTimeoutError:
                pass
            status = a.check_rollout(self.step + 1)
            if time.monotonic() > deadline:
                raise RunError(
                    f"step {self.step + 1}: no batch of {self.B} groups within staleness {self.S} of version "
                    f"{self.version} after {self.cfg.buffer.get_timeout_s:.0f} s (buffer.get_timeout_s); rollout side: "
                    f"{status}; if rollout.filter drops most groups the reward may be constant"
                )
            if self._stop_requested:
                raise KeyboardInterrupt

    def _publish(self) -> None:
        """Start syncing the current weights; the previous sync must have finished first."""
        if self._sync is not None:
            self._last_sync = self._sync.wait()
        self._sync = self.actors.weight_sync.start(self.version)
        if self.cfg.run.mode == "sync":
            self._last_sync = self._sync.wait()

    # ---- eval ----------------------------------------------------------------------------------
    def _queue_eval(self, wait_sync: bool = False) -> None:
        if not self.cfg.data.eval_path:
            return
        if wait_sync and self._sync is not None:  # evaluate the weights just published
            self._last_sync = self._sync.wait()
        self._evals.append((self.step, self.actors.manager.evaluate.remote()))

    def _drain_evals(self, block: bool) -> None:
        keep = []
        for step, ref in self._evals:
            ready, _ = ray.wait([ref], timeout=None if block else 0)
            if not ready:
                keep.append((step, ref))
                continue
            result = ray.get(ref)
            if result and self.log is not None:
                self.log.log_eval(step, result)
                logger.info("eval at step %d (version %d): accuracy %.3f", step, int(result.get("eval/version", -1)),
                            result.get("eval/accuracy", float("nan")))
        self._evals = keep

    # ---- metrics and samples -------------------------------------------------------------------
    def _log_step(self, step: int, table: pa.Table, metrics: dict[str, float], wall: float, waited: float) -> None:
        samples = table.num_rows
        tokens = metrics.get("train/tokens", 0.0)
        out = dict(metrics)
        out.update(self._last_sync)
        for key, src in HEADLINE.items():
            if src in metrics:
                out[key] = metrics[src]
        out.update(
            samples=float(samples),
            weight_sync_s=self._last_sync.get("weight_sync/seconds", float("nan")),
            step_time_s=wall,
            samples_per_s=samples / max(wall, 1e-9),
            tokens_per_s=tokens / max(wall, 1e-9),
            trainer_idle_frac=min(1.0, waited / max(wall, 1e-9)),
        )
        out["perf/samples_per_s"] = out["samples_per_s"]
        out["perf/tokens_per_s"] = out["tokens_per_s"]
        out["perf/trainer_idle_frac"] = out["trainer_idle_frac"]
        if "rollout_idle_frac" in out:
            out["perf/rollout_idle_frac"] = out["rollout_idle_frac"]
        self.log.log(step, out)

    def _save_samples(self, step: int, table: pa.Table) -> None:
        from slime_rl.samples_io import readable_samples

        folder = self.run_dir / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".step_{step:06d}.tmp"
        pq.write_table(readable_samples(table, self.actors.tokenizer), tmp)
        tmp.rename(folder / f"step_{step:06d}.parquet")

    # ---- debug modes ---------------------------------------------------------------------------
    def _rollout_only(self, start_step: int) -> None:
        """Generate and score `num_steps` batches into samples/ (no trainer; versions stay 0)."""
        a = self.actors
        ray.get(a.manager.start.remote())
        for step in range(start_step + 1, self.cfg.run.num_steps + 1):
            t0 = time.monotonic()
            table = self._next_batch()
            ray.get(a.manager.open_slots.remote(step))
            self.step = step
            self._save_samples(step, table)
            metrics = ray.get(a.manager.metrics.remote())
            metrics.update(ray.get(a.buffer.stats.remote()))
            self._log_step(step, table, metrics, time.monotonic() - t0, 0.0)

    def _train_only(self, start_step: int) -> None:
        """Train on saved batches (`run.train_only` folder of step_*.parquet), no engines."""
        from slime_rl.samples_io import read_batch

        files = sorted(Path(self.cfg.run.train_only).glob("step_*.parquet"))
        if not files:
            raise RunError(f"run.train_only={self.cfg.run.train_only!r} holds no step_*.parquet files")
        for step in range(start_step + 1, self.cfg.run.num_steps + 1):
            t0 = time.monotonic()
            table = read_batch(files[(step - 1) % len(files)])
            metrics = self.actors.trainer.train_step(table)
            self.step, self.version = step, self.actors.trainer.version
            self._log_step(step, table, metrics, time.monotonic() - t0, 0.0)
            if self.cfg.checkpoint.interval and step % self.cfg.checkpoint.interval == 0:
                self._checkpoint()
        self._checkpoint(final=True)

    # ---- checkpoints ---------------------------------------------------------------------------
    def _resume_point(self) -> Path | None:
        resume = self.cfg.checkpoint.resume
        if not resume:
            return None
        if resume == "auto":
            found = _checkpoints(self.run_dir)
            if not found:
                logger.info("checkpoint.resume=auto: no checkpoint in %s, starting fresh", self.run_dir)
                return None
            return found[-1]
        path = Path(resume)
        if not (path / "run_state.json").exists():
            raise RunError(f"checkpoint.resume={resume!r} is not a run checkpoint (no run_state.json)")
        return path

    def _checkpoint(self, final: bool = False) -> Path:
        a, step = self.actors, self.step
        root = self.run_dir / "checkpoints"
        final_dir = root / f"step_{step:06d}"
        if (final_dir / "run_state.json").exists():
            return final_dir
        tmp = root / f".step_{step:06d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        t0 = time.monotonic()
        if a.trainer is not None:
            a.trainer.save_checkpoint(str(tmp / "trainer"))
        rollout_state = ray.get(a.manager.snapshot.remote(str(tmp))) if a.manager is not None else None
        state = {
            "step": step, "version": self.version, "rollout": rollout_state, "mode": self.cfg.run.mode,
            "wall_s": time.monotonic() - self._t_start,
        }
        (tmp / "run_state.json").write_text(json.dumps(state, indent=1, default=str))
        shutil.rmtree(final_dir, ignore_errors=True)
        tmp.rename(final_dir)
        for old in _checkpoints(self.run_dir)[: -self.cfg.checkpoint.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        if final and self.cfg.checkpoint.save_hf and a.trainer is not None:
            a.trainer.export_hf(str(self.run_dir / "final_hf"))
        logger.info("checkpoint step %d written in %.1f s: %s", step, time.monotonic() - t0, final_dir)
        return final_dir

    def _restore(self, path: Path) -> int:
        a = self.actors
        state = json.loads((path / "run_state.json").read_text())
        if a.trainer is not None:
            a.trainer.load_checkpoint(str(path / "trainer"))
        self.step, self.version = int(state["step"]), int(state["version"])
        if a.manager is not None and state.get("rollout"):
            ray.get(a.buffer.load.remote(str(path / "buffer")))
            ray.get(a.manager.restore.remote(state["rollout"]))
            if self.version:  # the engines must serve the restored policy, not the initial one
                self._last_sync = a.weight_sync.start(self.version).wait()
        logger.info("resumed from %s at step %d (version %d)", path, self.step, self.version)
        return self.step


def _plain_config(cfg: Config) -> dict[str, Any]:
    import dataclasses

    from omegaconf import OmegaConf

    from slime_rl.rewards import redacted

    return OmegaConf.to_container(OmegaConf.structured(dataclasses.replace(cfg, reward=redacted(cfg.reward))))
