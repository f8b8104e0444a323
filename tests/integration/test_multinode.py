"""Runs on a real multi-node Ray cluster on this machine (raylets started by the test): placement by
custom resources (colocate and disaggregate), a rollout node killed mid-run, a node added to an
elastic run, and `slime-rl scale` to 0 and back. Every run is a `slime-rl train` subprocess
joined to the cluster; every check reads what a user would: actors.json, metrics.jsonl, the
trained samples (no group lost or trained twice) and the console.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from run_helpers import (
    _base,
    _config_file,
    _group_accounting,
    _start,
    _train_lines,
    _wait_for,
    _write_data,
)

from slime_rl.local_cluster import BIN, RayCluster, cluster_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture
def cluster():
    c = RayCluster(num_cpus=1, resources={"trainer": 1})
    try:
        yield c
    finally:
        c.stop()


def _run_args(tmp_path: Path, model_dir: Path, address: str, *extra: str) -> tuple[list[str], Path, Path]:
    data = _write_data(tmp_path / "data", 200)
    overrides = [*_base(tmp_path, model_dir, data), f"ray.address={address}", "ray.engine_resources={rollout: 1}",
                 "ray.trainer_resources={trainer: 1}", "trainer.num_threads=1", "buffer.max_staleness=1", *extra]
    return [_config_file(tmp_path, overrides)], tmp_path / "runs", data


def _finish(proc: subprocess.Popen, log: Path, timeout: float = 600) -> None:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"the run did not finish:\n{log.read_text()[-4000:]}")
    assert proc.returncode == 0, f"rc {proc.returncode}:\n{log.read_text()[-4000:]}"


def _actors(run_dir: Path) -> dict:
    return json.loads((run_dir / "actors.json").read_text())


def _engine_ips(run_dir: Path) -> list[str]:
    return sorted(a["node_ip"] for a in _actors(run_dir)["actors"] if a["role"] == "engine")


@pytest.mark.parametrize("placement", ["disaggregate", "colocate"])
def test_engines_on_rollout_nodes_trainer_on_its_own(cluster: RayCluster, tmp_path: Path, tiny_model_dir: Path,
                                                     placement: str) -> None:
    a, b = cluster.add_node(resources={"rollout": 1}), cluster.add_node(resources={"rollout": 1})
    args, runs, _ = _run_args(tmp_path, tiny_model_dir, cluster.address, f"ray.placement={placement}",
                              "rollout.num_engines=2", "run.num_steps=3", "run.name=place")
    log = tmp_path / "run.log"
    proc = _start(args, log, env=cluster_env())
    _finish(proc, log)
    run_dir = runs / "place"
    info = _actors(run_dir)
    roles = {x["role"]: x for x in info["actors"] if x["role"] != "engine"}
    head_ip = roles["buffer"]["node_ip"]
    assert roles["rollout_manager"]["node_ip"] == head_ip == roles["trainer"]["node_ip"] not in (a.ip, b.ip)
    assert _engine_ips(run_dir) == sorted([a.ip, b.ip]), info
    assert all(x["resources"].get("rollout") == 1.0 for x in info["actors"] if x["role"] == "engine")
    assert [r["rollout/num_engines"] for r in _train_lines(run_dir)] == [2.0, 2.0, 2.0]


def test_rollout_node_killed_mid_run_loses_no_group(cluster: RayCluster, tmp_path: Path, tiny_model_dir: Path) -> None:
    cluster.add_node(resources={"rollout": 1})
    b = cluster.add_node(resources={"rollout": 1})
    args, runs, data = _run_args(tmp_path, tiny_model_dir, cluster.address, "ray.placement=disaggregate",
                                 "rollout.num_engines=2", "run.num_steps=10", "run.name=kill", "rollout.max_new_tokens=16")
    log = tmp_path / "run.log"
    proc = _start(args, log, env=cluster_env())
    run_dir = runs / "kill"
    _wait_for(lambda: len(_train_lines(run_dir)) >= 3, proc, log)
    cluster.kill_node(b)
    _finish(proc, log)
    steps = _train_lines(run_dir)
    assert [r["step"] for r in steps] == list(range(1, 11))
    assert steps[0]["rollout/num_engines"] == 2.0 and steps[-1]["rollout/num_engines"] == 1.0
    assert steps[-1]["rollout/engines_lost"] == 1.0
    text = log.read_text()
    assert f"lost on node {b.ip}" in text and "group(s) go back to the queue" in text, text[-3000:]
    assert _engine_ips(run_dir) != sorted({b.ip}) and b.ip not in _engine_ips(run_dir)
    _group_accounting(run_dir, 2, data / "train.jsonl", tiny_model_dir)  # nothing lost or trained twice


def test_elastic_run_takes_a_node_that_joins(cluster: RayCluster, tmp_path: Path, tiny_model_dir: Path) -> None:
    cluster.add_node(resources={"rollout": 1})
    args, runs, data = _run_args(tmp_path, tiny_model_dir, cluster.address, "ray.placement=disaggregate",
                                 "rollout.elastic=true", "rollout.num_engines=0", "run.num_steps=1000", "run.name=grow")
    log = tmp_path / "run.log"
    proc = _start(args, log, env=cluster_env())
    run_dir = runs / "grow"
    _wait_for(lambda: len(_train_lines(run_dir)) >= 3, proc, log)
    joined_at = len(_train_lines(run_dir))
    new = cluster.add_node(resources={"rollout": 1})
    _wait_for(lambda: [r["rollout/num_engines"] for r in _train_lines(run_dir)][-3:] == [2.0] * 3, proc, log)
    proc.send_signal(signal.SIGINT)  # Ctrl-C: the step in progress, a checkpoint, exit 130
    assert proc.wait(timeout=300) == 130, log.read_text()[-3000:]
    steps = _train_lines(run_dir)
    assert steps[0]["rollout/num_engines"] == 1.0 and steps[-1]["rollout/num_engines"] == 2.0
    assert new.ip in _engine_ips(run_dir)
    # The new engine loaded the current weights before it took work: its first samples are not version 0.
    first_new = None
    for path in sorted((run_dir / "samples").glob("step_*.parquet")):
        t = pq.read_table(path, columns=["metadata", "policy_version"]).to_pylist()
        mine = [r["policy_version"] for r in t if json.loads(r["metadata"]).get("engine", "").endswith("-1")]
        if mine:
            first_new = min(mine)
            break
    assert first_new is not None, "the engine on the new node trained nothing"
    assert first_new >= joined_at - 1, f"first sample of the new engine has version {first_new}, joined at step {joined_at}"
    _group_accounting(run_dir, 2, data / "train.jsonl", tiny_model_dir)


def test_scale_to_zero_and_back(tmp_path: Path, tiny_model_dir: Path) -> None:
    """On a local cluster the run starts itself: `slime-rl scale` finds it through actors.json."""
    data = _write_data(tmp_path / "data", 200)
    args = [_config_file(tmp_path, [*_base(tmp_path, tiny_model_dir, data), "rollout.num_engines=2", "run.num_steps=1000",
                                    "run.name=sc", "buffer.max_staleness=1", "rollout.max_new_tokens=16"])]
    log = tmp_path / "run.log"
    proc = _start(args, log, env=cluster_env())
    run_dir = tmp_path / "runs" / "sc"
    _wait_for(lambda: len(_train_lines(run_dir)) >= 2, proc, log)

    def scale(n: int) -> str:
        out = subprocess.run([str(BIN / "slime-rl"), "scale", str(run_dir), "--engines", str(n)], capture_output=True,
                             text=True, env=cluster_env(), timeout=120)
        assert out.returncode == 0, out.stderr
        return out.stdout

    assert "target 0" in scale(0)
    _wait_for(lambda: not [x for x in _actors(run_dir)["actors"] if x["role"] == "engine"], proc, log, timeout=120)
    stalled = len(_train_lines(run_dir))
    time.sleep(8)  # no engine: at most the groups already buffered are trained
    assert len(_train_lines(run_dir)) <= stalled + 2
    assert "target 2" in scale(2)
    # (both new engines serving: the second may come up some steps after the first)
    _wait_for(lambda: len(lines := _train_lines(run_dir)) >= stalled + 5 and lines[-1]["rollout/num_engines"] == 2.0,
              proc, log)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=300) == 130, log.read_text()[-3000:]
    steps = _train_lines(run_dir)
    assert [r["step"] for r in steps] == list(range(1, len(steps) + 1)) and steps[-1]["rollout/num_engines"] == 2.0
    _group_accounting(run_dir, 2, data / "train.jsonl", tiny_model_dir)


def test_no_engine_for_too_long_stops_with_a_checkpoint_and_resumes(tmp_path: Path, tiny_model_dir: Path) -> None:
    data = _write_data(tmp_path / "data", 200)
    base = [*_base(tmp_path, tiny_model_dir, data), "run.name=ne", "rollout.no_engine_timeout_s=6", "rollout.max_new_tokens=8"]
    log = tmp_path / "run.log"
    proc = _start([_config_file(tmp_path, [*base, "run.num_steps=30"])], log, env=cluster_env())
    run_dir = tmp_path / "runs" / "ne"
    _wait_for(lambda: len(_train_lines(run_dir)) >= 2, proc, log)
    subprocess.run([str(BIN / "slime-rl"), "scale", str(run_dir), "--engines", "0"], check=True, env=cluster_env(),
                   capture_output=True, timeout=120)
    proc.wait(timeout=300)
    text = log.read_text()
    assert proc.returncode == 1 and "no rollout engine served for" in text and "resume with checkpoint.resume=auto" in text, text[-3000:]
    done = len(_train_lines(run_dir))
    assert (run_dir / "checkpoints" / f"step_{done:06d}" / "run_state.json").exists()
    proc = _start([_config_file(tmp_path, [*base, f"run.num_steps={done + 2}", "checkpoint.resume=auto"])], log,
                  env=cluster_env())
    _finish(proc, log)
    assert [r["step"] for r in _train_lines(run_dir)] == list(range(1, done + 3))
    _group_accounting(run_dir, 2, data / "train.jsonl", tiny_model_dir)


def test_collective_sync_reaches_a_replacement_engine(tmp_path: Path, tiny_model_dir: Path) -> None:
    """transport=collective (gloo): an engine killed mid-run is replaced; the replacement joins a new
    broadcast group at the next publish and serves the trainer's weights (sync mode: every token is
    fresh, so the trainer/engine log-prob gap says which weights the engines hold)."""
    data = _write_data(tmp_path / "data", 200)
    args = [_config_file(tmp_path, [*_base(tmp_path, tiny_model_dir, data), "rollout.num_engines=2", "run.num_steps=1000",
                                    "run.name=coll", "run.mode=sync", "weight_sync.transport=collective"])]
    log = tmp_path / "run.log"
    proc = _start(args, log, env=cluster_env())
    run_dir = tmp_path / "runs" / "coll"
    _wait_for(lambda: len(_train_lines(run_dir)) >= 3, proc, log)
    kill = ("import json, ray; a = json.load(open({!r})); ray.init(address=a['ray_address'], log_to_driver=False); "
            "ray.kill(ray.get_actor('coll-engine-0', namespace=a['namespace']))").format(str(run_dir / "actors.json"))
    subprocess.run([str(BIN / "python"), "-c", kill], check=True, env=cluster_env(), capture_output=True, timeout=120)
    _wait_for(lambda: [(r["rollout/engines_lost"], r["rollout/num_engines"]) for r in _train_lines(run_dir)][-3:]
              == [(1.0, 2.0)] * 3, proc, log)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=300) == 130, log.read_text()[-3000:]
    steps = _train_lines(run_dir)
    assert all(r["weight_sync/seconds"] > 0 for r in steps[1:])
    assert max(r["train/logprob_mismatch_fresh"] for r in steps[-3:]) < 1e-3, [r["train/logprob_mismatch_fresh"] for r in steps]
    engines = sorted(a["name"] for a in _actors(run_dir)["actors"] if a["role"] == "engine")
    assert engines == ["coll-engine-1", "coll-engine-2"]
    _group_accounting(run_dir, 2, data / "train.jsonl", tiny_model_dir)
