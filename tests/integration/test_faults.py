"""Each fault of the `faults:` config section on the tiny model, with the group accounting of the
whole run: what the run does, and that nothing accepted is lost or trained twice (docs/run.md,
"Faults")."""

from __future__ import annotations

from pathlib import Path

import pytest
from run_helpers import _base, _group_accounting, _train_lines, _write_data

from slime_rl.config import load_config
from slime_rl.driver import Driver
from slime_rl.errors import RunError

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _run(tmp_path: Path, model_dir: Path, name: str, *overrides: str) -> tuple[dict, Path, Path]:
    data = _write_data(tmp_path / "data", 200)
    cfg = load_config(None, [*_base(tmp_path, model_dir, data), f"run.name={name}", *overrides])
    return Driver(cfg).run(), tmp_path / "runs" / name, data


def test_engine_killed_run_goes_on(ray_cluster, tmp_path: Path, tiny_model_dir: Path) -> None:
    result, run_dir, data = _run(tmp_path, tiny_model_dir, "fk", "rollout.num_engines=2", "run.num_steps=8",
                                 "faults.kill=[{actor: engine, index: 0, at_step: 2}]", "rollout.max_new_tokens=16")
    steps = _train_lines(run_dir)
    assert result["last_step"] == 8 and steps[-1]["rollout/engines_lost"] == 1.0
    _group_accounting(run_dir, 2, data / "train.jsonl", tiny_model_dir)


def test_engine_stopped_is_treated_as_lost(ray_cluster, tmp_path: Path, tiny_model_dir: Path) -> None:
    """SIGSTOP for longer than rollout.engine_stall_s: killed as stalled, its groups requeued, replaced."""
    result, run_dir, data = _run(tmp_path, tiny_model_dir, "fs", "rollout.num_engines=2", "run.num_steps=120",
                                 "faults.stop_engine=[{index: 0, at_step: 2, seconds: 120}]", "rollout.engine_stall_s=4",
                                 "rollout.max_new_tokens=16", "buffer.max_staleness=2")
    steps = _train_lines(run_dir)
    assert result["last_step"] == 120
    assert steps[-1]["rollout/engines_killed_stalled"] == 1.0 and steps[-1]["rollout/engines_lost"] == 1.0
    # the step that waited on the stopped engine: caught within ~1.5x engine_stall_s (+ a probe period)
    assert max(r["step_time_s"] for r in steps) < 15, [round(r["step_time_s"], 1) for r in steps]
    after = [r["rollout/num_engines"] for r in steps if r["rollout/engines_lost"] == 1.0]
    assert 1.0 in after and after[-1] == 2.0, f"no replacement engine came up: {after}"
    _group_accounting(run_dir, 2, data / "train.jsonl", tiny_model_dir)


def test_trainer_worker_killed_stops_then_resume_continues(ray_cluster, tmp_path: Path, tiny_model_dir: Path) -> None:
    extra = ["checkpoint.interval=2", "faults.kill=[{actor: trainer, index: 0, at_step: 3}]"]
    with pytest.raises(RunError, match=r"step 4: .*trainer.*(rank 0|died)"):
        _run(tmp_path, tiny_model_dir, "ft", "run.num_steps=8", *extra)
    result, run_dir, data = _run(tmp_path, tiny_model_dir, "ft", "run.num_steps=8", "checkpoint.resume=auto")
    assert result["last_step"] == 8
    assert [r["step"] for r in _train_lines(run_dir)] == list(range(1, 9))
    _group_accounting(run_dir, 2, data / "train.jsonl", tiny_model_dir)


def test_buffer_killed_is_restored_from_its_log(ray_cluster, tmp_path: Path, tiny_model_dir: Path) -> None:
    result, run_dir, data = _run(tmp_path, tiny_model_dir, "fb", "run.num_steps=8", f"buffer.spill_dir={tmp_path / 'spill'}",
                                 "faults.kill=[{actor: buffer, at_step: 3}]")
    assert result["last_step"] == 8
    assert [r["step"] for r in _train_lines(run_dir)] == list(range(1, 9))
    _group_accounting(run_dir, 2, data / "train.jsonl", tiny_model_dir)


def test_rollout_manager_killed_stops_cleanly_then_resumes(ray_cluster, tmp_path: Path, tiny_model_dir: Path) -> None:
    with pytest.raises(RunError, match=r"fm-rollout"):
        _run(tmp_path, tiny_model_dir, "fm", "run.num_steps=8", "checkpoint.interval=2",
             "faults.kill=[{actor: rollout_manager, at_step: 3}]")
    result, run_dir, data = _run(tmp_path, tiny_model_dir, "fm", "run.num_steps=8", "checkpoint.resume=auto")
    assert result["last_step"] == 8
    _group_accounting(run_dir, 2, data / "train.jsonl", tiny_model_dir)


def test_reward_faults_are_counted_and_the_run_goes_on(ray_cluster, tmp_path: Path, tiny_model_dir: Path) -> None:
    result, run_dir, _ = _run(tmp_path, tiny_model_dir, "fr", "run.num_steps=5", "reward.timeout_s=0.5",
                              "faults.reward={hang_frac: 0.1, raise_frac: 0.2, nan_frac: 0.1}")
    assert result["last_step"] == 5
    steps = _train_lines(run_dir)
    failed = sum(v for r in steps for k, v in r.items() if k.startswith("reward/") and k.endswith("failed"))
    assert failed > 0, [k for k in steps[-1] if k.startswith("reward/")]


def test_corrupt_rows_are_skipped_and_counted(ray_cluster, tmp_path: Path, tiny_model_dir: Path) -> None:
    result, run_dir, _ = _run(tmp_path, tiny_model_dir, "fc", "run.num_steps=3", "faults.corrupt_rows=[0, 5, 9]")
    assert result["last_step"] == 3
    assert _train_lines(run_dir)[-1]["data/skipped_rows"] == 3.0


def test_delayed_weight_sync_is_waited_for_and_measured(ray_cluster, tmp_path: Path, tiny_model_dir: Path) -> None:
    result, run_dir, _ = _run(tmp_path, tiny_model_dir, "fd", "run.num_steps=5", "faults.delay_weight_sync_s=3",
                              "faults.delay_weight_sync_at_step=2")
    assert result["last_step"] == 5
    syncs = {r["step"]: r["weight_sync/seconds"] for r in _train_lines(run_dir)}
    assert syncs[3] >= 3.0 > max(syncs[4], syncs[5]), syncs  # the sync of version 2 is reported at step 3
