"""The GLM stand-ins on a CUDA GPU (skipped elsewhere; not run in this project's CPU CI).

    pytest -m gpu tests/integration/test_glm_gpu.py

vLLM on GPU serves both architectures (GLM-5's DSA path is GPU-only), records routed experts
and takes the trainer's weights; the hf engine runs GLM-5's MLA + indexer cache on CUDA; the
bf16 trainer replays the engine's routing. bf16 engines and trainers differ by more than
kernel noise, so the checks are relative (replay vs no replay) or loose (GPU_ATOL).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from glm_helpers import (
    generate_table,
    perturbed_bias_copy,
    prompts_for,
    same_experts,
    teacher_routing,
)
from slime_rl.rollout.engines.conformance import load_reference
from slime_rl.rollout.engines.moe import split_fused
from slime_rl.rollout.engines.sync import EngineRunner
from slime_rl.trainer.config import TrainerConfig
from slime_rl.trainer.core import TrainerCore

from slime_rl.tiny.glm import GLM_ARCHS, random_glm_model

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(900)]

GPU_ATOL = 5e-2
"""bf16 engine vs bf16-autocast trainer: mean |log-prob gap| bound on fresh tokens."""


@pytest.fixture(scope="module")
def glm_dirs(tmp_path_factory) -> dict[str, Path]:
    return {arch: random_glm_model(tmp_path_factory.mktemp(arch), arch, seed=0) for arch in GLM_ARCHS}


def _cuda_core(model_dir: Path, replay: bool) -> TrainerCore:
    cfg = TrainerConfig(global_batch_groups=4, lr=1e-4, routing_replay=replay, max_logprob_mismatch=0.0)
    cfg.batching.precision = "bf16"
    return TrainerCore(cfg, model_dir, device=torch.device("cuda"))


@pytest.mark.parametrize("arch", GLM_ARCHS)
def test_vllm_gpu_records_routing_and_takes_trainer_weights(glm_dirs, arch, monkeypatch) -> None:
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("install slime-rl[vllm]")
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")  # the engine's log-prob sampler is the V1 runner's
    with EngineRunner("vllm", glm_dirs[arch], kv_cache_gb=2.0, max_model_len=512, record_routed_experts=True,
                      engine_kwargs={"gpu_memory_utilization": 0.3}) as runner:
        table, results = generate_table(runner, prompts_for(400, 4, seed=1, min_len=20, max_len=60), 2, max_new_tokens=24)
        assert all(len(r) for r in table.column("routed_experts").to_pylist())
        ref = load_reference(glm_dirs[arch])  # fp32 CPU
        q0 = table.slice(0, 1).to_pylist()[0]
        agree = same_experts(results[0].routed_experts, teacher_routing(ref, q0["prompt_ids"] + q0["response_ids"])[: len(q0["routed_experts"])])
        assert agree.mean() > 0.8  # bf16 vs fp32 ties flip more often; most positions agree
        core = _cuda_core(glm_dirs[arch], replay=True)
        metrics = core.train_step(table)
        assert metrics["moe/routing_mismatch"] == 0.0 and metrics["train/logprob_mismatch_fresh"] < GPU_ATOL
        for layout in ("fused", "per_expert"):
            state = [nt for b in core.iter_weight_buckets(1 << 20) for nt in b.named_tensors()]
            runner.update_weights(runner.version() + 1, split_fused(state) if layout == "per_expert" else state)
            table, _ = generate_table(runner, prompts_for(400, 4, seed=2, min_len=20, max_len=60), 2, max_new_tokens=24, tag=layout)
            core.version = runner.version()  # the engine's tokens are fresh for the trainer
            metrics = core.train_step(table)
            assert metrics["train/logprob_mismatch_fresh"] < GPU_ATOL, layout


def test_hf_engine_on_cuda_serves_glm5(glm_dirs) -> None:
    """MLA latents + the DSA indexer key cache on CUDA, sequences past index_topk (sparse)."""
    with EngineRunner("hf", glm_dirs["glm5"], device="cuda", dtype="bfloat16", record_routed_experts=True) as runner:
        table, results = generate_table(runner, prompts_for(400, 4, seed=3, min_len=40, max_len=80), 2, max_new_tokens=32)
    assert all(r.routed_experts is not None and len(r.token_ids) == 32 for r in results)
    metrics = _cuda_core(glm_dirs["glm5"], replay=True).train_step(table)
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    assert metrics["moe/routing_mismatch"] == 0.0 and metrics["train/logprob_mismatch_fresh"] < GPU_ATOL


def test_bf16_trainer_replay_shrinks_the_gap(glm_dirs, tmp_path) -> None:
    engine_dir = perturbed_bias_copy(glm_dirs["glm4_moe"], tmp_path / "engine", scale=0.02, seed=3)
    with EngineRunner("hf", engine_dir, device="cuda", dtype="float32", record_routed_experts=True) as runner:
        table, _ = generate_table(runner, prompts_for(400, 4, seed=7, min_len=20, max_len=40), 2, max_new_tokens=16)
    off = _cuda_core(glm_dirs["glm4_moe"], replay=False).train_step(table)
    on = _cuda_core(glm_dirs["glm4_moe"], replay=True).train_step(table)
    assert off["moe/routing_mismatch"] > 0.05 and on["moe/routing_mismatch"] == 0.0
    assert on["train/logprob_mismatch"] < off["train/logprob_mismatch"] / 2
