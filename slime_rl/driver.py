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
from slime_rl.faults import FaultInjector
from slime_rl.metrics import MetricsLogger
from slime_rl.publisher import POLL_S, Publisher, eval_logged_at
from slime_rl.run_actors import RunActors
from slime_rl.tracing import Tracer, open_writer

__all__ = ["Driver", "RunError", "latest_checkpoint"]

logger = logging.getLogger(__name__)

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
        self.faults: FaultInjector | None = None
        self.pub: Publisher | None = None
        """Weight versions to the engines and evals on them (once the actors run)."""
        self._stop_requested = False
        self.stop_signal: str | None = None
        """SIGINT or SIGTERM when a signal stopped the run."""
        self._abort = False
        self._t_start = time.monotonic()
        self._wall_before = 0.0
        """Wall seconds of the sessions before a resume (from the checkpoint)."""
        self.checkpoints: RunCheckpoints | None = None
        self.tracer = Tracer("driver", enabled=cfg.logging.trace)
        self.trace: Any = None
        """`TraceWriter` of `<run_dir>/trace.json` (None with logging.trace off)."""
        self.working_on = 1
        """The step in progress (named by failures: the step after the last one logged)."""
        self._fleet_changes: int | None = None
        self._dropped_seen = 0

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
        previous = self._catch_signals() if in_main else None
        try:
            self.actors = RunActors.start(cfg)
            if in_main:
                self._catch_signals()  # again: connecting to Ray installs its own SIGTERM handler
            self.checkpoints = RunCheckpoints(cfg, self.actors)
            self.pub = Publisher(self.actors, self.tracer, sync_mode=cfg.run.mode == "sync", eval_path=cfg.data.eval_path,
                                 engines_lost=self._engines_lost)
            self.faults = FaultInjector(cfg.faults, self.actors, cfg.run.name) if cfg.faults.any_driver_faults else None
            resume_from = resume_point(cfg)
            start_step = self._restore(resume_from) if resume_from else 0
            self.log = MetricsLogger(
                self.run_dir, cfg.run.num_steps, start_step=start_step, wandb_mode=cfg.logging.wandb_mode,
                wandb_project=cfg.logging.wandb_project, run_name=cfg.run.name, config=_plain_config(cfg),
                progress=cfg.logging.progress, plot_every=cfg.logging.plot_every, resume=resume_from is not None,
            )
            self.trace = open_writer(self.run_dir, cfg.logging, run_name=cfg.run.name,
                                     resume_step=start_step if resume_from is not None else None)
            if resume_from is not None:
                self.checkpoints.drop_samples_after(start_step)
            self._train(start_step, resumed=resume_from is not None)
            summary = self.log.close(exit_code=(143 if self.stop_signal == "SIGTERM" else 130) if self._stop_requested else 0)
            table = self.log.summary_table()
            self.log = None
            return {"summary": summary, "table": table, "run_dir": str(self.run_dir),
                    "interrupted": self._stop_requested, "last_step": self.step, "signal": self.stop_signal}
        except KeyboardInterrupt:
            self._abort = True
            raise
        except NoEnginesError as e:
            raise RunError(f"{e}; {self._checkpoint_after_failure()}") from e
        except RunError:
            raise
        except Exception as e:
            raise RunError(f"step {self.working_on}: {describe_error(e)}") from e
        finally:
            self._close_trace()
            if self.log is not None:
                self.log.close(exit_code=1)
            if self.actors is not None:
                self.actors.shutdown(graceful=not self._abort)
            if previous is not None:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    def _catch_signals(self) -> dict[int, Any]:
        """Ctrl-C (SIGINT) and SIGTERM (a scheduler, `kill`, `docker stop`) both stop gracefully;
        returns the handlers they replace."""
        return {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}

    def _on_signal(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self._stop_requested:  # the second one: stop now
            logger.warning("%s again: aborting (every actor killed, no checkpoint of this step)", name)
            self._abort = True
            raise KeyboardInterrupt
        self._stop_requested = True
        self.stop_signal = name
        logger.warning("%s: finishing the current step, then checkpoint and shut down (%s again to abort)",
                       "Ctrl-C" if signum == signal.SIGINT else name, "Ctrl-C" if signum == signal.SIGINT else name)

    # ---- remote calls --------------------------------------------------------------------------
    def _get(self, ref: Any, actor: str, what: str, timeout: float | None = CALL_TIMEOUT_S) -> Any:
        """`ray.get` with a timeout; a failure names the actor, the call and the step."""
        try:
            return ray.get(ref, timeout=timeout)
        except Exception as e:
            raise RunError(f"step {self.working_on}: {what} on {actor} failed: {describe_error(e)}") from e

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
        if not (resumed and eval_logged_at(self.run_dir, start_step)):
            self.pub.queue_eval(self.step)  # the starting weights (after a resume: the restored ones)
        self._get(a.manager.start.remote(), self._rollout_name, "start")
        last_done = loop_start = time.monotonic()
        for step in range(start_step + 1, cfg.run.num_steps + 1):
            if self._stop_requested:
                break
            self.working_on = step
            t0 = time.monotonic()
            batch = self._next_batch()
            if batch is None:  # Ctrl-C while waiting: the groups stay buffered and are checkpointed
                break
            t1 = time.monotonic()
            waited = t1 - t0
            self.tracer.complete("buffer_wait", t0, t1, step=step)
            metrics = a.trainer.train_step(batch.table_ref)
            self.step, self.version = step, a.trainer.version
            self.tracer.complete("train_step", t1, time.monotonic(), track="trainer-rank0", step=step, version=self.version,
                                 samples=batch.num_samples, tokens=metrics.get("train/tokens"))
            time_up = cfg.run.max_minutes is not None and time.monotonic() - loop_start >= 60 * cfg.run.max_minutes
            publish = step % cfg.weight_sync.interval == 0 or step == cfg.run.num_steps or time_up
            if publish:
                self.pub.wait(self.step)  # the previous sync (the next one waits for it anyway); its metrics go in this line
            rollout_metrics, events = self._get([a.manager.metrics.remote(), a.manager.drain_trace.remote()],
                                                self._rollout_name, "metrics")
            metrics.update(rollout_metrics)
            metrics.update(self._get(a.buffer.stats.remote(), self._buffer_name, "stats"))
            self._warn_stale_drops(metrics.get("buffer/dropped_stale", 0.0), step)
            self._follow_fleet(a.check_rollout(step))
            now = time.monotonic()
            self.tracer.complete("step", last_done, now, step=step, version=self.version)
            self._add_trace(events, step)
            self._log_step(step, batch.num_samples, metrics, now - last_done, waited)
            last_done = now
            if self.faults is not None:
                self.faults.after_step(step)
            self.pub.drain_evals(False, self.log, self._rollout_name)
            if cfg.logging.save_samples:
                self._save_samples(step, batch.table_ref)
            if cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0:
                # Before version `step` is published: no group of that version exists yet, so on
                # resume every one of them comes from the restored weights (pushed by _restore).
                self._checkpoint()
            if publish:
                self.pub.publish(self.step, self.version)
            if time_up:
                logger.info("run.max_minutes=%g spent after step %d: finishing the run", cfg.run.max_minutes, step)
                break
            if cfg.eval.interval and step % cfg.eval.interval == 0 and step != cfg.run.num_steps:
                self.pub.queue_eval(self.step)
            self.pub.submit_due_evals(self.step)
        if self._stop_requested:
            logger.warning("stopped after step %d as asked (%s); resume with checkpoint.resume=auto", self.step,
                           self.stop_signal or "Ctrl-C")
        self._finish()

    def _finish(self) -> None:
        """Final sync, final eval (not after Ctrl-C), final checkpoint."""
        self.pub.wait(self.step)
        if self._stop_requested:
            self.pub.drain_evals(False, self.log, self._rollout_name)  # results already in; the others are not waited for
        else:
            if self.cfg.data.eval_path:
                self.pub.queue_eval(self.step)  # after the final sync: the final weights
            self.pub.submit_due_evals(self.step)
            self.pub.drain_evals(True, self.log, self._rollout_name)
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
                # Groups that must be in this batch (admitted S versions ago) may still be generating:
                # wait for them rather than train newer ones and drop them as stale later.
                due = self._get(a.manager.wait_due.remote(self.version, POLL_S), self._rollout_name, "wait_due",
                                timeout=POLL_S + CALL_TIMEOUT_S) if a.manager is not None else 0
                if not due:
                    info_ref, table_ref = a.buffer.take_batch.remote(self.global_batch_groups, self.version,
                                                                     self.max_staleness, POLL_S)
                    try:
                        info = ray.get(info_ref, timeout=POLL_S + CALL_TIMEOUT_S)
                        return BatchRef(table_ref, int(info["num_samples"]), int(info["num_groups"]))
                    except BufferTimeoutError:
                        _retrieve(table_ref)  # the second return holds the same error: read it, or Ray prints it
                    except Exception as e:
                        raise RunError(f"step {self.working_on}: get_batch on {self._buffer_name} failed: "
                                       f"{describe_error(e)}") from e
                status = a.check_rollout(self.working_on)
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
                            f"step {self.working_on}: no rollout engine served for {now - no_engines_since:.0f} s "
                            f"(rollout.no_engine_timeout_s={self.cfg.rollout.no_engine_timeout_s:.0f}); target "
                            f"{status.get('engines_target')} engine(s), the cluster has no room for one"
                        )
                    continue
                no_engines_since = None
                self.log.set_note(None)
                if now > deadline:
                    generated, kept = status.get("groups_generated", 0), status.get("groups_kept", 0)
                    hint = (f"; rollout.filter kept {kept} of the {generated} groups generated: the reward may be the "
                            "same for every sample of a group (check the reward function and the labels)"
                            if generated > kept else "")
                    raise RunError(
                        f"step {self.working_on}: no batch of {self.global_batch_groups} groups within staleness "
                        f"{self.max_staleness} of version {self.version} after {self.cfg.buffer.get_timeout_s:.0f} s "
                        f"(buffer.get_timeout_s); {generated} groups generated, {kept} kept, "
                        f"{status.get('in_flight', 0)} in flight, {status.get('engines_up', 0)} engine(s) serving{hint}"
                    )
        finally:
            if self.log is not None:
                self.log.set_note(None)

    def _warn_stale_drops(self, dropped: float, step: int) -> None:
        """The buffer dropped groups as too stale: say how many and why (they are never trained)."""
        new = int(dropped) - self._dropped_seen
        if new <= 0:
            return
        self._dropped_seen = int(dropped)
        logger.warning(
            "step %d: the buffer dropped %d group(s) older than buffer.max_staleness=%d at trainer version %d (%d in "
            "all); they will not be trained. Admission and the trainer's wait for due groups keep this at 0 unless a "
            "group is overtaken by more than a batch of newer ones across several versions (very uneven generation "
            "times) or a resumed checkpoint disagrees with its buffer; raise buffer.max_staleness to keep such groups",
            step, new, self.max_staleness, self.version, int(dropped))

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
        if status.get("engines_need_weights") and a.weight_sync is not None and self.pub.idle():
            self.pub.publish(self.step, self.version)

    def _engines_lost(self) -> int:
        a = self.actors
        return int(a.check_rollout(self.working_on).get("engines_lost", 0)) if a.manager is not None else 0

    # ---- metrics and samples -------------------------------------------------------------------
    def _log_step(self, step: int, num_samples: int, metrics: dict[str, float], wall: float, waited: float) -> None:
        tokens = metrics.get("train/tokens", 0.0)
        out = dict(metrics)
        out.update(self.pub.last)
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
            self.working_on = step
            t0 = time.monotonic()
            batch = self._next_batch()
            if batch is None:
                break
            self._get(a.manager.open_slots.remote(step), self._rollout_name, "open_slots")
            self.step = step
            self._save_samples(step, batch.table_ref)
            metrics, events = self._get([a.manager.metrics.remote(), a.manager.drain_trace.remote()], self._rollout_name, "metrics")
            metrics.update(self._get(a.buffer.stats.remote(), self._buffer_name, "stats"))
            self.tracer.complete("step", t0, time.monotonic(), step=step, version=0)
            self._add_trace(events, step)
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
            self.working_on = step
            t0 = time.monotonic()
            table = read_batch(files[(step - 1) % len(files)])
            metrics = self.actors.trainer.train_step(table)
            self.step, self.version = step, self.actors.trainer.version
            self.tracer.complete("train_step", t0, time.monotonic(), track="trainer-rank0", step=step, version=self.version)
            self._add_trace([], step)
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
            self.pub.wait(self.step)
            path = self._checkpoint()
        except Exception as e:  # noqa: BLE001 - the original error is what the user needs
            return f"no checkpoint could be written ({describe_error(e)})"
        return f"checkpoint {path} written; resume with checkpoint.resume=auto once engines can run again"

    def _checkpoint(self, final: bool = False) -> Path:
        wall = self._wall_before + time.monotonic() - self._t_start
        with self.tracer.span("checkpoint", step=self.step, final=final):
            return self.checkpoints.save(self.step, self.version, wall, final=final)

    # ---- timeline ------------------------------------------------------------------------------
    def _add_trace(self, manager_events: list[dict[str, Any]], step: int) -> None:
        if self.trace is not None:
            self.trace.add(self.tracer.drain() + list(manager_events or []), step=step)
            self.trace.flush()

    def _close_trace(self) -> None:
        """Last events (the manager's, if it still answers) and a final trace.json; never hides
        the run's own error."""
        if self.trace is None:
            return
        try:
            events: list[dict[str, Any]] = []
            if self.actors is not None and self.actors.manager is not None:
                try:
                    events = ray.get(self.actors.manager.drain_trace.remote(), timeout=5)
                except Exception:  # the rollout side is gone: what the driver recorded still goes in
                    pass
            self.trace.add(self.tracer.drain() + events, step=self.step)
            self.trace.close()
        except Exception as e:  # noqa: BLE001
            logger.warning("could not write the trace: %s", e)
        finally:
            self.trace = None

    def _restore(self, path: Path) -> int:
        """Load a run checkpoint (`RunCheckpoints.restore`), then push the restored weights to the
        engines so they serve the restored policy, not the initial one (slime #1695)."""
        state = self.checkpoints.restore(path)
        self.step, self.version, self._wall_before = state["step"], state["version"], state["wall_s"]
        self.working_on = self.step + 1
        a = self.actors
        if self.version and a.weight_sync is not None and a.manager is not None:
            self.pub.publish(self.step, self.version)
            self.pub.wait(self.step)
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


def _retrieve(ref: ray.ObjectRef) -> None:
    """Read an object ref whose task failed in a way already handled, so that Ray does not log
    the error as unhandled ("Unhandled error ... BufferTimeoutError") when the ref is dropped."""
    try:
        ray.get(ref, timeout=CALL_TIMEOUT_S)
    except Exception:  # noqa: BLE001 - the failure is the one already handled
        pass
