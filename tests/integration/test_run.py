"""End-to-end RL runs on CPU: the driver with real Ray actors, engines, buffer and trainer.

Runs use the untrained tiny model (fast to build) and short schedules; what they assert is
what a user relies on: the metrics file and its fields, versions that advance, staleness within
the bound, engines serving the trained weights after every sync (fresh-token log-probs match
the trainer's), each weight transport, rollout-only -> train-only.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from slime_rl.config import load_config
from slime_rl.driver import Driver

pytestmark = [pytest.mark.timeout(600)]

HEADLINE = (
    "step", "policy_version", "samples", "reward_mean", "staleness_mean", "staleness_max", "response_len_mean",
    "loss", "grad_norm", "lr", "weight_sync_s", "step_time_s", "samples_per_s", "tokens_per_s",
    "trainer_idle_frac", "rollout_idle_frac",
)

REWARD = '''
def parity(sample, **kwargs):
    """Varies within a group; numeric extras become metrics."""
    return {"score": float(sum(sample.response_ids) % 2), "length": len(sample.response_ids)}
'''


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("run_data")
    rows = [{"prompt": f"What is {i} + {i % 5}?", "label": str(i + i % 5), "mode": "think" if i % 3 else "non_think"} for i in range(200)]
    (d / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (d / "eval.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:8]) + "\n")
    (d / "reward.py").write_text(REWARD)
    return d


def _config(tmp_path: Path, model_dir: Path, data_dir: Path, *overrides: str):
    base = [
        f"model.path={model_dir}", f"data.train_path={data_dir / 'train.jsonl'}", f"data.eval_path={data_dir / 'eval.jsonl'}",
        f"reward.fn={data_dir / 'reward.py'}:parity", f"run.output_dir={tmp_path}", "run.num_steps=4",
        "rollout.engine=hf", "rollout.n_samples_per_prompt=4", "rollout.max_new_tokens=8", "rollout.cpu_threads=1",
        "trainer.global_batch_groups=4", "trainer.lr=1e-3", "eval.interval=2", "eval.max_prompts=8", "eval.max_new_tokens=8",
        "logging.progress=false", "logging.wandb_mode=disabled", "logging.save_samples=true", "checkpoint.save_hf=false",
    ]
    return load_config(None, [*base, *overrides])


def _lines(run_dir: Path) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("kind") != "eval"], [r for r in rows if r.get("kind") == "eval"]


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_run_writes_metrics_and_keeps_staleness_within_the_bound(
    ray_cluster, tmp_path: Path, tiny_model_dir: Path, data_dir: Path, mode: str
) -> None:
    cfg = _config(tmp_path, tiny_model_dir, data_dir, f"run.mode={mode}", "run.name=r", "buffer.max_staleness=1",
                  "checkpoint.interval=2", f"checkpoint.save_hf={mode == 'async'}")
    result = Driver(cfg).run()
    run_dir = Path(result["run_dir"])
    steps, evals = _lines(run_dir)
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for r in steps:
        missing = [k for k in HEADLINE if k not in r]
        assert not missing, f"metrics line lacks {missing}"
        assert r["staleness_max"] <= (0 if mode == "sync" else 1)
        assert r["samples"] == 16
    # rollout and reward metrics are per window between steps: every one that saw groups has them
    assert any("reward/parity/length_mean" in r and "rollout/reward_s_mean" in r for r in steps)
    assert [r["policy_version"] for r in steps] == [1, 2, 3, 4]
    # the engines serve the trained weights: fresh tokens' engine log-probs match the trainer's
    fresh = [r["train/logprob_mismatch_fresh"] for r in steps if r.get("train/logprob_mismatch_fresh") is not None]
    assert fresh and max(fresh) < 1e-3
    assert {e["step"] for e in evals} >= {0, 2, 4} and all(0 <= e["eval/accuracy"] <= 1 for e in evals)
    assert {int(e["eval/version"]) for e in evals} >= {0, 4}
    assert {p.name for p in (run_dir / "plots").glob("*.png")} >= {"eval_accuracy.png", "reward.png", "throughput.png"}
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_000002", "step_000004"]
    # checkpoint.save_hf: the final policy as an HF folder, also when the last step was a periodic checkpoint
    assert (run_dir / "final_hf" / "config.json").exists() == (mode == "async")
    saved = pq.read_table(run_dir / "samples" / "step_000001.parquet")
    assert saved.num_rows == 16 and {"group_id", "response_text", "reward", "policy_version"} <= set(saved.schema.names)
    if mode == "sync":
        assert all(r["staleness_mean"] == 0 for r in steps)
    # the run's timeline: every group's life on its engine's track, every step's phases
    trace = json.loads((run_dir / "trace.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {"admit", "generate", "score", "put", "buffer_wait", "train_step", "weight_sync", "update_weights",
            "eval", "checkpoint"} <= names, names


def test_max_minutes_finishes_the_run_as_num_steps_would(ray_cluster, tmp_path: Path, tiny_model_dir: Path, data_dir: Path) -> None:
    """run.max_minutes spent: final sync, eval of the last weights, checkpoint, exit 0."""
    cfg = _config(tmp_path, tiny_model_dir, data_dir, "run.name=budget", "run.num_steps=1000", "run.max_minutes=0.001",
                  "eval.interval=0")
    result = Driver(cfg).run()
    steps, evals = _lines(tmp_path / "budget")
    assert result["last_step"] == 1 and not result["interrupted"] and [r["step"] for r in steps] == [1]
    assert sorted(int(e["eval/version"]) for e in evals) == [0, 1]
    assert [p.name for p in (tmp_path / "budget" / "checkpoints").iterdir()] == ["step_000001"]


@pytest.mark.parametrize("transport", ["collective", "disk"])
def test_weight_transports_deliver_the_trained_weights(
    ray_cluster, tmp_path: Path, tiny_model_dir: Path, data_dir: Path, transport: str
) -> None:
    cfg = _config(tmp_path, tiny_model_dir, data_dir, f"weight_sync.transport={transport}", f"run.name={transport}",
                  "rollout.num_engines=2", "run.mode=sync", "eval.interval=0", "run.num_steps=3")
    Driver(cfg).run()
    steps, _ = _lines(tmp_path / transport)
    assert [r["policy_version"] for r in steps] == [1, 2, 3]
    fresh = [r["train/logprob_mismatch_fresh"] for r in steps[1:]]
    assert max(fresh) < 1e-3, f"{transport}: engines do not serve the trained weights ({fresh})"
    assert all(r["weight_sync/bytes"] > 1e6 for r in steps[1:])


def test_rollout_only_then_train_only(ray_cluster, tmp_path: Path, tiny_model_dir: Path, data_dir: Path) -> None:
    cfg = _config(tmp_path, tiny_model_dir, data_dir, "run.rollout_only=true", "run.name=ro", "run.num_steps=3")
    Driver(cfg).run()
    files = sorted((tmp_path / "ro" / "samples").glob("step_*.parquet"))
    assert len(files) == 3
    cfg = _config(tmp_path, tiny_model_dir, data_dir, f"run.train_only={tmp_path / 'ro' / 'samples'}", "run.name=to",
                  "run.num_steps=3", "trainer.max_logprob_mismatch=0")
    Driver(cfg).run()
    steps, _ = _lines(tmp_path / "to")
    assert [r["policy_version"] for r in steps] == [1, 2, 3] and all(r["samples"] == 16 for r in steps)
