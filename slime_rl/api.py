"""The Python entry point: `train()` does exactly what `slime-rl train` does.

    config file or Config ─► overrides ─► reward references resolved ─► start-up checks
        ─► <run_dir>/config.yaml ─► Driver(cfg).run() ─► RunResult

The CLI (`slime_rl.cli`) is a thin wrapper over `prepare` and `run`.

Example:
    >>> from slime_rl import train
    >>> result = train("configs/examples/arith_tiny.yaml", {"run.num_steps": 20})  # doctest: +SKIP
    >>> result.summary.eval_accuracy_last, result.run_dir                           # doctest: +SKIP
    (0.51, PosixPath('runs/arith-tiny'))
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from slime_rl.config import Config, load_config, save_config

logger = logging.getLogger(__name__)

Overrides = Mapping[str, Any] | Sequence[str] | None
"""`{"trainer.lr": 1e-5, "run": {"num_steps": 5}}` or `["trainer.lr=1e-5", "run.num_steps=5"]`."""


@dataclasses.dataclass(frozen=True)
class RunResult:
    """What a finished (or Ctrl-C-stopped) run returns."""

    run_dir: Path
    """`<run.output_dir>/<run.name>`: config.yaml, metrics.jsonl, plots/, checkpoints/, samples/."""
    last_step: int
    """The last trainer step completed (the checkpoint's step after a Ctrl-C)."""
    interrupted: bool
    """True when a Ctrl-C (or SIGTERM) stopped the run early, after a final checkpoint."""
    summary: Any
    """`slime_rl.progress.Summary`: steps, wall time, eval accuracy first/last/best, reward, samples/s."""
    table: str
    """The summary as the console prints it."""
    signal: str | None = None
    """`SIGINT` or `SIGTERM` when a signal stopped the run."""


def _as_overrides(overrides: Overrides) -> list[str]:
    if overrides is None:
        return []
    if isinstance(overrides, Mapping):
        out: list[str] = []

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, Mapping) and (value or not prefix):
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else str(k), v)
            else:
                out.append(f"{prefix}={value if isinstance(value, str) else json.dumps(value)}")

        walk("", overrides)
        return out
    if isinstance(overrides, str):
        return [overrides]
    return [str(o) for o in overrides]


def prepare(config: Config | str | Path | None, overrides: Overrides = None) -> Config:
    """Load and validate a run config, resolve its reward references, run the start-up checks
    and write `<run_dir>/config.yaml` (secrets in reward kwargs redacted). Nothing starts.

    Raises:
        ConfigError: an unknown key or a bad value (names the key path and what is allowed).
        RewardLoadError: a reward reference that does not import or has the wrong signature.
        PreflightError: model, data, plug-in, cluster address or checkpoint not usable.
    """
    from slime_rl.preflight import run_preflight
    from slime_rl.rewards import resolve_config

    extra = _as_overrides(overrides)
    if isinstance(config, Config):
        cfg = load_config(None, extra, base=config) if extra else config
    else:
        cfg = load_config(None if config is None else str(config), extra)
    cfg.reward = resolve_config(cfg.reward)  # imports every reward fn, checks its signature
    run_preflight(cfg)
    write_run_config(cfg)
    return cfg


def write_run_config(cfg: Config) -> Path:
    """Save the resolved config as `<run_dir>/config.yaml`; literal API keys and tokens in reward
    kwargs are redacted. Returns the path."""
    from slime_rl.rewards import redacted

    keep_out_of_uploads(Path(cfg.run.output_dir))
    return Path(save_config(dataclasses.replace(cfg, reward=redacted(cfg.reward)), cfg.run_dir / "config.yaml"))


IGNORE_ALL = "# Written by slime-rl: run outputs (checkpoints, samples, weights) stay out of git and of Ray job uploads.\n*\n"


def keep_out_of_uploads(output_dir: Path) -> None:
    """Runs must not poison the folder they were started from: `ray job submit --working-dir .`
    uploads it (honouring .gitignore / .rayignore files, nested ones too) and refuses bodies over
    100 MB. So `run.output_dir` gets a `.gitignore` of `*` unless it has one, or it is the working
    directory or one of its parents (then the user's own ignore rules decide)."""
    out = output_dir.resolve()
    cwd = Path.cwd().resolve()
    if out == cwd or out in cwd.parents:
        return
    out.mkdir(parents=True, exist_ok=True)
    ignore = out / ".gitignore"
    if not ignore.exists():
        ignore.write_text(IGNORE_ALL)


def run(cfg: Config) -> RunResult:
    """Run a prepared config to `run.num_steps` (or until Ctrl-C / SIGTERM).

    Raises:
        RunError: an actor died, a call or a sync timed out, or a checkpoint could not be used;
            the message names the actor (or file), the step and the cause.
        KeyboardInterrupt: a second Ctrl-C (every actor killed at once, no checkpoint).
    """
    from slime_rl.driver import Driver  # importing Ray takes a while: only once the checks passed

    logging.getLogger("slime_rl").setLevel(cfg.logging.level)
    out = Driver(cfg).run()
    return RunResult(Path(out["run_dir"]), int(out["last_step"]), bool(out["interrupted"]), out["summary"], out["table"],
                     out.get("signal"))


def train(config: Config | str | Path | None, overrides: Overrides = None, **sections: Any) -> RunResult:
    """`slime-rl train CONFIG key=value...` from Python: `prepare` then `run`.

    Args:
        config: a run config YAML path, a `Config`, or None (defaults + overrides only).
        overrides: dotted overrides (`{"trainer.lr": 1e-5}` or `["trainer.lr=1e-5"]`); they win
            over the file.
        **sections: more overrides by section, e.g. `run={"num_steps": 5}`.

    Returns:
        RunResult (run directory, last step, whether Ctrl-C stopped it, the summary).

    Raises:
        ConfigError, RewardLoadError, PreflightError: bad input, before anything starts.
        RunError: the run failed; KeyboardInterrupt: a second Ctrl-C.
    """
    merged = _as_overrides(overrides) + _as_overrides(sections)
    return run(prepare(config, merged))


class ScaleError(RuntimeError):
    """`scale` could not reach the run (no actors.json, cluster gone, run not running)."""


def scale(run_dir: str | Path, engines: int, timeout_s: float = 30.0) -> dict[str, Any]:
    """Change the number of rollout engines of a running run (`slime-rl scale RUN_DIR --engines N`).

    New engines load the run's current weights before they take work; engines removed finish
    their groups first. Works from any process that can reach the run's Ray cluster (the address
    is in `<run_dir>/actors.json`).

    Returns:
        The fleet after the change: {"target", "serving", "starting", "engines": [...]}.
    Raises:
        ScaleError: no actors.json in `run_dir`, the cluster or the run is not reachable.
        ValueError: `engines` < 0, or a rollout side that cannot scale.
    """
    import ray

    from slime_rl.cluster import NAMESPACE, use_token_if_available

    if engines < 0:
        raise ValueError(f"--engines {engines} must be >= 0")
    path = Path(run_dir) / "actors.json"
    if not path.exists():
        raise ScaleError(f"{path} does not exist: is {run_dir} the directory of a run that has started?")
    info = json.loads(path.read_text())
    address, run = info.get("ray_address"), info.get("run")
    owns = not ray.is_initialized()
    try:
        if owns:
            use_token_if_available()
            try:
                ray.init(address=address, namespace=info.get("namespace") or NAMESPACE, logging_level=logging.WARNING,
                         log_to_driver=False)
            except Exception as e:
                raise ScaleError(f"cannot reach the Ray cluster of run {run!r} at {address} ({e}); has the run ended?") from None
        try:
            manager = ray.get_actor(f"{run}-rollout", namespace=info.get("namespace") or NAMESPACE)
        except ValueError:
            raise ScaleError(f"run {run!r} is not running on the cluster at {address} (no actor {run}-rollout)") from None
        try:
            return ray.get(manager.scale.remote(int(engines)), timeout=timeout_s)
        except ray.exceptions.RayTaskError as e:
            cause = getattr(e, "cause", None) or e
            if isinstance(cause, ValueError):
                raise ValueError(str(cause)) from None
            raise ScaleError(f"scale failed on {run}-rollout: {cause}") from None
    finally:
        if owns and ray.is_initialized():
            ray.shutdown()
