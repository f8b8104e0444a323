"""Every Ray actor of one run, started in order and always shut down together.

    connect (local cluster or ray.address) ─► Placement (placement groups)
      ─► BufferActor ─► EngineActor × rollout.num_engines ─► RolloutManagerActor.setup()
      ─► TrainerGroup (trainer.num_workers ranks) ─► WeightSync
    shutdown(): manager.stop ─► engines shut down ─► trainer group ─► buffer ─► placement groups
                ─► a local cluster this run started (`cluster.disconnect`)
    shutdown(graceful=False) (a second Ctrl-C): every actor killed at once, no clean-up calls

Actor names carry the run name (`<run>-engine-0`, `<run>-buffer`, ...), so `ray list actors`
shows whose they are. Debug modes start only what they need: rollout-only has no trainer,
train-only no engines, manager or buffer.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import ray

from slime_rl.cluster import Connection, connect, disconnect
from slime_rl.config import Config
from slime_rl.errors import CALL_TIMEOUT_S, RunError, describe_error
from slime_rl.placement import Placement

logger = logging.getLogger(__name__)

ENGINE_ENV = {"VLLM_LOGGING_LEVEL": "WARNING", "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning"}
"""Environment of engine actors: vLLM's per-request INFO lines would bury the run's own output."""


@dataclasses.dataclass
class RunActors:
    cfg: Config
    connection: Connection | None = None
    placement: Placement | None = None
    buffer: Any = None
    engines: list[Any] = dataclasses.field(default_factory=list)
    manager: Any = None
    trainer: Any = None
    weight_sync: Any = None
    tokenizer: Any = None
    setup_info: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def start(cls, cfg: Config) -> RunActors:
        """Start everything the run's mode needs; on any failure, what started is shut down."""
        actors = cls(cfg)
        try:
            actors._start()
        except BaseException as e:
            actors.shutdown(graceful=not isinstance(e, KeyboardInterrupt))
            raise
        return actors

    def _start(self) -> None:
        from transformers import AutoTokenizer

        cfg = self.cfg
        self.connection = connect(cfg, dict(cfg.ray.runtime_env))
        logger.info("ray: %s", self.connection.description)
        self.placement = Placement(cfg)
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer_path or cfg.model.path)
        name = cfg.run.name
        model_path = str(Path(cfg.model.path).resolve())
        if not cfg.run.train_only:
            self._start_rollout(name, model_path)
        if not cfg.run.rollout_only:
            from slime_rl.trainer.group import TrainerGroup

            self.trainer = TrainerGroup(cfg.trainer, model_path, actor_options=self.placement.trainer_options, name=f"{name}-trainer")
        self.connection.track()  # the actors' processes die with this driver, also on SIGKILL
        if self.trainer is not None and self.manager is not None:
            from slime_rl.weight_sync import WeightSync

            self.weight_sync = WeightSync(
                cfg.weight_sync.transport, self.trainer, self.manager,
                bucket_bytes=int(cfg.weight_sync.bucket_mb * (1 << 20)), num_engines=len(self.engines),
                run_dir=cfg.run_dir, timeout_s=cfg.weight_sync.timeout_s, use_gpu=cfg.trainer.num_gpus_per_worker > 0,
            )

    def _start_rollout(self, name: str, model_path: str) -> None:
        from slime_rl.buffers import create_buffer_actor
        from slime_rl.rollout.engines.actor import start_engine_actor_from_config
        from slime_rl.rollout.manager import ManagerSpec
        from slime_rl.rollout.manager_actor import start_rollout_manager

        cfg = self.cfg
        group_size = cfg.rollout.n_samples_per_prompt
        names = [f"{name}-engine-{i}" for i in range(cfg.rollout.num_engines)]
        if not self.connection.owns_cluster:
            _claim_names(name, [f"{name}-buffer", f"{name}-rollout", *names])
        self.buffer = create_buffer_actor(cfg.buffer, group_size=group_size, name=f"{name}-buffer")
        ray.get(self.buffer.ready.remote())
        env = {"env_vars": {**ENGINE_ENV, **cfg.ray.runtime_env.get("env_vars", {})}}
        for i, engine_name in enumerate(names):
            opts = self.placement.engine_options(i)
            self.engines.append(
                start_engine_actor_from_config(
                    cfg.rollout, model_path, name=engine_name, num_cpus=opts.pop("num_cpus"),
                    num_gpus=opts.pop("num_gpus"),
                    actor_options={**opts, "max_restarts": cfg.rollout.engine_max_restarts, "runtime_env": env},
                )
            )
        self._wait_engines(names)
        spec = ManagerSpec(
            rollout=cfg.rollout, data=cfg.data, reward=cfg.reward, eval=cfg.eval, model_path=model_path,
            tokenizer_path=cfg.model.tokenizer_path, global_batch_groups=cfg.trainer.global_batch_groups,
            max_staleness=cfg.max_staleness(), seed=cfg.run.seed, base_dir=str(Path.cwd()),
        )
        self.manager = start_rollout_manager(spec, self.engines, names, self.buffer, name=f"{name}-rollout")
        self.setup_info = ray.get(self.manager.setup.remote())
        logger.info("rollout side ready: %s", self.setup_info)

    def _wait_engines(self, names: list[str]) -> None:
        """Every engine loaded its model, or the run stops naming the one that did not."""
        timeout = self.cfg.rollout.engine_start_timeout_s
        refs = {e.version.remote(): n for e, n in zip(self.engines, names)}
        ready, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout)
        if pending:
            raise RuntimeError(
                f"rollout engine(s) {', '.join(refs[r] for r in pending)} did not start within {timeout:.0f} s "
                "(rollout.engine_start_timeout_s)"
            )
        for r in ready:
            try:
                ray.get(r)
            except Exception as e:
                raise RuntimeError(f"rollout engine {refs[r]} failed to start: {e}") from None

    def check_rollout(self, step: int) -> str:
        """Raise RunError if the rollout side failed (naming it and the step); else a one-line status."""
        name = f"{self.cfg.run.name}-rollout"
        try:
            status = ray.get(self.manager.check.remote(), timeout=CALL_TIMEOUT_S)
        except Exception as e:
            raise RunError(f"step {step}: the rollout manager ({name}) failed: {describe_error(e)}") from e
        return ", ".join(f"{k}={v}" for k, v in status.items())

    def shutdown(self, graceful: bool = True) -> None:
        """Stop and kill every actor of the run, then a local cluster it started (safe to call
        twice, and after partial starts). `graceful=False` kills without clean-up calls."""
        wait = CALL_TIMEOUT_S if graceful else 0.0
        names = [f"{self.cfg.run.name}-{n}" for n in ("rollout", "buffer")] + [
            f"{self.cfg.run.name}-engine-{i}" for i in range(len(self.engines))
        ]
        if self.manager is not None:
            self._stop(self.manager, "stop", wait, "rollout manager")
            self.manager = None
        for handle in self.engines:
            self._stop(handle, "shutdown", wait, "engine")
        self.engines = []
        if self.trainer is not None:
            if graceful:
                self.trainer.shutdown()
            else:
                for a in self.trainer.worker_handles():
                    ray.kill(a)
            self.trainer = None
        if self.buffer is not None:
            self._stop(self.buffer, "close", wait, "buffer")
            self.buffer = None
        if self.placement is not None:
            self.placement.release()
            self.placement = None
        if graceful and self.connection is not None and not self.connection.owns_cluster:
            _wait_names_free(names)  # a next run of the same name on this cluster can start at once
        disconnect(self.connection)

    @staticmethod
    def _stop(handle: Any, method: str, wait: float, what: str) -> None:
        if wait > 0:
            try:
                ray.get(getattr(handle, method).remote(), timeout=wait)
            except Exception as e:
                logger.warning("%s did not %s cleanly: %s", what, method, describe_error(e))
        try:
            ray.kill(handle, no_restart=True)  # (no_restart=False keeps a dead actor's name reserved)
        except Exception:  # already gone with its node
            pass


def _wait_names_free(names: list[str], timeout_s: float = 30.0) -> list[str]:
    """Wait until actors of these names are gone (`ray.kill` returns before the name is released);
    returns the names still taken after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    taken = []
    for name in names:
        while True:
            try:
                ray.get_actor(name)
            except ValueError:
                break
            if time.monotonic() > deadline:
                taken.append(name)
                break
            time.sleep(0.1)
    return taken


def _claim_names(run: str, names: list[str]) -> None:
    """Actor names of this run must be free: a previous run of the same name on this cluster may
    still be going away (waited for), or still running (refused, naming it)."""
    taken = _wait_names_free(names)
    if taken:
        raise RuntimeError(
            f"actor name(s) {', '.join(taken)} are taken on this Ray cluster: another run named {run!r} is active; "
            "stop it or set another run.name"
        )
