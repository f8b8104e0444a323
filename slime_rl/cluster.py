"""Connecting to Ray: join a cluster, or start a local one that dies with this process.

    ray.address unset, no cluster on this machine ─► a local cluster sized to the run (at least
                                                     this machine's CPUs), reaped with the driver
    ray.address unset, `ray start --head` running ─► join it (one line says so)
    ray.address = local                            ─► a private local cluster even then
    ray.address = auto | host:port | ray://…       ─► join that cluster ($RAY_ADDRESS likewise)

A local cluster dies with the driver. Ray ties its head processes (GCS, raylet) to the driver,
but after a SIGKILL the raylet's agents outlive it for about a minute (TRL #3408: engine
processes left behind break the next run). So `connect` marks every process of a cluster it
starts with `SLIME_RL_CLUSTER=<token>` in its environment and starts a small reaper in its own
session; when the driver's end of a pipe closes (normal exit, crash or SIGKILL) the reaper kills
whatever still carries the mark. A joined cluster is never touched.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import ray

from slime_rl.placement import resources_for

logger = logging.getLogger(__name__)


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


def running_local_cluster() -> str | None:
    """The GCS address of a cluster started on this machine (`ray start --head`) that still
    answers, or None (no cluster, or a stale address file of one that was stopped)."""
    try:
        from ray._private.utils import read_ray_address

        address = read_ray_address()
    except Exception:  # a Ray without the helper: behave as if none runs
        return None
    if not address:
        return None
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=2.0).close()
    except (OSError, ValueError):
        return None
    return address


def use_token_if_available() -> None:
    """Send the cluster's token when one is at hand (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
    ~/.ray/auth_token) and RAY_AUTH_MODE is unset: `ray start --head` turns token auth on by
    default, and the job SDK sends the token only in token mode. Ray caches the mode when it is
    imported, so setting the variable is not enough; Ray's own helper also refreshes that."""
    if "RAY_AUTH_MODE" in os.environ:
        return
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if not (os.environ.get("RAY_AUTH_TOKEN") or Path(path or Path.home() / ".ray" / "auth_token").exists()):
        return
    try:  # Ray >= 2.5x; older Ray has no token auth and reads the variable at connect time
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:
        os.environ["RAY_AUTH_MODE"] = "token"
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def connect(cfg: Any, runtime_env: dict[str, Any] | None = None) -> Connection:
    """Join `ray.address` (or $RAY_ADDRESS, or a cluster already running on this machine), or
    start a local cluster that dies with this process (`ray.address=local` forces one).

    Raises whatever `ray.init` raises for an unreachable address (preflight checks it first)."""
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    env = dict(runtime_env or {})
    if ray.is_initialized():
        return Connection("already connected")
    how = f"joined {address}"
    if not address:
        found = running_local_cluster()
        if found:
            address = found
            how = (f"joined the Ray cluster already running on this machine ({found}; ray.address unset); "
                   "set ray.address=local for a private one")
    if address and address != "local":
        use_token_if_available()
        ray.init(address=address, runtime_env=env or None, namespace=NAMESPACE, log_to_driver=True,
                 logging_level=logging.WARNING)
        return Connection(how)
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
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, runtime_env=env or None,
                 namespace=NAMESPACE, log_to_driver=True, logging_level=logging.WARNING)
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
