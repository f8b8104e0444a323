"""Weight versions from the trainer to the engines, and the evals that must run on them.

    driver step v ─► publish(v) ─► WeightSync.publish ─► PendingSync (engines load while v+1 trains)
                     wait()     ─► the previous sync's metrics (or its error; one retry when an
                                   engine was lost during it: a collective group then breaks)
    queue_eval(step) ─► sent once no sync is in flight (it must run on the weights of its step)
    drain_evals()    ─► results logged when they arrive, tagged with the version they ran on

At most one sync is in flight; the trainer never waits for an eval, and for a sync only when the
next one starts (or at once in `run.mode: sync`). The loops: docs/design.md.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray

from slime_rl.errors import RunError, describe_error
from slime_rl.metrics import METRICS_FILE
from slime_rl.weight_sync import PendingSync, WeightSyncError

logger = logging.getLogger(__name__)

POLL_S = 2.0
"""How often a blocking wait checks that the rollout side is alive."""


class Publisher:
    """Publishes the trainer's versions and runs evals on them (one per run, owned by the driver)."""

    def __init__(self, actors: Any, tracer: Any, *, sync_mode: bool, eval_path: str | None,
                 engines_lost: Callable[[], int]) -> None:
        self.actors = actors
        self.tracer = tracer
        self.sync_mode = sync_mode
        self.eval_path = eval_path
        self._engines_lost = engines_lost
        self.pending: PendingSync | None = None
        self.last: dict[str, float] = {}
        """Metrics of the last finished sync (`weight_sync/...`, `rollout/weight_update_s`...)."""
        self._lost_at_publish = 0
        self._evals: list[tuple[int, Any]] = []
        self._eval_due: list[int] = []
        """Steps whose eval waits for the sync in flight (it must evaluate those weights)."""

    # ---- weights -------------------------------------------------------------------------------
    def idle(self) -> bool:
        return self.pending is None or self.pending.done()

    def publish(self, step: int, version: int) -> None:
        """Start syncing `version`; the previous sync must have finished first (waited here)."""
        self.wait(step)
        self.submit_due_evals(step)  # an eval waiting for the previous weights goes before the new ones
        self._lost_at_publish = self._engines_lost()
        try:
            with self.tracer.span("weight_sync", step=step, version=version, part="publish"):
                self.pending = self.actors.weight_sync.publish(version)
        except WeightSyncError as e:
            raise RunError(f"step {step}: {e}") from e
        if self.sync_mode:
            self.wait(step)

    def wait(self, step: int) -> None:
        """Wait for the sync in flight; its metrics become `last`. Raises RunError naming the step."""
        if self.pending is None:
            return
        try:
            if self.pending.done():
                self.last = self.pending.wait()
            else:
                with self.tracer.span("weight_sync", step=step, version=self.pending.version, part="wait"):
                    self.last = self.pending.wait()
        except WeightSyncError as e:
            if self._engines_lost() == self._lost_at_publish:
                raise RunError(f"step {step}: {e}") from e
            # An engine went away during the sync (a collective group then breaks): once more, to
            # the engines there are now.
            version = self.pending.version
            logger.warning("weight sync of version %d failed while an engine was lost (%s); publishing it again", version, e)
            self._lost_at_publish = self._engines_lost()
            try:
                self.pending = self.actors.weight_sync.publish(version)
                self.last = self.pending.wait()
            except WeightSyncError as e2:
                raise RunError(f"step {step}: {e2}") from e2

    # ---- evals ---------------------------------------------------------------------------------
    def queue_eval(self, step: int) -> None:
        """Evaluate the weights of `step`: now, or once the sync in flight has loaded them."""
        if not self.eval_path:
            return
        self._eval_due.append(step)
        self.submit_due_evals(step)

    def submit_due_evals(self, step: int) -> None:
        if not self._eval_due or not self.idle():
            return
        self.wait(step)  # finished: record its metrics (or raise its error)
        for due in self._eval_due:
            self._evals.append((due, self.actors.manager.evaluate.remote()))
        self._eval_due = []

    def drain_evals(self, block: bool, log: Any, rollout_name: str) -> None:
        """Log the evals that finished (with `block`, wait for all; a dead rollout side ends the wait)."""
        keep = []
        for step, ref in self._evals:
            while True:
                ready, _ = ray.wait([ref], timeout=POLL_S if block else 0)
                if ready or not block:
                    break
                self.actors.check_rollout(step)
            if not ready:
                keep.append((step, ref))
                continue
            try:
                result = ray.get(ref)
            except Exception as e:
                raise RunError(f"step {step}: evaluate on {rollout_name} failed: {describe_error(e)}") from e
            if result and log is not None:
                log.log_eval(step, result)
                logger.info("eval at step %d (version %d): accuracy %.3f", step, int(result.get("eval/version", -1)),
                            result.get("eval/accuracy", float("nan")))
        self._evals = keep


def eval_logged_at(run_dir: Path, step: int) -> bool:
    """Whether metrics.jsonl already holds an eval of `step` (kept from before a resume)."""
    path = Path(run_dir) / METRICS_FILE
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
