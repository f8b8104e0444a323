"""The rollout side on Ray: two engines, an engine killed mid-run, dynamic sampling keeping batches full."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import ray
from slime_rl.buffers import batch_to_samples, validate_batch

from slime_rl.config import load_config
from slime_rl.run_actors import RunActors

pytestmark = [pytest.mark.timeout(600)]

REWARD = '''
def half_constant(sample, **kwargs):
    """Prompts marked `same` always score 1 (their groups carry no signal); the rest vary."""
    if "same" in sample.prompt:
        return 1.0
    return float(sum(sample.response_ids) % 2)
'''


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("rollout_ray")
    rows = [{"prompt": f"Item {i} {'same' if i % 2 else 'varies'}: what is {i} + 1?", "label": str(i + 1)} for i in range(300)]
    (d / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (d / "reward.py").write_text(REWARD)
    return d


def _cfg(tmp_path: Path, model_dir: Path, data_dir: Path, *overrides: str):
    return load_config(None, [
        f"model.path={model_dir}", f"data.train_path={data_dir / 'train.jsonl'}", f"reward.fn={data_dir / 'reward.py'}:half_constant",
        f"run.output_dir={tmp_path}", "run.rollout_only=true", "rollout.engine=hf", "rollout.cpu_threads=1",
        "rollout.n_samples_per_prompt=4", "trainer.global_batch_groups=4", "logging.wandb_mode=disabled", *overrides,
    ])


def _take(actors: RunActors, batches: int, B: int, S: int, start: int = 0) -> list[str]:
    """Consume `batches` batches as a trainer would (admission advances), returning their group ids."""
    ids: list[str] = []
    for v in range(start, start + batches):
        table = ray.get(actors.buffer.get_batch.remote(B, 0, S, 120.0), timeout=180)  # no trainer: weights stay v0
        validate_batch(table)
        samples = batch_to_samples(table)
        assert len(samples) == 4 * B
        ids += list(dict.fromkeys(s.group_id for s in samples))
        ray.get(actors.manager.open_slots.remote(v + 1))
    return ids


def test_two_engines_and_an_engine_killed_mid_run_lose_and_duplicate_nothing(
    ray_cluster, tmp_path: Path, tiny_model_dir: Path, data_dir: Path
) -> None:
    cfg = _cfg(tmp_path, tiny_model_dir, data_dir, "run.name=kill", "rollout.num_engines=2", "rollout.max_new_tokens=48",
               "buffer.max_staleness=2")
    actors = RunActors.start(cfg)
    try:
        ray.get(actors.manager.start.remote())
        time.sleep(1.5)  # groups in flight on both engines
        ray.kill(ray.get_actor("kill-engine-0"))  # its groups requeue; the fleet replaces it
        ids = _take(actors, batches=8, B=4, S=2)
        assert len(ids) == len(set(ids)) == 32, "a group was lost or duplicated"
        metrics = ray.get(actors.manager.metrics.remote())
        assert metrics["rollout/requeued_groups"] >= 1 and metrics["rollout/engines_lost"] == 1
        deadline = time.monotonic() + 120
        while ray.get(actors.manager.check.remote())["engines_up"] < 2:  # a replacement starts and loads the weights
            assert time.monotonic() < deadline, "no replacement for the killed engine"
            time.sleep(1.0)
        names = [e["name"] for e in ray.get(actors.manager.fleet_info.remote())["engines"]]
        assert sorted(names) == ["kill-engine-1", "kill-engine-2"]
        assert len(set(_take(actors, batches=2, B=4, S=2, start=8) + ids)) == 40
        assert ray.get(actors.buffer.stats.remote())["buffer/dropped_stale"] == 0
    finally:
        actors.shutdown()


def test_dynamic_sampling_keeps_batches_full_of_informative_groups(
    ray_cluster, tmp_path: Path, tiny_model_dir: Path, data_dir: Path
) -> None:
    cfg = _cfg(tmp_path, tiny_model_dir, data_dir, "run.name=dapo", "rollout.filter=nonzero_std", "rollout.max_new_tokens=8",
               "buffer.max_staleness=1")
    actors = RunActors.start(cfg)
    try:
        ray.get(actors.manager.start.remote())
        for v in range(4):
            table = ray.get(actors.buffer.get_batch.remote(4, 0, 1, 120.0), timeout=180)
            by_group: dict[str, list[float]] = {}
            for s in batch_to_samples(table):
                by_group.setdefault(s.group_id, []).append(s.reward)
            assert len(by_group) == 4 and all(len(r) == 4 for r in by_group.values())
            assert all(max(r) > min(r) for r in by_group.values()), "an all-equal group reached the trainer"
            ray.get(actors.manager.open_slots.remote(v + 1))
        m = ray.get(actors.manager.metrics.remote())
        assert m["rollout/filter_pass_rate"] < 0.75 and m.get("rollout/filter/all_correct", 0) >= 1
    finally:
        actors.shutdown()
