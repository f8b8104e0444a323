"""Every Ray actor of one run, started in order and always shut down together.

    connect (local cluster or ray.address) ─► Placement (placement groups)
      ─► BufferActor ─► EngineActor × rollout.num_engines ─► RolloutManagerActor.setup()
      ─► TrainerGroup (trainer.num_workers ranks) ─► WeightSync
    shutdown(): manager.stop ─► engines shut down ─► trainer group ─► buffer ─► placement groups

Actor names carry the run name (`<run>-engine-0`, `<run>-buffer`, ...), so `ray list actors`
shows whose they are. Debug modes start only what they need: rollout-only has no trainer,
train-only no engines, manager or buffer.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import ray

from slime_rl.config import Config
from slime_rl.placement import Placement, connect

logger = logging.getLogger(__name__)

ENGINE_ENV = {"VLLM_LOGGING_LEVEL": "WARNING", "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning"}
"""Environment of engine actors: vLLM's per-request INFO lines would bury the run's own output."""


@dataclasses.dataclass
class RunActors:
    cfg: Config
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
        except BaseException:
            actors.shutdown()
            raise
        return actors

    def _start(self) -> None:
        from transformers import AutoTokenizer

        cfg = self.cfg
        where = connect(cfg, dict(cfg.ray.runtime_env))
        logger.info("ray: %s", where)
        self.placement = Placement(cfg)
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer_path or cfg.model.path)
        name = cfg.run.name
        model_path = str(Path(cfg.model.path).resolve())
        if not cfg.run.train_only:
            self._start_rollout(name, model_path)
        if not cfg.run.rollout_only:
            from slime_rl.trainer.group import TrainerGroup

            self.trainer = TrainerGroup(cfg.trainer, model_path, actor_options=self.placement.trainer_options, name=f"{name}-trainer")
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
        self.buffer = create_buffer_actor(cfg.buffer, group_size=group_size, name=f"{name}-buffer")
        ray.get(self.buffer.ready.remote())
        names = [f"{name}-engine-{i}" for i in range(cfg.rollout.num_engines)]
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
            tokenizer_path=cfg.model.tokenizer_path, batch_groups=cfg.trainer.global_batch_groups,
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
        """Raise if the rollout side failed (naming it and the step); else a one-line status."""
        from slime_rl.driver import RunError

        try:
            status = ray.get(self.manager.check.remote(), timeout=30)
        except Exception as e:
            raise RunError(f"step {step}: the rollout side ({self.cfg.run.name}-rollout) failed: {e}") from e
        return ", ".join(f"{k}={v}" for k, v in status.items())

    def shutdown(self) -> None:
        """Stop and kill every actor of the run (safe to call twice, and after partial starts)."""
        if self.manager is not None:
            try:
                ray.get(self.manager.stop.remote(), timeout=30)
            except Exception as e:
                logger.warning("rollout manager did not stop cleanly: %s", e)
            ray.kill(self.manager)
            self.manager = None
        for handle in self.engines:
            try:
                ray.get(handle.shutdown.remote(), timeout=30)
            except Exception as e:
                logger.warning("engine did not shut down cleanly: %s", e)
            ray.kill(handle, no_restart=True)
        self.engines = []
        if self.trainer is not None:
            self.trainer.shutdown()
            self.trainer = None
        if self.buffer is not None:
            try:
                ray.get(self.buffer.close.remote(), timeout=30)
            except Exception:
                pass
            ray.kill(self.buffer)
            self.buffer = None
        if self.placement is not None:
            self.placement.release()
            self.placement = None
