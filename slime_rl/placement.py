"""Ray connection and placement: who runs where, and with what resources.

    ray.address unset ─► a local cluster sized to what the run asks for (at least this machine's CPUs)
    ray.address / $RAY_ADDRESS ─► join that cluster
    ray.placement = colocate:     one placement group; engine i and trainer rank i share bundle i
                                  (on GPU they split its device; the engines sleep while training)
    ray.placement = disaggregate: a placement group per side; engines and trainer never share a device

Each actor's Ray options come from `Placement.engine_options(i)` / `Placement.trainer_options(rank)`,
which pin it to its bundle. Resources per actor come from the config: engine CPUs =
`rollout.cpu_threads` (1 when 0), engine GPUs = `rollout.tensor_parallel_size` on a GPU cluster;
trainer CPUs = `trainer.num_threads`, GPUs = `trainer.num_gpus_per_worker`.

A local cluster dies with the driver. Ray ties its head processes (GCS, raylet) to the driver,
but after a SIGKILL the raylet's agents outlive it for about a minute (TRL #3408: engine
processes left behind break the next run). So `connect` marks every process of a cluster it
starts with `SLIME_RL_CLUSTER=<token>` in its environment and starts a small reaper in its own
session; when the driver's end of a pipe closes (normal exit, crash or SIGKILL) the reaper kills
whatever still carries the mark. A joined cluster (`ray.address`) is never touched.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import subprocess
import sys
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

logger = logging.getLogger(__name__)


class PlacementError(RuntimeError):
    """The cluster cannot host the run as configured; the message says what is missing."""


@dataclasses.dataclass(frozen=True)
class Resources:
    engine_cpus: float
    engine_gpus: float
    trainer_cpus: float
    trainer_gpus: float
    num_engines: int
    num_trainers: int

    @property
    def total_cpus(self) -> float:
        return self.engine_cpus * self.num_engines + self.trainer_cpus * self.num_trainers

    @property
    def total_gpus(self) -> float:
        return self.engine_gpus * self.num_engines + self.trainer_gpus * self.num_trainers


def resources_for(cfg: Any, gpu_cluster: bool) -> Resources:
    """Per-actor resources from the config (`Config`)."""
    r, t = cfg.rollout, cfg.trainer
    engine_gpus = float(r.tensor_parallel_size) if gpu_cluster and r.engine != "hf" else 0.0
    return Resources(
        engine_cpus=float(r.cpu_threads or 1),
        engine_gpus=engine_gpus,
        trainer_cpus=float(t.num_threads) if t.num_gpus_per_worker == 0 else 1.0,
        trainer_gpus=float(t.num_gpus_per_worker),
        num_engines=r.num_engines,
        num_trainers=t.num_workers,
    )


NAMESPACE = "slime-rl"
"""Ray namespace of every run's named actors (`ray.get_actor("<run>-rollout", namespace=NAMESPACE)`)."""

CLUSTER_MARK = "SLIME_RL_CLUSTER"
"""Environment variable that marks every process of a local cluster started by `connect`."""

_REAPER = """
import os, signal, sys, time
token, driver, me = sys.argv[1].encode(), int(sys.argv[2]), os.getpid()
mark = b"SLIME_RL_CLUSTER=" + token

def start_time(pid):
    with open(f"/proc/{pid}/stat", "rb") as f:
        return f.read().rsplit(b")", 1)[1].split()[19]

tracked = set()
for line in sys.stdin.buffer:  # ends when the driver's end closes: exit, crash or SIGKILL
    pid, started = line.split()
    if int(pid) != me:
        tracked.add((int(pid), started))
for _ in range(5):
    found = 0
    for pid, started in tracked:
        try:
            if start_time(pid) == started:
                os.kill(pid, signal.SIGKILL)
                found += 1
        except OSError:
            pass
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in (me, driver):
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                if mark in f.read().split(bytes(1)):
                    os.kill(int(name), signal.SIGKILL)
                    found += 1
        except OSError:
            pass
    if not found:
        break
    time.sleep(0.5)
"""
"""Run by the reaper process (standard library only: it idles for the whole run). It kills the
processes the driver reported (pid + start time, so a reused pid is spared) and any process whose
environment carries the cluster's mark. Both are needed: Ray's agents rename themselves
(setproctitle), which overwrites their environment block."""


@dataclasses.dataclass
class Connection:
    """How this process is connected to Ray; `disconnect` undoes what `connect` did."""

    description: str
    owns_cluster: bool = False
    """True when `connect` started a local cluster (it is shut down with the run)."""
    reaper: subprocess.Popen | None = None
    token: str | None = None

    def track(self) -> int:
        """Report every process descended from this one to the reaper (call after the cluster
        and after the actors started). Returns how many were reported."""
        if self.reaper is None or self.reaper.stdin is None:
            return 0
        found = [(pid, t) for pid, t in _descendants(os.getpid()) if pid != self.reaper.pid]
        try:
            self.reaper.stdin.write("".join(f"{pid} {started}\n" for pid, started in found).encode())
            self.reaper.stdin.flush()
        except OSError as e:
            logger.warning("cluster reaper is gone (%s); processes may outlive a crash of this driver", e)
        return len(found)


def _descendants(root: int) -> list[tuple[int, str]]:
    """(pid, start time in clock ticks) of every live descendant of `root`, from /proc."""
    parent: dict[int, int] = {}
    started: dict[int, str] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        parent[int(name)], started[int(name)] = int(fields[1]), fields[19].decode()
    out, frontier = [], [root]
    while frontier:
        pid = frontier.pop()
        for child in (c for c, p in parent.items() if p == pid):
            out.append((child, started[child]))
            frontier.append(child)
    return out


def connect(cfg: Any, runtime_env: dict[str, Any] | None = None) -> Connection:
    """Join `ray.address` (or $RAY_ADDRESS) or start a local cluster that dies with this process.

    Raises whatever `ray.init` raises for an unreachable address (preflight checks it first)."""
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    env = dict(runtime_env or {})
    if ray.is_initialized():
        return Connection("already connected")
    if address:
        ray.init(address=address, runtime_env=env or None, namespace=NAMESPACE, log_to_driver=True,
                 logging_level=logging.WARNING)
        return Connection(f"joined {address}")
    need = resources_for(cfg, gpu_cluster=cfg.trainer.num_gpus_per_worker > 0).total_cpus
    cpus = cfg.ray.num_cpus or max(os.cpu_count() or 1, int(need + 0.999))
    if need > (os.cpu_count() or 1):
        logger.warning(
            "the run asks for %.0f CPUs (engines + trainer workers) on a %d-core machine; they will share cores",
            need, os.cpu_count() or 1,
        )
    token = secrets.token_hex(8)
    reaper = _start_reaper(token)
    os.environ[CLUSTER_MARK] = token  # inherited by the GCS, raylet, agents and every worker
    try:
        ray.init(num_cpus=cpus, include_dashboard=False, runtime_env=env or None, namespace=NAMESPACE,
                 log_to_driver=True, logging_level=logging.WARNING)
    except BaseException:
        _stop_reaper(reaper)
        os.environ.pop(CLUSTER_MARK, None)
        raise
    conn = Connection(f"local cluster ({cpus} CPUs)", owns_cluster=True, reaper=reaper, token=token)
    conn.track()
    return conn


def disconnect(conn: Connection | None) -> None:
    """Shut down a local cluster `connect` started (and let its reaper sweep what is left);
    a joined cluster is only left. Safe to call twice."""
    if conn is None or not conn.owns_cluster:
        return
    try:
        ray.shutdown()
    finally:
        _stop_reaper(conn.reaper)
        if os.environ.get(CLUSTER_MARK) == conn.token:
            del os.environ[CLUSTER_MARK]
        conn.owns_cluster, conn.reaper = False, None


def _start_reaper(token: str) -> subprocess.Popen | None:
    if not sys.platform.startswith("linux"):
        return None  # reads /proc; elsewhere Ray's own fate sharing is all there is
    env = {k: v for k, v in os.environ.items() if k != CLUSTER_MARK}
    return subprocess.Popen(
        [sys.executable, "-c", _REAPER, token, str(os.getpid())], stdin=subprocess.PIPE, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,  # a Ctrl-C must not end it
    )


def _stop_reaper(reaper: subprocess.Popen | None) -> None:
    """Close the pipe (the reaper sweeps and exits) and wait for it briefly."""
    if reaper is None:
        return
    try:
        reaper.stdin.close()
        reaper.wait(timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        logger.warning("cluster reaper (pid %d) did not finish: %s", reaper.pid, e)


class Placement:
    """Placement groups of one run and the Ray options of each actor."""

    def __init__(self, cfg: Any, timeout_s: float = 60.0) -> None:
        gpu = bool(ray.cluster_resources().get("GPU", 0))
        self.res = res = resources_for(cfg, gpu_cluster=gpu)
        self.mode = cfg.ray.placement
        self.groups: list[PlacementGroup] = []
        engine_bundle = {"CPU": res.engine_cpus, **({"GPU": res.engine_gpus} if res.engine_gpus else {})}
        trainer_bundle = {"CPU": res.trainer_cpus, **({"GPU": res.trainer_gpus} if res.trainer_gpus else {})}
        if self.mode == "colocate":
            bundles = [engine_bundle] * res.num_engines + [trainer_bundle] * res.num_trainers
            if gpu and res.trainer_gpus and res.engine_gpus:
                # Shared devices: bundle i holds one device for engine i and trainer rank i.
                n = max(res.num_engines, res.num_trainers)
                bundles = [{"CPU": res.engine_cpus + res.trainer_cpus, "GPU": 1.0}] * n
            self.groups = [self._reserve(bundles, "PACK", timeout_s)]
        else:
            self.groups = [
                self._reserve([engine_bundle] * res.num_engines, "PACK", timeout_s),
                self._reserve([trainer_bundle] * res.num_trainers, "PACK", timeout_s),
            ]
        self._shared_gpu = self.mode == "colocate" and gpu and res.trainer_gpus and res.engine_gpus

    def _reserve(self, bundles: list[dict[str, float]], strategy: str, timeout_s: float) -> PlacementGroup:
        pg = placement_group(bundles, strategy=strategy)
        ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
        if not ready:
            remove_placement_group(pg)
            have = ray.available_resources()
            raise PlacementError(
                f"the cluster cannot host the run: it needs bundles {bundles} ({strategy}) but has "
                f"{ {k: v for k, v in have.items() if k in ('CPU', 'GPU')} } free; lower rollout.num_engines / "
                "trainer.num_workers / their threads, or join a larger cluster (ray.address)"
            )
        return pg

    def _strategy(self, group: int, bundle: int) -> PlacementGroupSchedulingStrategy:
        return PlacementGroupSchedulingStrategy(
            placement_group=self.groups[group], placement_group_bundle_index=bundle,
            placement_group_capture_child_tasks=True,
        )

    def engine_options(self, i: int) -> dict[str, Any]:
        res = self.res
        if self._shared_gpu:
            return {"num_cpus": res.engine_cpus, "num_gpus": 0.5, "scheduling_strategy": self._strategy(0, i)}
        group, bundle = (0, i) if self.mode == "colocate" else (0, i)
        return {"num_cpus": res.engine_cpus, "num_gpus": res.engine_gpus, "scheduling_strategy": self._strategy(group, bundle)}

    def trainer_options(self, rank: int) -> dict[str, Any]:
        res = self.res
        if self._shared_gpu:
            return {"num_cpus": res.trainer_cpus, "num_gpus": 0.5, "scheduling_strategy": self._strategy(0, rank)}
        group, bundle = (0, res.num_engines + rank) if self.mode == "colocate" else (1, rank)
        return {"num_cpus": res.trainer_cpus, "num_gpus": res.trainer_gpus, "scheduling_strategy": self._strategy(group, bundle)}

    def release(self) -> None:
        for pg in self.groups:
            try:
                remove_placement_group(pg)
            except Exception:  # already gone with the cluster
                pass
        self.groups = []
