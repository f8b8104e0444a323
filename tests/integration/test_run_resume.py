"""A run as a user drives it: SIGKILL then resume, an epoch boundary in a checkpoint, Ctrl-C
(once: graceful; twice: abort), and an actor killed mid-run.

The resume invariant checked here (docs/run.md, "Checkpoint and resume"): over the whole run,
every dataset position the cursor handed out is either trained exactly once (in the final
`samples/step_*.parquet`) or still buffered / in flight in the final checkpoint; no group is
trained twice. Runs use the random tiny model, the hf engine and a few steps.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from run_helpers import (  # noqa: F401
    REWARD,
    SLIME_RL,
    _assert_nothing_left,
    _base,
    _config_file,
    _cursor_group_ids,
    _group_accounting,
    _latest_checkpoint,
    _session_processes,
    _start,
    _train_lines,
    _wait_for,
    _write_data,
)

from slime_rl.config import load_config
from slime_rl.driver import Driver


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("staleness", [0, 1])
def test_sigkill_then_resume_trains_every_group_once(tmp_path: Path, tiny_model_dir: Path, staleness: int) -> None:
    """Async mode. With staleness 0 every trained token is fresh, which checks that the engines
    serve the restored weights; with 1 the bound holds across the resume."""
    data = _write_data(tmp_path / "data", 64)
    overrides = [*_base(tmp_path, tiny_model_dir, data), f"data.eval_path={data / 'eval.jsonl'}", "eval.max_prompts=4",
                 "eval.max_new_tokens=4", "run.name=k", "run.num_steps=8", "checkpoint.interval=3",
                 f"buffer.max_staleness={staleness}", "trainer.optim.warmup_steps=16"]
    cfg = _config_file(tmp_path, overrides)
    run_dir = tmp_path / "runs" / "k"
    log = tmp_path / "first.log"
    proc = _start([cfg], log)
    # SIGKILL once a checkpoint exists and at least one step after it was trained (and logged)
    _wait_for(lambda: (c := _latest_checkpoint(run_dir)) > 0 and any(r["step"] > c for r in _train_lines(run_dir)), proc, log)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    ckpt = _latest_checkpoint(run_dir)
    before = {r["step"]: r for r in _train_lines(run_dir)}
    assert max(before) > ckpt >= 3
    _assert_nothing_left(proc.pid)  # TRL #3408: no raylet, agent or actor of the killed run lives on

    log2 = tmp_path / "resume.log"
    resumed = _start([cfg, "checkpoint.resume=auto"], log2)
    assert resumed.wait(timeout=600) == 0, log2.read_text()[-3000:]
    _assert_nothing_left(resumed.pid)
    err = log2.read_text()
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{ckpt:06d}'} at step {ckpt}" in err
    assert "Unhandled error" not in err, "a failed Ray call left unread (Ray prints its traceback)"

    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r.get("kind") != "eval"]
    assert [r["step"] for r in steps] == list(range(1, 9)), "each step exactly once in metrics.jsonl"
    assert [r["policy_version"] for r in steps] == list(range(1, 9)), "the policy version continues"
    for r in steps:  # linear warm-up over 16 optimizer steps: the schedule continued, not restarted
        assert r["lr"] == pytest.approx(1e-2 * r["step"] / 16, rel=1e-6), (r["step"], r["lr"])
    for r in steps[:ckpt]:  # lines up to the checkpoint are the killed run's, kept as they were
        assert r == before[r["step"]]
    evals = [r for r in rows if r.get("kind") == "eval"]
    assert [(e["step"], e["eval/version"]) for e in evals] == [(0, 0), (ckpt, ckpt), (8, 8)]
    assert all(r["staleness_max"] <= staleness for r in steps), "the staleness bound holds across the resume"
    assert all(r["buffer/dropped_stale"] == 0 for r in steps), "no group dropped as stale, before or after the resume"
    if staleness == 0:  # the engines serve the restored policy: engine log-probs match the trainer's
        fresh = [r["train/logprob_mismatch_fresh"] for r in steps[ckpt:]]
        assert max(fresh) < 1e-3 and all(r["train/logprob_mismatch"] == r["train/logprob_mismatch_fresh"]
                                         for r in steps[ckpt:]), fresh

    groups = _group_accounting(run_dir, 2, data / "train.jsonl", tiny_model_dir)
    assert len(groups["trained"]) == 8 * 2


@pytest.mark.timeout(600)
def test_checkpoint_at_an_epoch_boundary_resumes_into_the_next_epoch(
    ray_cluster, tmp_path: Path, tiny_model_dir: Path
) -> None:
    data = _write_data(tmp_path / "data", 6)
    base = [*_base(tmp_path, tiny_model_dir, data), "run.name=ep", "run.mode=sync"]
    Driver(load_config(None, [*base, "run.num_steps=2"])).run()
    run_dir = tmp_path / "runs" / "ep"
    state = json.loads((run_dir / "checkpoints" / "step_000002" / "run_state.json").read_text())["rollout"]
    # sync mode: after the final sync the next 2 groups (the last of epoch 0) were admitted
    assert (state["cursor"]["epoch"], state["cursor"]["position"]) == (0, 6), state["cursor"]
    pending = _group_accounting(run_dir, 2, data / "train.jsonl", tiny_model_dir)
    assert len(pending["trained"]) == 4 and len(pending["buffered"] | pending["in_flight"]) == 2

    result = Driver(load_config(None, [*base, "run.num_steps=5", "checkpoint.resume=auto"])).run()
    assert result["last_step"] == 5 and not result["interrupted"]
    steps = _train_lines(run_dir)
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5] and [r["policy_version"] for r in steps] == [1, 2, 3, 4, 5]
    # sync mode: every token is fresh, so this checks the engines serve the restored weights
    assert max(r["train/logprob_mismatch_fresh"] for r in steps[2:]) < 1e-3
    groups = _group_accounting(run_dir, 2, data / "train.jsonl", tiny_model_dir)
    epochs = Counter(g.rsplit("-e", 1)[1] for g in groups["trained"])
    assert epochs == {"0": 6, "1": 4}, epochs  # all of epoch 0 once, then epoch 1 (not an empty epoch)


@pytest.mark.timeout(600)
def test_resume_forgets_batches_trained_after_the_checkpoint(ray_cluster, tmp_path: Path, tiny_model_dir: Path) -> None:
    """A run killed after step 4 saved its batch but before checkpoint 4 was complete, resumed from
    checkpoint 2 and stopped at step 3: step 4's batch is not part of the run any more."""
    import shutil

    data = _write_data(tmp_path / "data", 64)
    base = [*_base(tmp_path, tiny_model_dir, data), "run.name=drop", "checkpoint.interval=2"]
    Driver(load_config(None, [*base, "run.num_steps=4"])).run()
    run_dir = tmp_path / "runs" / "drop"
    shutil.rmtree(run_dir / "checkpoints" / "step_000004")
    assert (run_dir / "samples" / "step_000004.parquet").exists()
    Driver(load_config(None, [*base, "run.num_steps=3", "checkpoint.resume=auto"])).run()
    assert sorted(p.name for p in (run_dir / "samples").glob("*.parquet")) == [f"step_00000{i}.parquet" for i in (1, 2, 3)]
    assert [r["step"] for r in _train_lines(run_dir)] == [1, 2, 3]
    _group_accounting(run_dir, 2, data / "train.jsonl", tiny_model_dir)


def _stop_with_sigint(tmp_path: Path, model_dir: Path, name: str, times: int,
                      sig: int = signal.SIGINT) -> tuple[int, float, Path, str]:
    data = _write_data(tmp_path / "data", 64)
    cfg = _config_file(tmp_path, [*_base(tmp_path, model_dir, data), f"run.name={name}", "run.num_steps=50",
                                  "rollout.max_new_tokens=16"])
    run_dir = tmp_path / "runs" / name
    log = tmp_path / f"{name}.log"
    proc = _start([cfg], log)
    _wait_for(lambda: len(_train_lines(run_dir)) >= 2, proc, log)
    t0 = time.monotonic()
    for i in range(times):  # SIGINT: to the whole process group, as a terminal's Ctrl-C does
        if sig == signal.SIGINT:
            os.killpg(proc.pid, sig)
        else:  # SIGTERM: to the driver only, as `kill PID` or a scheduler's stop does
            os.kill(proc.pid, sig)
        if i + 1 < times:
            time.sleep(0.3)
    rc = proc.wait(timeout=120)
    took = time.monotonic() - t0
    _assert_nothing_left(proc.pid)
    return rc, took, run_dir, log.read_text()


@pytest.mark.timeout(600)
def test_ctrl_c_finishes_the_step_checkpoints_and_exits_130(tmp_path: Path, tiny_model_dir: Path) -> None:
    rc, took, run_dir, err = _stop_with_sigint(tmp_path, tiny_model_dir, "cc", times=1)
    assert rc == 130, err[-3000:]
    assert "stopped by Ctrl-C after step" in err and "Traceback" not in err
    steps = [r["step"] for r in _train_lines(run_dir)]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) < 50
    assert _latest_checkpoint(run_dir) == steps[-1], "the final checkpoint is of the last step trained"
    assert took < 60, f"stopping took {took:.0f} s"


@pytest.mark.timeout(600)
def test_sigterm_stops_like_ctrl_c_and_exits_143(tmp_path: Path, tiny_model_dir: Path) -> None:
    rc, took, run_dir, err = _stop_with_sigint(tmp_path, tiny_model_dir, "term", times=1, sig=signal.SIGTERM)
    assert rc == 143, err[-3000:]
    assert "stopped by SIGTERM after step" in err and "Traceback" not in err
    steps = [r["step"] for r in _train_lines(run_dir)]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) < 50
    assert _latest_checkpoint(run_dir) == steps[-1], "the final checkpoint is of the last step trained"


@pytest.mark.timeout(600)
def test_second_ctrl_c_aborts_at_once(tmp_path: Path, tiny_model_dir: Path) -> None:
    rc, took, _, err = _stop_with_sigint(tmp_path, tiny_model_dir, "cc2", times=2)
    assert rc == 130, err[-3000:]
    assert "aborted (second Ctrl-C)" in err and "Traceback" not in err
    assert took < 30, f"aborting took {took:.0f} s"


@pytest.mark.timeout(600)
def test_killed_rollout_manager_ends_the_run_naming_it(
    ray_cluster, tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import ray

    from slime_rl.cli import main

    data = _write_data(tmp_path / "data", 64)
    cfg = _config_file(tmp_path, [*_base(tmp_path, tiny_model_dir, data), "run.name=km", "run.num_steps=200"])
    run_dir = tmp_path / "runs" / "km"
    killed: list[float] = []

    def kill_after_step_2() -> None:
        deadline = time.monotonic() + 300
        while len(_train_lines(run_dir)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        ray.kill(ray.get_actor("km-rollout"))
        killed.append(time.monotonic())

    killer = threading.Thread(target=kill_after_step_2, daemon=True)
    killer.start()
    rc = main(["train", cfg])
    ended = time.monotonic()
    killer.join(timeout=5)
    err = capsys.readouterr().err
    assert killed, "the rollout manager was never killed"
    assert rc == 1
    line = next(x for x in err.splitlines() if x.startswith("slime-rl: run failed:"))
    assert "km-rollout" in line and "step " in line and "ray.kill" in line, line
    assert ended - killed[0] < 30, f"the run took {ended - killed[0]:.0f} s to notice"
