"""A real multi-node Ray cluster on one machine: one `ray start --block` process per node.

For trying multi-node placement and elastic capacity before a real cluster, and for the tests
and the scaling benchmark. Each node gets its own loopback IP (127.0.0.2, 127.0.0.3, ...; the
head keeps the machine's), its own ports and the custom resources asked for. `kill_node`
SIGKILLs a node's raylet (a machine lost without warning); `stop` ends everything. Drivers
(`slime-rl train ... ray.address=<cluster.address>`) run as separate processes with
`cluster_env()`.

>>> c = RayCluster(num_cpus=1, resources={"trainer": 1})        # doctest: +SKIP
>>> node = c.add_node(resources={"rollout": 1})                  # doctest: +SKIP
>>> c.kill_node(node); c.stop()                                  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cluster_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of every process of a test cluster (nodes and drivers): no token auth, no
    inherited address, quiet warnings."""
    env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}", "RAY_AUTH_MODE": "disabled",
           "PYTHONWARNINGS": "ignore", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("RAY_ADDRESS", None)
    env.update(extra or {})
    return env


def _descendants(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout.split()
    children: dict[int, list[int]] = {}
    for p, pp in zip(out[::2], out[1::2]):
        children.setdefault(int(pp), []).append(int(p))
    found, stack = [], [pid]
    while stack:
        for c in children.get(stack.pop(), []):
            found.append(c)
            stack.append(c)
    return found


class Node:
    def __init__(self, proc: subprocess.Popen, ip: str, resources: dict[str, float], log: Path) -> None:
        self.proc, self.ip, self.resources, self.log = proc, ip, resources, log
        self.killed = False

    def raylet_pid(self) -> int | None:
        for pid in _descendants(self.proc.pid):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
            except OSError:
                continue
            if cmd.endswith(b"raylet"):
                return pid
        return None


class RayCluster:
    """Start with `RayCluster(num_cpus=1, resources={"trainer": 1})`, then `add_node(...)`."""

    def __init__(self, num_cpus: int = 1, resources: dict[str, float] | None = None) -> None:
        self.temp = Path(tempfile.mkdtemp(prefix="slc", dir="/tmp"))  # short: socket paths live under it
        self.port = free_port()
        self.nodes: list[Node] = []
        self._next_ip = 2
        self.head = self._start(["--head", f"--port={self.port}", f"--temp-dir={self.temp}", "--include-dashboard=false",
                                 "--disable-usage-stats"], "127.0.0.1", num_cpus, resources or {})
        self.address = f"127.0.0.1:{self.port}"
        self.wait_nodes(1)

    def _start(self, args: list[str], ip: str, num_cpus: int, resources: dict[str, float]) -> Node:
        log = self.temp / f"node-{len(self.nodes)}.log"
        cmd = [str(BIN / "ray"), "start", "--block", *args, f"--node-ip-address={ip}", f"--num-cpus={num_cpus}",
               f"--resources={json.dumps(resources)}", f"--dashboard-agent-listen-port={free_port()}",
               f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
               f"--object-store-memory={300 << 20}"]
        proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=cluster_env(), start_new_session=True)
        node = Node(proc, ip, resources, log)
        self.nodes.append(node)
        return node

    def add_node(self, num_cpus: int = 1, resources: dict[str, float] | None = None, wait: bool = True) -> Node:
        ip = f"127.0.0.{self._next_ip}"
        self._next_ip += 1
        node = self._start([f"--address={self.address}"], ip, num_cpus, resources or {})
        if wait:
            self.wait_nodes(sum(1 for n in self.nodes if n.proc.poll() is None and not n.killed))
        return node

    def alive_nodes(self) -> int:
        code = (f"import ray, json; ray.init(address={self.address!r}, logging_level='ERROR', log_to_driver=False); "
                "print(json.dumps(sum(n['Alive'] for n in ray.nodes())))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cluster_env(), timeout=120)
        return int(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 and out.stdout.strip() else -1

    def wait_nodes(self, n: int, timeout_s: float = 180.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.alive_nodes() != n:
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {nd.log.name}\n{nd.log.read_text()[-1500:]}" for nd in self.nodes)
                raise TimeoutError(f"the test cluster did not reach {n} alive nodes:\n{logs}")
            time.sleep(1.0)

    def kill_node(self, node: Node) -> None:
        """SIGKILL the node's raylet (and so its workers): a machine lost without warning."""
        pid = node.raylet_pid()
        assert pid is not None, f"no raylet under node {node.ip}"
        os.kill(pid, signal.SIGKILL)
        node.killed = True

    def stop(self) -> None:
        for node in reversed(self.nodes):
            if node.proc.poll() is None:
                node.proc.send_signal(signal.SIGTERM)
        for node in reversed(self.nodes):
            try:
                node.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(node.proc.pid, signal.SIGKILL)
        for node in self.nodes:  # anything left of a killed node
            try:
                os.killpg(node.proc.pid, signal.SIGKILL)
            except OSError:
                pass
