"""The tiny GLM-5 / GLM-4.5 stand-ins on the distributed trainer: FSDP2 on 2 gloo workers matches
1 worker (gradients, weights, MoE metrics, routing replay on), experts are sharded over the
expert dimension, and an hf engine fed the group's weight buckets scores like the trainer."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
from glm_helpers import (
    check_logprobs_where_routing_agrees,
    generate_table,
    perturbed_bias_copy,
    prompts_for,
)
from slime_rl.rollout.engines import GenerateRequest, SamplingParams
from slime_rl.rollout.engines.conformance import LOGPROB_ATOL, load_reference
from slime_rl.rollout.engines.sync import EngineRunner
from slime_rl.trainer.config import TrainerConfig

from slime_rl.tiny.glm import random_glm_model

pytestmark = [pytest.mark.timeout(600)]

# Same bounds as the dense model's 1-vs-2 test (tests/integration/test_trainer_group.py).
EQUIV_ATOL = 5e-5
GRAD_RTOL = 1e-5
MICRO_TOKENS = 150


@pytest.fixture(scope="module")
def glm5_dir(tmp_path_factory) -> Path:
    return random_glm_model(tmp_path_factory.mktemp("glm5"), "glm5", seed=0)


def _cfg(num_workers: int, replay: bool) -> TrainerConfig:
    cfg = TrainerConfig(num_workers=num_workers, lr=1e-3, timeout_s=120.0, global_batch_groups=4,
                        routing_replay=replay, max_logprob_mismatch=0.0)
    cfg.batching.max_tokens_per_micro_batch = MICRO_TOKENS
    return cfg


def _weights(group) -> dict[str, torch.Tensor]:
    out = {}
    for bucket in group.weight_buckets(bucket_bytes=1 << 20):
        out.update(bucket.named_tensors())
    return out


def test_two_workers_match_one_with_routing_replay_and_sync_to_the_engine(ray_cluster, glm5_dir, tmp_path) -> None:
    from slime_rl.trainer.group import TrainerGroup

    engine_dir = perturbed_bias_copy(glm5_dir, tmp_path / "engine", scale=0.02, seed=1)  # routing differs on purpose
    with EngineRunner("hf", engine_dir, record_routed_experts=True, num_threads=1) as runner:
        table, _ = generate_table(runner, prompts_for(400, 4, seed=3, min_len=20, max_len=40), 3, max_new_tokens=12)
    results = {}
    for m in (1, 2):
        group = TrainerGroup(_cfg(m, replay=True), str(glm5_dir), actor_options=lambda rank: {"num_cpus": 0}, name=f"glm{m}")
        try:
            before = _weights(group)
            metrics = group.train_step(table)
            results[m] = (metrics, _weights(group), group.gradients())
            if m == 2:  # the group's buckets (fused expert names) into an engine: it scores like the trainer
                with EngineRunner("hf", glm5_dir, record_routed_experts=True, num_threads=1) as runner:
                    runner.update_weights(1, [nt for b in group.weight_buckets(1 << 18) for nt in b.named_tensors()])
                    prompts = prompts_for(400, 3, seed=9, min_len=20, max_len=40)
                    reqs = [GenerateRequest(f"s{i}", p, SamplingParams(max_new_tokens=10, seed=i, ignore_eos=True))
                            for i, p in enumerate(prompts)]
                    synced = runner.generate_many(reqs)
        finally:
            group.shutdown()
    (m1, w1, g1), (m2, w2, g2) = results[1], results[2]
    assert m1["moe/routing_mismatch"] == m2["moe/routing_mismatch"] == 0.0
    assert m1["moe/router_disagreement"] > 0.05
    scale = max(g.abs().max().item() for g in g1.values())
    grad_diff = max((g1[k] - g2[k]).abs().max().item() for k in g1)
    assert grad_diff <= GRAD_RTOL * scale, f"gradients differ by {grad_diff} (scale {scale})"
    assert "model.layers.1.mlp.experts.gate_up_proj" in g1 and "model.layers.2.mlp.gate.weight" in g1
    assert max((w1[k] - before[k]).abs().max().item() for k in w1) > 1e-4
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < EQUIV_ATOL
    for key in ("train/loss", "train/grad_norm", "train/logprob_mismatch", "moe/router_entropy", "moe/router_disagreement",
                "moe/tokens_per_expert_max", "moe/load_max_over_mean", "moe/load_max_over_mean_max"):
        assert m1[key] == pytest.approx(m2[key], rel=1e-5, abs=1e-7), key
    trainer = load_reference(glm5_dir)
    trainer.load_state_dict(w2)
    check_logprobs_where_routing_agrees(trainer, reqs, synced, LOGPROB_ATOL)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shard_report(rank: int, world: int, port: int, model_dir: str, out: str) -> None:
    import torch.distributed as dist
    from slime_rl.trainer.core import TrainerCore

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        core = TrainerCore(TrainerConfig(num_workers=world, global_batch_groups=2), model_dir)
        report = {}
        for name, p in core.policy.named_parameters():
            if "experts" in name and "shared" not in name:
                report[name] = (str(p.placements), tuple(p.to_local().shape), tuple(p.shape))
        torch.save(report, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_experts_are_sharded_over_the_expert_dimension(glm5_dir, tmp_path) -> None:
    """FSDP2 shards each decoder layer's parameters on dim 0: for the fused expert tensors
    (E, 2I, H) / (E, H, I) that is the expert dimension, so each of 2 ranks holds 4 of the 8
    experts of every MoE layer at rest (gathered for compute)."""
    import torch.multiprocessing as mp

    mp.start_processes(_shard_report, args=(2, _free_port(), str(glm5_dir), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    for rank in range(2):
        report = torch.load(tmp_path / f"rank{rank}.pt")
        assert set(report) == {f"model.layers.{i}.mlp.experts.{w}" for i in (1, 2) for w in ("gate_up_proj", "down_proj")}
        for placements, local, full in report.values():
            assert placements == "(Shard(dim=0),)" and full[0] == 8 and local == (4, *full[1:])
