"""The wandb destination of a run's metrics, fenced off so that wandb can never stop a run.

wandb may be missing, online without an API key, slow to start, or lose its backend mid-run.
Each of those costs one warning here and the metrics go on to the JSONL file that
`metrics.MetricsLogger` writes (named in the warning as the place to look).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from slime_rl.cluster import CLUSTER_MARK

logger = logging.getLogger(__name__)

WANDB_MODES = ("offline", "online", "disabled")


class WandbSink:
    """One wandb run for a run directory, or none.

    `run` is None with mode "disabled", when wandb could not start, and after a failed log;
    `log` and `finish` are then no-ops. The run id is kept in `run_dir/wandb/run_id`, so a
    resumed run (`resume=True`) continues the same wandb run. Train steps must arrive in order
    (wandb's rule; a step before the last one goes to the JSONL file only); eval results are
    plotted against `eval/step`, so a late one never rewrites an earlier train step.

    Example:
        >>> sink = WandbSink(Path(run_dir), "offline", project="slime-rl", name="run", config=None,
        ...                  resume=False, start_step=0, metrics_path=Path(run_dir) / "metrics.jsonl")
        >>> sink.log(1, {"train/loss": 0.5}, kind="train")
        >>> sink.finish(exit_code=0)
    """

    def __init__(
        self,
        run_dir: Path,
        mode: str,
        *,
        project: str,
        name: str,
        config: dict | None,
        resume: bool,
        start_step: int,
        metrics_path: Path,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.metrics_path = metrics_path
        self._step = start_step
        self._warned_order = False
        self.run: Any = self._init(mode, project, name, config, resume)

    def log(self, step: int, metrics: Mapping[str, Any], *, kind: str) -> None:
        """Log one call's metrics (None values left out); `kind` is "train" or "eval"."""
        if self.run is None:
            return
        data = {k: v for k, v in metrics.items() if v is not None}
        if any(k.startswith("eval/") for k in data):
            data["eval/step"] = step
        if kind == "train":
            if step < self._step:
                if not self._warned_order:
                    self._warned_order = True
                    logger.warning("wandb keeps steps in order; step %d after step %d goes to JSONL only", step, self._step)
                return
            self._step = step
        try:
            # Eval lines join the current wandb row; their x axis is eval/step.
            self.run.log(data, step=step if kind == "train" else self._step)
        except Exception as e:  # never fail a run for wandb
            logger.warning("wandb log failed, logging to %s only from now on: %s", self.metrics_path, e)
            self.run = None

    def finish(self, exit_code: int = 0) -> None:
        """Finish the wandb run (marked failed when `exit_code` is not 0). Idempotent."""
        if self.run is None:
            return
        try:
            self.run.finish(exit_code=exit_code)
        except Exception as e:  # never fail a run for wandb
            logger.warning("wandb finish failed (%s); metrics are in %s", e, self.metrics_path)
        self.run = None

    def _init(self, mode: str, project: str, name: str, config: dict | None, resume: bool) -> Any:
        if mode == "disabled":
            return None
        os.environ.setdefault("WANDB_SILENT", "true")
        try:
            import wandb

            if mode == "online" and not wandb.login(prompt=False, verify=False):
                # wandb.init would prompt for a login on a terminal and block the run.
                raise RuntimeError("no API key (set WANDB_API_KEY or run `wandb login`)")
            # wandb's service process is not part of the Ray cluster: without the cluster's mark in its
            # environment the local cluster's reaper leaves it to wandb's own exit handler (swept
            # early, that handler printed a "Connection lost" traceback at exit).
            with _without_env(CLUSTER_MARK):
                run = wandb.init(
                    mode=mode,
                    dir=str(self.run_dir),
                    project=project,
                    name=name,
                    id=self._run_id(reuse=resume),
                    config=config,
                    resume="allow" if resume else None,
                    reinit="create_new",
                    settings=wandb.Settings(silent=True, init_timeout=60),
                )
            run.define_metric("eval/step")
            run.define_metric("eval/*", step_metric="eval/step")
            return run
        except Exception as e:  # never fail a run for wandb
            logger.warning("wandb (%s) unavailable, logging to %s only: %s", mode, self.metrics_path, e)
            return None

    def _run_id(self, *, reuse: bool) -> str:
        """The wandb run id kept in run_dir/wandb/run_id, so a resumed run continues the same wandb run."""
        path = self.run_dir / "wandb" / "run_id"
        if reuse and path.exists() and path.read_text().strip():
            return path.read_text().strip()
        path.parent.mkdir(parents=True, exist_ok=True)
        run_id = secrets.token_hex(4)  # wandb's id format: 8 lowercase alphanumerics
        tmp = path.with_name(f".{path.name}.tmp")
        with tmp.open("w", encoding="utf-8") as f:  # atomic: a torn id would start a new wandb run
            f.write(run_id + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return run_id


@contextlib.contextmanager
def _without_env(name: str) -> Iterator[None]:
    """Run the body with environment variable `name` unset (restored after)."""
    saved = os.environ.pop(name, None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ[name] = saved
