"""A machine that already runs Ray (`ray start --head`, as on a shared node): `slime-rl train`
without `ray.address` joins that cluster and says so; `ray.address=local` starts a private one."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from run_helpers import _base, _config_file, _train_lines, _write_data

from slime_rl.local_cluster import BIN, free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture
def shared_head(tmp_path: Path):
    """`ray start --head` as a user types it: default temp dir (so Ray records the address where
    every later `ray.init()` looks), token auth on."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    env["PATH"] = f"{BIN}:{env.get('PATH', '')}"
    port = free_port()
    log = (tmp_path / "head.log").open("w")
    proc = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", "--num-cpus=4",
                             "--include-dashboard=false", "--disable-usage-stats",
                             f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}",
                             f"--runtime-env-agent-port={free_port()}", f"--ray-client-server-port={free_port()}"],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + 120
    while "Ray runtime started" not in (tmp_path / "head.log").read_text():
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "head.log").read_text()
        time.sleep(0.5)
    try:
        yield env
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        recorded = Path("/tmp/ray/ray_current_cluster")  # Ray leaves it behind: do not point later ray.init()s at a dead head
        if recorded.exists() and recorded.read_text().strip().endswith(f":{port}"):
            recorded.unlink()


def test_train_joins_the_cluster_running_on_this_machine(shared_head: dict, tmp_path: Path, tiny_model_dir: Path) -> None:
    data = _write_data(tmp_path / "data", 40)
    base = [*_base(tmp_path, tiny_model_dir, data), "run.num_steps=2"]
    for name, extra, expect in (
        ("joined", [], "joined the Ray cluster already running on this machine"),
        ("private", ["ray.address=local"], "ray: local cluster"),
    ):
        out = subprocess.run([str(BIN / "slime-rl"), "train", _config_file(tmp_path, [*base, f"run.name={name}", *extra])],
                             capture_output=True, text=True, env={**shared_head, "PYTHONWARNINGS": "ignore"}, timeout=400)
        assert out.returncode == 0, out.stderr[-3000:]
        assert expect in out.stderr, out.stderr[-3000:]
        assert [r["step"] for r in _train_lines(tmp_path / "runs" / name)] == [1, 2]
