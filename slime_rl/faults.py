"""Fault injection (`faults:` config section, off by default): for tests, and for users who want to
see what their cluster survives before a long run.

    faults.kill:        [{actor: engine | trainer | buffer | rollout_manager, index: 0, at_step: 5}]
    faults.stop_engine: [{index: 0, at_step: 3, seconds: 30}]       SIGSTOP, then SIGCONT
    faults.reward:      {hang_frac, raise_frac, nan_frac, ...}       rewards/faults.py
    faults.corrupt_rows: [3, 17]                                     train rows made unparsable
    faults.delay_weight_sync_s / delay_weight_sync_at_step           an engine's load held back

The driver applies `kill` and `stop_engine` right after the step `at_step` was logged; the rollout
manager applies the others (rollout/faults.py). What each fault does to a run and what it loses (nothing): the table
in docs/run.md ("Faults").
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
from dataclasses import field
from typing import Any

from slime_rl.rewards.config import RewardFaultsConfig

logger = logging.getLogger(__name__)

ACTORS = ("engine", "trainer", "buffer", "rollout_manager")


@dataclasses.dataclass
class KillFault:
    actor: str = field(default="engine", metadata={"choices": ACTORS})
    """Which actor to kill (`ray.kill`, as if its process or node died)."""
    index: int = field(default=0, metadata={"ge": 0})
    """Which one: the engine serving at this position (by name order), or the trainer rank."""
    at_step: int = field(default=1, metadata={"ge": 1})
    """Kill it right after this step was logged."""


@dataclasses.dataclass
class StopEngineFault:
    index: int = field(default=0, metadata={"ge": 0})
    """The engine serving at this position (by name order)."""
    at_step: int = field(default=1, metadata={"ge": 1})
    """Stop it right after this step was logged."""
    seconds: float = field(default=30.0, metadata={"gt": 0})
    """SIGSTOP its process for this long, then SIGCONT (an engine on this machine only)."""


@dataclasses.dataclass
class FaultsConfig:
    kill: list[KillFault] = field(default_factory=list)
    """Actors to kill at given steps."""
    stop_engine: list[StopEngineFault] = field(default_factory=list)
    """Engines to freeze (SIGSTOP) for a while at given steps: the stall watch treats one that
    stays frozen past `rollout.engine_stall_s` as lost."""
    reward: RewardFaultsConfig = field(default_factory=RewardFaultsConfig)
    """Reward terms that hang, raise or return NaN for a fraction of samples."""
    corrupt_rows: list[int] = field(default_factory=list)
    """0-based lines of the JSONL `data.train_path` to make unparsable when it is loaded (what
    happens then is `data.on_error`)."""
    delay_weight_sync_s: float = field(default=0.0, metadata={"ge": 0})
    """Hold every engine's weight load back this long, at the version `delay_weight_sync_at_step`
    (0 = every version)."""
    delay_weight_sync_at_step: int = field(default=0, metadata={"ge": 0})
    """The version (= trainer step) whose load is delayed; 0 = all."""

    @property
    def any_driver_faults(self) -> bool:
        return bool(self.kill or self.stop_engine)


class FaultInjector:
    """Applies the driver's faults (`kill`, `stop_engine`) after each step."""

    def __init__(self, cfg: FaultsConfig, actors: Any, run_name: str) -> None:
        self.cfg = cfg
        self.actors = actors
        self.run_name = run_name

    def after_step(self, step: int) -> None:
        for fault in self.cfg.kill:
            if fault.at_step == step:
                self._kill(fault)
        for fault in self.cfg.stop_engine:
            if fault.at_step == step:
                self._stop(fault)

    def _engines(self) -> list[dict[str, Any]]:
        import ray

        info = ray.get(self.actors.manager.fleet_info.remote(), timeout=30)
        return sorted(info["engines"], key=lambda e: e["index"])

    def _kill(self, fault: KillFault) -> None:
        import ray

        a = self.actors
        if fault.actor == "engine":
            engines = self._engines()
            if fault.index >= len(engines):
                logger.warning("faults.kill: no engine at position %d (%d serving)", fault.index, len(engines))
                return
            name = engines[fault.index]["name"]
            handle = ray.get_actor(name)
        elif fault.actor == "trainer":
            handle, name = a.trainer.worker_handles()[fault.index], f"trainer rank {fault.index}"
        elif fault.actor == "buffer":
            handle, name = a.buffer, f"{self.run_name}-buffer"
        else:
            handle, name = a.manager, f"{self.run_name}-rollout"
        logger.warning("faults.kill: killing %s (%s) after step %d", name, fault.actor, fault.at_step)
        ray.kill(handle, no_restart=fault.actor != "buffer")  # a buffer with a log restarts and recovers

    def _stop(self, fault: StopEngineFault) -> None:
        import ray

        engines = self._engines()
        if fault.index >= len(engines):
            logger.warning("faults.stop_engine: no engine at position %d (%d serving)", fault.index, len(engines))
            return
        e = engines[fault.index]
        if e.get("node_id") != ray.get_runtime_context().get_node_id() or not e.get("pid"):
            logger.warning("faults.stop_engine: %s runs on another node; only engines on the driver's node can be "
                           "stopped", e["name"])
            return
        pid = int(e["pid"])
        logger.warning("faults.stop_engine: SIGSTOP %s (pid %d) for %.0f s after step %d", e["name"], pid,
                       fault.seconds, fault.at_step)
        os.kill(pid, signal.SIGSTOP)

        def resume() -> None:
            try:
                os.kill(pid, signal.SIGCONT)
            except OSError:  # killed meanwhile as stalled
                pass

        timer = threading.Timer(fault.seconds, resume)
        timer.daemon = True
        timer.start()
