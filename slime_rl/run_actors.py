"""Every Ray actor of one run, started in order and always shut down together.

    connect (local cluster or ray.address) ─► Placement (placement groups)
      ─► BufferActor ─► EngineActor × rollout.num_engines ─► RolloutManagerActor.setup()
      ─► TrainerGroup (trainer.num_workers ranks) ─► WeightSync
    shutdown(): manager.stop ─► engines shut down ─► trainer group ─► buffer ─► placement groups
                ─► a local cluster this run started (`cluster.disconnect`)
    shutdown(graceful=False) (a second Ctrl-C): every actor killed at once, no clean-up calls

Actor names carry the run name (`<run>-engine-0`, `<run>-buffer`, ...), so `ray list actors`
shows whose they are; `<run_dir>/actors.json` says where each one runs and is rewritten when
engines come and go. Debug modes start only what they need: rollout-only has no trainer,
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

@dataclasses.dataclass
class RunActors:
    cfg: Config
    connection: Connection | None = None
    placement: Placement | None = None
    buffer: Any = None
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
        from slime_rl.weight_sync import lora_sync_plan

        trainer_cfg, engine_lora = lora_sync_plan(cfg)  # LoRA: adapter-only syncs, or merged weights
        if not cfg.run.train_only:
            self._start_rollout(name, model_path, engine_lora)
        if not cfg.run.rollout_only:
            from slime_rl.trainer.group import TrainerGroup

            self.trainer = TrainerGroup(trainer_cfg, model_path, actor_options=self.placement.trainer_options, name=f"{name}-trainer")
        self.connection.track()  # the actors' processes die with this driver, also on SIGKILL
        if self.trainer is not None and self.manager is not None:
            from slime_rl.weight_sync import WeightSync

            self.weight_sync = WeightSync(
                cfg.weight_sync.transport, self.trainer, self.manager,
                bucket_bytes=int(cfg.weight_sync.bucket_mb * (1 << 20)),
                run_dir=cfg.run_dir, timeout_s=cfg.weight_sync.timeout_s, use_gpu=cfg.trainer.num_gpus_per_worker > 0,
                lora_adapter_only=(engine_lora is not None) if cfg.trainer.lora.rank > 0 else None,
            )
        self.write_actors_json()

    def _start_rollout(self, name: str, model_path: str, engine_lora: dict[str, Any] | None = None) -> None:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from slime_rl.buffers import create_buffer_actor
        from slime_rl.rollout.launcher import EngineLaunchSpec
        from slime_rl.rollout.manager import ManagerSpec
        from slime_rl.rollout.manager_actor import start_rollout_manager

        cfg = self.cfg
        if not self.connection.owns_cluster:
            _claim_names(name, [f"{name}-buffer", f"{name}-rollout",
                                *(f"{name}-engine-{i}" for i in range(cfg.rollout.num_engines))])
        # The buffer and the manager stay with the driver: a rollout node that leaves takes only engines.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        # With a log (buffer.spill_dir) a buffer that dies is restarted by Ray and rebuilds itself from
        # the log; calls in flight are retried (its put is idempotent per group id).
        restarts = {"max_restarts": 3, "max_task_retries": -1} if cfg.buffer.spill_dir else {}
        # Without a log, the buffer's history could only live in its memory, and nothing in a run
        # exports it (samples/ has every trained sample): keep none, or the actor grows for hours.
        buffer_cfg = cfg.buffer if cfg.buffer.spill_dir else dataclasses.replace(cfg.buffer, keep_history=False)
        self.buffer = create_buffer_actor(buffer_cfg, group_size=cfg.rollout.n_samples_per_prompt,
                                          name=f"{name}-buffer", scheduling_strategy=here, **restarts)
        ray.get(self.buffer.ready.remote())
        custom = dict(cfg.ray.engine_resources)
        rollout = cfg.rollout  # engines serving a LoRA adapter get its config as engine_kwargs["lora"]
        if engine_lora is not None:
            rollout = dataclasses.replace(rollout, engine_kwargs={**rollout.engine_kwargs, "lora": engine_lora})
        launch = EngineLaunchSpec(
            rollout=rollout, model_path=model_path, bundle_options=self.placement.engine_bundle_options(),
            elastic_options=self.placement.elastic_options(), runtime_env=dict(cfg.ray.runtime_env),
            elastic_resource=next(iter(custom), None), elastic_amount=float(next(iter(custom.values()), 1.0)),
        )
        spec = ManagerSpec(
            rollout=cfg.rollout, data=cfg.data, reward=cfg.reward, eval=cfg.eval, model_path=model_path,
            tokenizer_path=cfg.model.tokenizer_path, global_batch_groups=cfg.trainer.global_batch_groups,
            max_staleness=cfg.max_staleness(), seed=cfg.run.seed, base_dir=str(Path.cwd()), launch=launch,
            engine_prefix=f"{name}-engine", trace=cfg.logging.trace, reward_faults=cfg.faults.reward,
            corrupt_rows=list(cfg.faults.corrupt_rows), delay_weight_sync_s=cfg.faults.delay_weight_sync_s,
            delay_weight_sync_at_step=cfg.faults.delay_weight_sync_at_step, teacher=teacher_spec(cfg),
        )
        self.manager = start_rollout_manager(spec, [], [], self.buffer, name=f"{name}-rollout", scheduling_strategy=here)
        self.setup_info = ray.get(self.manager.setup.remote())
        logger.info("rollout side ready: %s", self.setup_info)

    # ---- where everything runs -----------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """Every actor of the run: role, index, name, Ray node id, node IP, pid, resources (and each
        engine's state); plus the cluster address a `slime-rl scale` needs."""
        out: list[dict[str, Any]] = []

        def add(role: str, index: int, name: str, handle: Any, resources: dict[str, float]) -> None:
            try:
                node = ray.get(handle.node_info.remote(), timeout=CALL_TIMEOUT_S)
            except Exception as e:  # gone: say so rather than fail the run
                node = {"error": describe_error(e)}
            out.append({"role": role, "index": index, "name": name, **node, "resources": resources})

        run = self.cfg.run.name
        if self.buffer is not None:
            add("buffer", 0, f"{run}-buffer", self.buffer, {"CPU": 0.0})
        fleet: dict[str, Any] = {}
        if self.manager is not None:
            add("rollout_manager", 0, f"{run}-rollout", self.manager, {"CPU": 0.0})
            try:
                fleet = ray.get(self.manager.fleet_info.remote(), timeout=CALL_TIMEOUT_S)
            except Exception as e:
                fleet = {"error": describe_error(e), "engines": []}
            for e in fleet.get("engines", []):
                out.append({"role": "engine", **e})
        if self.trainer is not None:
            for rank, handle in enumerate(self.trainer.worker_handles()):
                opts = self.placement.trainer_options(rank) if self.placement else {}
                res = {"CPU": float(opts.get("num_cpus", 0)), "GPU": float(opts.get("num_gpus", 0)), **opts.get("resources", {})}
                add("trainer", rank, f"{run}-trainer-rank{rank}", handle, res)
        ctx = ray.get_runtime_context()
        return {"run": run, "ray_address": ctx.gcs_address, "namespace": ctx.namespace,
                "driver_node_id": ctx.get_node_id(), "engines_target": fleet.get("target"), "actors": out}

    def write_actors_json(self) -> Path:
        """Write `<run_dir>/actors.json` (atomically)."""
        import json

        path = self.cfg.run_dir / "actors.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.describe(), indent=1, default=str))
        tmp.replace(path)
        return path

    def check_rollout(self, step: int) -> dict[str, int]:
        """Raise RunError if the rollout side failed (naming it and the step); else its status
        (`in_flight`, `engines_up`, `engines_target`, `engines_need_weights`)."""
        name = f"{self.cfg.run.name}-rollout"
        try:
            return ray.get(self.manager.check.remote(), timeout=CALL_TIMEOUT_S)
        except Exception as e:
            raise RunError(f"step {step}: the rollout manager ({name}) failed: {describe_error(e)}") from e

    def shutdown(self, graceful: bool = True) -> None:
        """Stop and kill every actor of the run, then a local cluster it started (safe to call
        twice, and after partial starts). `graceful=False` kills without clean-up calls."""
        wait = CALL_TIMEOUT_S if graceful else 0.0
        names = [f"{self.cfg.run.name}-{n}" for n in ("rollout", "buffer")]
        if self.manager is not None:
            if graceful:
                try:
                    names += [e["name"] for e in ray.get(self.manager.fleet_info.remote(), timeout=wait)["engines"]]
                except Exception:  # the manager is gone: its engines went with it
                    pass
            self._stop(self.manager, "stop", 2 * wait, "rollout manager")  # also shuts its engines down
            self.manager = None
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


def teacher_spec(cfg: Any) -> Any:
    """The rollout side's `TeacherSpec` from `trainer.distill` (None while `teacher_path` is null)."""
    d = cfg.trainer.distill
    if not d.enabled:
        return None
    from slime_rl.rollout.teacher import TeacherSpec

    return TeacherSpec(path=str(Path(d.teacher_path).resolve()), device=d.device, dtype=d.dtype,
                       temperature=cfg.sampling_temperature(), num_threads=d.num_threads, num_cpus=d.num_cpus,
                       num_gpus=d.num_gpus, max_tokens_per_batch=d.max_tokens_per_batch, timeout_s=d.timeout_s)
