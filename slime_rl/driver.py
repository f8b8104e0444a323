"""The RL run: the trainer loop in this process, the rollout side in its actors.

The async design (every loop, what it consumes, waits on and what wakes it) is drawn once, in
docs/design.md. This module is the trainer loop and its neighbours:

    for step in 1..N:
        buffer.take_batch(B, v, S) ─(polled; checks the rollout side is alive)─► batch ref
        trainer.train_step(batch ref) ─► v += 1          (the Arrow batch never passes through here)
        metrics (trainer + rollout window + buffer + sync) ─► MetricsLogger (JSONL, PNG, wandb)
        every checkpoint.interval steps: RunCheckpoints.save (before v is published)
        every weight_sync.interval steps: WeightSync.publish(v) (the engines load while step v+1
                                          trains; the next publish waits for this one)
        every eval.interval steps: manager.evaluate() once the engines hold v (never waited for)
    end: wait for the last sync ─► eval of the final weights ─► final checkpoint

`run.mode: sync` is the same loop with `max_staleness = 0` and every sync waited for at once.

Failure: any failure (an actor died, a call or a sync timed out, the rollout side stopped) ends
the run within seconds as `RunError` naming the actor and the step; every remote call has a
timeout. Ctrl-C (or SIGTERM): the step being trained finishes, then the final sync, checkpoint
and metrics flush; a second Ctrl-C kills every actor at once. Every actor of the run is shut
down on exit, and a local cluster the run started goes with it (`slime_rl.cluster`).
Checkpoints and resume: `slime_rl.checkpoints`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from slime_rl.checkpoints import RunCheckpoints, latest_checkpoint, resume_point
from slime_rl.config import Config
from slime_rl.errors import CALL_TIMEOUT_S, RunError, describe_error
from slime_rl.metrics import METRICS_FILE, MetricsLogger
from slime_rl.run_actors import RunActors
from slime_rl.weight_sync import PendingSync, WeightSyncError

__all__ = ["Driver", "RunError", "latest_checkpoint"]

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
    "samples": "perf/samples",
    "step_time_s": "perf/step_time_s",
    "samples_per_s": "perf/samples_per_s",
    "tokens_per_s": "perf/tokens_per_s",
    "trainer_idle_frac": "perf/trainer_idle_frac",
    "rollout_idle_frac": "rollout/engine_idle_frac",
    "weight_sync_s": "weight_sync/seconds",
}
"""Unprefixed headline keys every metrics line carries (what users grep first) -> the one metric
each is an alias of (docs/run.md lists them). Every other metric has only its slash name."""


class Driver:
    """One run of `Config`: `run()` trains, logs, checkpoints and always shuts its actors down.

    Example:
        >>> result = Driver(load_config("run.yaml")).run()   # doctest: +SKIP
        >>> result["interrupted"], result["run_dir"]          # doctest: +SKIP
        (False, 'runs/slime-run')
    """

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.run_dir = cfg.run_dir
        self.actors: RunActors | None = None
        self.log: MetricsLogger | None = None
        self.step = 0
        self.version = 0
        self.max_staleness = cfg.max_staleness()
        self.global_batch_groups = cfg.trainer.global_batch_groups
        self._sync: PendingSync | None = None
        self._last_sync: dict[str, float] = {}
        self._evals: list[tuple[int, Any]] = []
        self._eval_due: list[int] = []
        """Steps whose eval waits for the weight sync in flight (it must evaluate those weights)."""
        self._stop_requested = False
        self._abort = False
        self._t_start = time.monotonic()
        self._wall_before = 0.0
        """Wall seconds of the sessions before a resume (from the checkpoint)."""
        self.checkpoints: RunCheckpoints | None = None
        self._fleet_changes: int | None = None
        self._engines_lost_at_publish = 0

    # ---- entry ---------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Run to `run.num_steps` (or until Ctrl-C); returns the summary.

        Returns:
            {"summary": Summary, "table": str, "run_dir": str, "interrupted": bool, "last_step": int};
            `interrupted` is True when a Ctrl-C stopped the run early (after a final checkpoint).
        Raises:
            RunError: an actor died, a call timed out, or a checkpoint cannot be used; the message
                names the actor (or file), the step and the cause.
            KeyboardInterrupt: a second Ctrl-C (every actor killed at once, no checkpoint).
        """
        cfg = self.cfg
        in_main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, self._on_sigint) if in_main else None
        try:
            self.actors = RunActors.start(cfg)
            self.checkpoints = RunCheckpoints(cfg, self.actors)
            resume_from = resume_point(cfg)
            start_step = self._restore(resume_from) if resume_from else 0
            self.log = MetricsLogger(
                self.run_dir, cfg.run.num_steps, start_step=start_step, wandb_mode=cfg.logging.wandb_mode,
                wandb_project=cfg.logging.wandb_project, run_name=cfg.run.name, config=_plain_config(cfg),
                progress=cfg.logging.progress, plot_every=cfg.logging.plot_every, resume=resume_from is not None,
            )
            if resume_from is not None:
                self.checkpoints.drop_samples_after(start_step)
            self._train(start_step, resumed=resume_from is not None)
            summary = self.log.close(exit_code=130 if self._stop_requested else 0)
            table = self.log.summary_table()
            self.log = None
            return {"summary": summary, "table": table, "run_dir": str(self.run_dir),
                    "interrupted": self._stop_requested, "last_step": self.step}
        except KeyboardInterrupt:
            self._abort = True
            raise
        except NoEnginesError as e:
            raise RunError(f"{e}; {self._checkpoint_after_failure()}") from e
        except RunError:
            raise
        except Exception as e:
            raise RunError(f"step {self.step + 1}: {describe_error(e)}") from e
        finally:
            if self.log is not None:
                self.log.close(exit_code=1)
            if self.actors is not None:
                self.actors.shutdown(graceful=not self._abort)
            if previous is not None:
                signal.signal(signal.SIGINT, previous)

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self._stop_requested:  # second Ctrl-C: stop now
            self._abort = True
            raise KeyboardInterrupt
        self._stop_requested = True
        logger.warning("Ctrl-C: finishing the current step, then checkpoint and shut down (Ctrl-C again to abort)")

    # ---- remote calls --------------------------------------------------------------------------
    def _get(self, ref: Any, actor: str, what: str, timeout: float | None = CALL_TIMEOUT_S) -> Any:
        """`ray.get` with a timeout; a failure names the actor, the call and the step."""
        try:
            return ray.get(ref, timeout=timeout)
        except Exception as e:
            raise RunError(f"step {self.step + 1}: {what} on {actor} failed: {describe_error(e)}") from e

    @property
    def _rollout_name(self) -> str:
        return f"{self.cfg.run.name}-rollout"

    @property
    def _buffer_name(self) -> str:
        return f"{self.cfg.run.name}-buffer"

    # ---- the loop ------------------------------------------------------------------------------
    def _train(self, start_step: int, resumed: bool = False) -> None:
        cfg, a = self.cfg, self.actors
        if cfg.run.rollout_only:
            return self._rollout_only(start_step)
        if cfg.run.train_only:
            return self._train_only(start_step)
        if start_step >= cfg.run.num_steps:
            logger.warning("the checkpoint is at step %d of run.num_steps=%d: nothing left to train (raise "
                           "run.num_steps to continue)", start_step, cfg.run.num_steps)
        if not (resumed and self._eval_logged_at(start_step)):
            self._queue_eval()  # the starting weights (after a resume: the restored ones)
        self._get(a.manager.start.remote(), self._rollout_name, "start")
        last_done = time.monotonic()
        for step in range(start_step + 1, cfg.run.num_steps + 1):
            if self._stop_requested:
                break
            t0 = time.monotonic()
            batch = self._next_batch()
            if batch is None:  # Ctrl-C while waiting: the groups stay buffered and are checkpointed
                break
            waited = time.monotonic() - t0
            metrics = a.trainer.train_step(batch.table_ref)
            self.step, self.version = step, a.trainer.version
            publish = step % cfg.weight_sync.interval == 0 or step == cfg.run.num_steps
            if publish:
                self._wait_sync()  # the previous sync (the next one waits for it anyway); its metrics go in this line
            metrics.update(self._get(a.manager.metrics.remote(), self._rollout_name, "metrics"))
            metrics.update(self._get(a.buffer.stats.remote(), self._buffer_name, "stats"))
            self._follow_fleet(a.check_rollout(step))
            now = time.monotonic()
            self._log_step(step, batch.num_samples, metrics, now - last_done, waited)
            last_done = now
            self._drain_evals(block=False)
            if cfg.logging.save_samples:
                self._save_samples(step, batch.table_ref)
            if cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0:
                # Before version `step` is published: no group of that version exists yet, so on
                # resume every one of them comes from the restored weights (pushed by _restore).
                self._checkpoint()
            if publish:
                self._publish()
            if cfg.eval.interval and step % cfg.eval.interval == 0 and step != cfg.run.num_steps:
                self._queue_eval()
            self._submit_due_evals()
        if self._stop_requested:
            logger.warning("stopped after step %d as asked (Ctrl-C); resume with checkpoint.resume=auto", self.step)
        self._finish()

    def _finish(self) -> None:
        """Final sync, final eval (not after Ctrl-C), final checkpoint."""
        self._wait_sync()
        if self._stop_requested:
            self._drain_evals(block=False)  # results already in; the others are not waited for
        else:
            if self.cfg.data.eval_path:
                self._queue_eval()  # after the final sync: the final weights
            self._submit_due_evals()
            self._drain_evals(block=True)
        if self.step:
            self._checkpoint(final=True)

    def _next_batch(self) -> BatchRef | None:
        """B groups within the staleness bound, or None after Ctrl-C. Polls, so a dead rollout side
        or buffer stops the run within seconds instead of an endless wait. Only the batch's
        summary comes here; the Arrow table stays in the object store for the trainer."""
        from slime_rl.buffers.errors import BufferTimeoutError

        a = self.actors
        deadline = time.monotonic() + self.cfg.buffer.get_timeout_s
        no_engines_since: float | None = None
        try:
            while True:
                info_ref, table_ref = a.buffer.take_batch.remote(self.global_batch_groups, self.version, self.max_staleness, POLL_S)
                try:
                    info = ray.get(info_ref, timeout=POLL_S + CALL_TIMEOUT_S)
                    return BatchRef(table_ref, int(info["num_samples"]), int(info["num_groups"]))
                except BufferTimeoutError:
                    pass
                except Exception as e:
                    raise RunError(f"step {self.step + 1}: get_batch on {self._buffer_name} failed: "
                                   f"{describe_error(e)}") from e
                status = a.check_rollout(self.step + 1)
                self._follow_fleet(status)
                if self._stop_requested:
                    return None
                now = time.monotonic()
                if status.get("engines_up", 1) == 0:  # waiting for capacity is not a stalled buffer
                    no_engines_since = no_engines_since or now
                    deadline = now + self.cfg.buffer.get_timeout_s
                    self.log.set_note(f"waiting: 0 engines for {now - no_engines_since:.0f} s")
                    if now - no_engines_since > self.cfg.rollout.no_engine_timeout_s:
                        raise NoEnginesError(
                            f"step {self.step + 1}: no rollout engine served for {now - no_engines_since:.0f} s "
                            f"(rollout.no_engine_timeout_s={self.cfg.rollout.no_engine_timeout_s:.0f}); target "
                            f"{status.get('engines_target')} engine(s), the cluster has no room for one"
                        )
                    continue
                no_engines_since = None
                self.log.set_note(None)
                if now > deadline:
                    raise RunError(
                        f"step {self.step + 1}: no batch of {self.global_batch_groups} groups within staleness {self.max_staleness} of version "
                        f"{self.version} after {self.cfg.buffer.get_timeout_s:.0f} s (buffer.get_timeout_s); rollout side: "
                        f"{', '.join(f'{k}={v}' for k, v in status.items())}; if rollout.filter drops most groups the reward "
                        "may be constant"
                    )
        finally:
            if self.log is not None:
                self.log.set_note(None)

    def _follow_fleet(self, status: dict[str, int]) -> None:
        """Engines came or went: rewrite actors.json; an engine waiting for weights (collective
        transport keeps none for latecomers) gets them now, by publishing the current version."""
        a = self.actors
        changes = status.get("fleet_changes")
        if changes is not None and changes != self._fleet_changes:
            self._fleet_changes = changes
            try:
                a.write_actors_json()
            except OSError as e:
                logger.warning("could not write actors.json: %s", e)
        if status.get("engines_need_weights") and a.weight_sync is not None and (self._sync is None or self._sync.done()):
            self._publish()

    def _publish(self) -> None:
        """Start syncing the current weights; the previous sync must have finished first."""
        self._wait_sync()
        self._submit_due_evals()  # an eval waiting for the previous weights goes before the new ones
        self._engines_lost_at_publish = self._engines_lost()
        try:
            self._sync = self.actors.weight_sync.publish(self.version)
        except WeightSyncError as e:
            raise RunError(f"step {self.step}: {e}") from e
        if self.cfg.run.mode == "sync":
            self._wait_sync()

    def _engines_lost(self) -> int:
        a = self.actors
        return int(a.check_rollout(self.step + 1).get("engines_lost", 0)) if a.manager is not None else 0

    def _wait_sync(self) -> None:
        if self._sync is None:
            return
        try:
            self._last_sync = self._sync.wait()
        except WeightSyncError as e:
            if self._engines_lost() == self._engines_lost_at_publish:
                raise RunError(f"step {self.step}: {e}") from e
            # An engine went away during the sync (a collective group then breaks): once more,
            # to the engines there are now.
            logger.warning("weight sync of version %d failed while an engine was lost (%s); publishing it again",
                           self.version, e)
            self._engines_lost_at_publish = self._engines_lost()
            try:
                self._sync = self.actors.weight_sync.publish(self.version)
                self._last_sync = self._sync.wait()
            except WeightSyncError as e2:
                raise RunError(f"step {self.step}: {e2}") from e2

    # ---- eval ----------------------------------------------------------------------------------
    def _queue_eval(self) -> None:
        """Evaluate the weights of the current step: now, or once the sync in flight has loaded them
        (the trainer never waits for an eval or for the sync it needs)."""
        if not self.cfg.data.eval_path:
            return
        self._eval_due.append(self.step)
        self._submit_due_evals()

    def _submit_due_evals(self) -> None:
        if not self._eval_due:
            return
        if self._sync is not None and not self._sync.done():
            return
        self._wait_sync()  # finished: record its metrics (or raise its error)
        for step in self._eval_due:
            self._evals.append((step, self.actors.manager.evaluate.remote()))
        self._eval_due = []

    def _drain_evals(self, block: bool) -> None:
        keep = []
        for step, ref in self._evals:
            while True:
                ready, _ = ray.wait([ref], timeout=POLL_S if block else 0)
                if ready or not block:
                    break
                self.actors.check_rollout(step)  # a dead rollout side ends the wait
            if not ready:
                keep.append((step, ref))
                continue
            result = self._get(ref, self._rollout_name, f"evaluate (step {step})")
            if result and self.log is not None:
                self.log.log_eval(step, result)
                logger.info("eval at step %d (version %d): accuracy %.3f", step, int(result.get("eval/version", -1)),
                            result.get("eval/accuracy", float("nan")))
        self._evals = keep

    def _eval_logged_at(self, step: int) -> bool:
        """Whether metrics.jsonl already holds an eval of `step` (kept from before a resume)."""
        path = self.run_dir / METRICS_FILE
        if not path.exists():
            return False
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if obj.get("kind") == "eval" and obj.get("step") == step:
                return True
        return False

    # ---- metrics and samples -------------------------------------------------------------------
    def _log_step(self, step: int, num_samples: int, metrics: dict[str, float], wall: float, waited: float) -> None:
        tokens = metrics.get("train/tokens", 0.0)
        out = dict(metrics)
        out.update(self._last_sync)
        out.update({
            "perf/samples": float(num_samples),
            "perf/step_time_s": wall,
            "perf/samples_per_s": num_samples / max(wall, 1e-9),
            "perf/tokens_per_s": tokens / max(wall, 1e-9),
            "perf/trainer_idle_frac": min(1.0, waited / max(wall, 1e-9)),
        })
        out.setdefault("weight_sync/seconds", float("nan"))
        for key, src in HEADLINE.items():
            if src in out:
                out[key] = out[src]
        self.log.log(step, out)

    def _save_samples(self, step: int, table: pa.Table | Any) -> None:
        from slime_rl.samples_io import readable_samples

        if isinstance(table, ray.ObjectRef):
            table = self._get(table, self._buffer_name, "take_batch")
        folder = self.run_dir / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".step_{step:06d}.tmp"
        pq.write_table(readable_samples(table, self.actors.tokenizer), tmp)
        tmp.rename(folder / f"step_{step:06d}.parquet")

    # ---- debug modes ---------------------------------------------------------------------------
    def _rollout_only(self, start_step: int) -> None:
        """Generate and score `num_steps` batches into samples/ (no trainer; versions stay 0)."""
        a = self.actors
        self._get(a.manager.start.remote(), self._rollout_name, "start")
        for step in range(start_step + 1, self.cfg.run.num_steps + 1):
            if self._stop_requested:
                break
            t0 = time.monotonic()
            batch = self._next_batch()
            if batch is None:
                break
            self._get(a.manager.open_slots.remote(step), self._rollout_name, "open_slots")
            self.step = step
            self._save_samples(step, batch.table_ref)
            metrics = self._get(a.manager.metrics.remote(), self._rollout_name, "metrics")
            metrics.update(self._get(a.buffer.stats.remote(), self._buffer_name, "stats"))
            self._log_step(step, batch.num_samples, metrics, time.monotonic() - t0, 0.0)

    def _train_only(self, start_step: int) -> None:
        """Train on saved batches (`run.train_only` folder of step_*.parquet), no engines."""
        from slime_rl.samples_io import read_batch, saved_steps

        files = list(saved_steps(Path(self.cfg.run.train_only)).values())
        if not files:
            raise RunError(f"run.train_only={self.cfg.run.train_only!r} holds no step_*.parquet files")
        for step in range(start_step + 1, self.cfg.run.num_steps + 1):
            if self._stop_requested:
                break
            t0 = time.monotonic()
            table = read_batch(files[(step - 1) % len(files)])
            metrics = self.actors.trainer.train_step(table)
            self.step, self.version = step, self.actors.trainer.version
            self._log_step(step, table.num_rows, metrics, time.monotonic() - t0, 0.0)
            if self.cfg.checkpoint.interval and step % self.cfg.checkpoint.interval == 0:
                self._checkpoint()
        if self.step:
            self._checkpoint(final=True)

    # ---- checkpoints ---------------------------------------------------------------------------
    def _checkpoint_after_failure(self) -> str:
        """Checkpoint the last completed step after the rollout side gave out (the trainer and
        buffer are intact); returns what to tell the user."""
        try:
            self._wait_sync()
            path = self._checkpoint()
        except Exception as e:  # noqa: BLE001 - the original error is what the user needs
            return f"no checkpoint could be written ({describe_error(e)})"
        return f"checkpoint {path} written; resume with checkpoint.resume=auto once engines can run again"

    def _checkpoint(self, final: bool = False) -> Path:
        wall = self._wall_before + time.monotonic() - self._t_start
        return self.checkpoints.save(self.step, self.version, wall, final=final)

    def _restore(self, path: Path) -> int:
        """Load a run checkpoint (`RunCheckpoints.restore`), then push the restored weights to the
        engines so they serve the restored policy, not the initial one (slime #1695)."""
        state = self.checkpoints.restore(path)
        self.step, self.version, self._wall_before = state["step"], state["version"], state["wall_s"]
        a = self.actors
        if self.version and a.weight_sync is not None and a.manager is not None:
            self._sync = a.weight_sync.publish(self.version)
            self._wait_sync()
        return self.step


class NoEnginesError(RunError):
    """No rollout engine served for `rollout.no_engine_timeout_s`; the run stops with a checkpoint."""


@dataclasses.dataclass(frozen=True)
class BatchRef:
    """A batch taken from the buffer: the Arrow table stays in the object store (the trainer
    workers read it from there); the driver holds only its size."""

    table_ref: Any
    num_samples: int
    num_groups: int


def _plain_config(cfg: Config) -> dict[str, Any]:
    import dataclasses

    from omegaconf import OmegaConf

    from slime_rl.rewards import redacted

    return OmegaConf.to_container(OmegaConf.structured(dataclasses.replace(cfg, reward=redacted(cfg.reward))))
