"""TrainerGroup on Ray: 2 CPU workers (gloo, FSDP2) match 1 worker; weights, checkpoints, HF export."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch
from slime_rl.trainer.config import TrainerConfig
from slime_rl.trainer.testing import synthetic_table

# One step on M workers equals one step on 1 worker up to float reassociation (different
# micro-batch padding widths and reduction order). Adam's first step is g / (|g| + eps), so
# parameters whose gradient is ~1e-8 (cancelling sums) amplify that noise: measured max
# |diff| 4e-6 at lr=1e-3 on this batch. Bound: 5% of lr. A split group or wrong advantage
# moves weights by ~lr; a wrong gradient scale (which Adam's first step hides) shows in
# train/grad_norm, compared at rel 1e-5 (measured 2e-6). The gradients themselves (what the
# optimizer consumed) are compared per parameter: max |g1 - g2| <= GRAD_RTOL x the largest
# gradient entry (measured 4e-9 against 6e-3, 7e-7 relative); a wrong scale, a dropped
# micro-batch or a split group moves them by O(1) of that.
EQUIV_ATOL = 5e-5
GRAD_RTOL = 1e-5


MICRO_TOKENS = 40  # several micro-batches per rank (rows are <= 18 tokens)


def _group(num_workers: int, model_dir, name: str, groups: int = 2, updates: int = 1):
    from slime_rl.trainer.group import TrainerGroup

    cfg = _cfg(num_workers, groups, updates)
    # num_cpus=0: fit beside whatever else the shared test cluster runs
    return TrainerGroup(cfg, str(model_dir), actor_options=lambda rank: {"num_cpus": 0}, name=name)


def _cfg(num_workers: int, groups: int, updates: int = 1) -> TrainerConfig:
    # synthetic_table's constant engine log-probs are not the tiny model's: no plausibility check
    cfg = TrainerConfig(num_workers=num_workers, lr=1e-3, timeout_s=120.0, global_batch_groups=groups,
                        max_logprob_mismatch=0.0)
    cfg.batching.max_tokens_per_micro_batch = MICRO_TOKENS
    cfg.batching.share_prompt = False  # one row per sample, as planned below (shared prompts: test_trainer_micro_batch)
    cfg.batching.updates_per_batch = updates
    return cfg


def _lopsided_table() -> pa.Table:
    """4 groups; g0 holds more tokens than the other three together, so a token-balanced split
    of the whole batch over 2 ranks gives rank 0 only g0 (one group: too few for 2 updates)."""
    big = synthetic_table(num_groups=1, group_size=3, vocab_size=400, seed=11, prompt_len=(12, 12), response_len=(24, 26))
    rest = synthetic_table(num_groups=4, group_size=2, vocab_size=400, seed=12, response_len=(2, 6))
    return pa.concat_tables([big, rest.filter(pc.not_equal(rest.column("group_id"), "g0"))])


def _weights(group) -> dict[str, torch.Tensor]:
    out = {}
    for bucket in group.weight_buckets(bucket_bytes=1 << 20):
        out.update(bucket.named_tensors())
    return out


@pytest.mark.timeout(300)
@pytest.mark.parametrize("updates", [1, 2])
def test_two_workers_match_one_worker(ray_cluster, tiny_model_dir, updates):
    """One step on 2 workers = one step on 1 worker; with updates_per_batch=2 the two
    optimizer updates see the same groups (mini-batches aligned across ranks), although a
    token-balanced split of the whole batch would leave rank 0 a single group."""
    from slime_rl.trainer.batching import RankBatch, plan_micro_batches, split_batch, split_groups

    table = synthetic_table(num_groups=4, group_size=3, vocab_size=400, seed=3) if updates == 1 else _lopsided_table()
    if updates == 2:
        assert min(len(set(p.column("group_id").to_pylist())) for p in split_groups(table, 2)) == 1
    # The token budget really splits every rank's share into several micro-batches.
    planned = {}
    for m in (1, 2):
        planned[m] = 0
        for share in split_batch(table, m, updates):
            rb = RankBatch.from_table(share.table)
            assert len(plan_micro_batches(rb, list(range(rb.num_rows)), MICRO_TOKENS, 0)) >= 2
            planned[m] += sum(len(plan_micro_batches(rb, rows, MICRO_TOKENS, 0)) for rows in share.minibatch_rows())
    results = {}
    for m in (1, 2):
        group = _group(m, tiny_model_dir, f"equiv{m}u{updates}", groups=4, updates=updates)
        try:
            before = _weights(group)
            metrics = group.train_step(table)
            results[m] = (metrics, _weights(group), group.gradients())
        finally:
            group.shutdown()
    (m1, w1, g1), (m2, w2, g2) = results[1], results[2]
    # summed over ranks and updates
    assert (m1["train/micro_batches"], m2["train/micro_batches"]) == (planned[1], planned[2])
    assert planned[1] >= 2 * updates and planned[2] >= 4
    # Gradients of the last update: the same per parameter up to float reassociation.
    assert set(g1) == set(g2) and len(g1) > 10
    scale = max(g.abs().max().item() for g in g1.values())
    grad_diff = max((g1[k] - g2[k]).abs().max().item() for k in g1)
    assert scale > 1e-4 and grad_diff <= GRAD_RTOL * scale, f"gradients differ by {grad_diff} (scale {scale})"
    assert set(w1) == set(w2) and "lm_head.weight" not in w1
    changed = max((w1[k] - before[k]).abs().max().item() for k in w1)
    assert changed > 1e-4, "the step did not move the weights"
    diff = max((w1[k] - w2[k]).abs().max().item() for k in w1)
    assert diff < EQUIV_ATOL, f"1 vs 2 workers differ by {diff}"
    keys = ("train/loss", "train/grad_norm", "train/grad_norm_max", "train/lr", "train/loss_tokens",
            "train/reward_mean", "train/entropy")
    for key in keys:
        assert m1[key] == pytest.approx(m2[key], rel=1e-5, abs=1e-7), key
    assert m2["train/version"] == 1.0


@pytest.mark.timeout(240)
def test_empty_rank_async_steps_object_store_buckets_and_rank0_calls(ray_cluster, tiny_model_dir):
    """A rank whose whole share is a fully aborted group (no response tokens) does not fail the
    step; train_step_async / PendingStep; weights through the object store; rank-0 calls."""
    import ray
    from slime_rl.trainer.weights import WeightBucket

    real = synthetic_table(num_groups=1, group_size=3, vocab_size=400, seed=5)
    aborted = synthetic_table(num_groups=1, group_size=3, vocab_size=400, seed=6, response_len=(0, 0))
    for name, value in (("group_id", "gx"), ("status", "aborted")):
        i = aborted.schema.get_field_index(name)
        aborted = aborted.set_column(i, aborted.schema.field(i), pa.array([value] * 3))
    mixed = pa.concat_tables([real, aborted])
    from slime_rl.trainer.batching import split_groups

    assert sorted(set(p.column("group_id").to_pylist()) for p in split_groups(mixed, 2)) == [{"g0"}, {"gx"}]
    empty = synthetic_table(num_groups=2, group_size=2, vocab_size=400, seed=7, response_len=(0, 0))
    group = _group(2, tiny_model_dir, "empty")
    try:
        handles = group.worker_handles()
        assert len(handles) == 2
        assert group.call_rank0("status")["rank"] == 0
        assert ray.get(handles[1].status.remote(), timeout=60)["rank"] == 1
        before = _weights(group)
        pending = group.train_step_async(mixed)
        assert group.step == 0  # nothing blocked, nothing recorded yet
        m = pending.result()
        assert pending.done() and pending.result() is m and group.step == 1 and group.version == 1
        assert m["train/empty_samples"] == 3.0 and m["train/excluded_samples"] == 3.0
        assert m["train/loss_tokens"] > 0 and m["train/skipped_updates"] == 0.0
        moved = _weights(group)
        assert max((moved[k] - before[k]).abs().max().item() for k in moved) > 1e-4
        m = group.train_step(empty)  # no loss token anywhere: a counted no-op
        assert m["train/empty_samples"] == 4.0 and m["train/skipped_updates"] == 1.0 and group.version == 2
        refs = group.put_weight_buckets(1 << 20)
        assert refs and all(isinstance(r, ray.ObjectRef) for r in refs)
        buckets = ray.get(refs, timeout=60)
        assert all(isinstance(b, WeightBucket) and b.version == 2 for b in buckets)
        assert [b.index for b in buckets] == list(range(len(buckets))) and buckets[-1].last
        got = {n: t for b in buckets for n, t in b.named_tensors()}
        assert set(got) == set(moved)
        for name, t in moved.items():  # the empty step changed nothing
            torch.testing.assert_close(got[name], t, rtol=0, atol=0)
        bad = group.train_step_async(mixed.drop_columns(["loss_mask"]))
        with pytest.raises(RuntimeError, match=r"train_step failed on empty actor rank \d at trainer step 3.*loss_mask"):
            bad.result()
    finally:
        group.shutdown()


@pytest.mark.timeout(240)
def test_group_checkpoint_resume_and_hf_export(ray_cluster, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    tables = [synthetic_table(num_groups=2, group_size=2, vocab_size=400, seed=s) for s in range(3)]
    group = _group(2, tiny_model_dir, "ckpt")
    try:
        group.train_step(tables[0])
        group.save_checkpoint(str(tmp_path / "ckpt"))
        expected = group.train_step(tables[1])
        export = group.export_hf(str(tmp_path / "hf"))
        published = _weights(group)
        folder = str(tmp_path)

        def sink(bucket) -> None:  # runs inside rank 0 (a closure, so Ray pickles it by value)
            with open(f"{folder}/bucket{bucket.index}.txt", "w") as f:
                f.write(f"{bucket.version} {bucket.num_buckets} {' '.join(bucket.names)}")

        count = group.publish_weights(1 << 20, sink)
        three_groups = synthetic_table(num_groups=3, group_size=2, vocab_size=400, seed=7)
        with pytest.raises(RuntimeError, match=r"has 3 group\(s\) but trainer.global_batch_groups=2"):
            group.train_step(three_groups)
        with pytest.raises(RuntimeError, match=r"train_step failed on ckpt actor rank \d at trainer step 3.*loss_mask"):
            group.train_step(tables[2].drop_columns(["loss_mask"]))
    finally:
        group.shutdown()
    assert (tmp_path / "ckpt" / "hf" / "model.safetensors").exists()  # HF export inside the checkpoint
    assert not (tmp_path / "ckpt.tmp").exists()
    sunk = [(tmp_path / f"bucket{i}.txt").read_text().split() for i in range(count)]
    assert all(b[0] == "2" and b[1] == str(count) for b in sunk)
    assert sorted(n for b in sunk for n in b[2:]) == sorted(published)
    hf = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32)
    sd = hf.state_dict()
    for name, t in published.items():
        torch.testing.assert_close(sd[name], t, rtol=0, atol=0)
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()

    resumed = _group(2, tiny_model_dir, "resume")
    try:
        assert resumed.load_checkpoint(str(tmp_path / "ckpt")) == {"step": 1, "version": 1}
        again = resumed.train_step(tables[1])
    finally:
        resumed.shutdown()
    assert again["train/loss"] == pytest.approx(expected["train/loss"], rel=1e-6, abs=1e-9)
    assert again["train/grad_norm"] == pytest.approx(expected["train/grad_norm"], rel=1e-6)
    assert again["train/version"] == 2.0
