"""Batch splitting, micro-batch planning and weight buckets."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch
from slime_rl.trainer.batching import (
    RankBatch,
    dummy_micro_batch,
    group_order,
    minibatch_groups,
    plan_micro_batches,
    split_batch,
    split_groups,
)
from slime_rl.trainer.config import OptimConfig
from slime_rl.trainer.metrics import StepMetrics
from slime_rl.trainer.optim import lr_lambda
from slime_rl.trainer.testing import synthetic_table
from slime_rl.trainer.weights import iter_weight_buckets


def test_split_groups_keeps_groups_whole_and_balanced():
    table = synthetic_table(num_groups=6, group_size=3, vocab_size=50, seed=0)
    parts = split_groups(table, 2)
    assert sum(p.num_rows for p in parts) == table.num_rows
    groups = [set(p.column("group_id").to_pylist()) for p in parts]
    assert not groups[0] & groups[1] and groups[0] | groups[1] == {f"g{i}" for i in range(6)}
    for p in parts:  # original order kept inside a rank
        ids = p.column("sample_id").to_pylist()
        order = [table.column("sample_id").to_pylist().index(i) for i in ids]
        assert order == sorted(order)

    def tokens(t):
        return sum(len(a) + len(b) for a, b in zip(t.column("prompt_ids").to_pylist(), t.column("response_ids").to_pylist(), strict=True))

    loads = [tokens(p) for p in parts]
    biggest_group = max(tokens(table.filter(table.column("group_id").to_numpy() == f"g{i}")) for i in range(6))
    assert abs(loads[0] - loads[1]) <= biggest_group


def test_split_groups_refuses_fewer_groups_than_workers():
    with pytest.raises(ValueError, match="2 group\\(s\\) but trainer.num_workers=3"):
        split_groups(synthetic_table(num_groups=2, group_size=2, vocab_size=50), 3)


def test_micro_batches_cover_rows_under_budget_and_align_tokens():
    table = synthetic_table(num_groups=4, group_size=3, vocab_size=50, seed=1)
    rb = RankBatch.from_table(table)
    mbs = plan_micro_batches(rb, list(range(rb.num_rows)), max_tokens=40, pad_id=0)
    rows = sorted(i for mb in mbs for i in mb.rows.tolist())
    assert rows == list(range(rb.num_rows)) and len(mbs) > 1
    for mb in mbs:
        assert mb.input_ids_BT.numel() <= 40 or len(mb.rows) == 1
        for b, i in enumerate(mb.rows.tolist()):
            n = len(rb.response_ids[i])
            # the logits at resp_pos predict the next input token = the response token
            nxt = mb.input_ids_BT[b, mb.resp_pos_BR[b, :n] + 1]
            assert nxt.tolist() == rb.response_ids[i]
            assert mb.attention_mask_BT[b].sum() == len(rb.prompt_ids[i]) + n
    dummy = dummy_micro_batch(rb, pad_id=0)
    assert dummy.dummy and len(dummy.rows) == 1


def test_minibatches_are_whole_groups():
    (share,) = split_batch(synthetic_table(num_groups=5, group_size=2, vocab_size=50), 1, 2)
    parts = share.minibatch_rows()
    assert [len(p) for p in parts] == [4, 6]  # groups 0-1 | 2-4 (round(2.5) = 2)
    assert sorted(sum(parts, [])) == list(range(10))
    gids = share.table.column("group_id").to_pylist()
    assert [sorted({gids[i] for i in p}) for p in parts] == [["g0", "g1"], ["g2", "g3", "g4"]]


def _lopsided(num_groups: int, seed: int) -> pa.Table:
    """Group g0 holds more tokens than all the others together: a token-balanced split of the
    whole batch gives it a rank of its own."""
    big = synthetic_table(num_groups=1, group_size=4, vocab_size=50, seed=seed, prompt_len=(40, 40), response_len=(60, 60))
    rest = synthetic_table(num_groups=num_groups, group_size=2, vocab_size=50, seed=seed + 1)
    rest = rest.filter(pc.not_equal(rest.column("group_id"), "g0"))
    return pa.concat_tables([big, rest])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_split_batch_gives_every_rank_a_group_of_every_update_aligned_across_world_sizes(seed):
    """updates_per_batch > 1 with several ranks: each rank needs whole groups in each update,
    and update k must see the same groups on M ranks as on one (1-vs-M equivalence)."""
    for num_ranks in (1, 2, 3):
        for updates in (1, 2, 3):
            for extra in range(4):
                table = _lopsided(num_ranks * updates + extra, seed)
                groups = group_order(table)
                expected = minibatch_groups(groups, updates)
                shares = split_batch(table, num_ranks, updates)
                assert sum(s.table.num_rows for s in shares) == table.num_rows
                for k in range(updates):
                    seen: list[str] = []
                    for share in shares:
                        gids = share.table.column("group_id").to_pylist()
                        mine = {gids[i] for i in share.minibatch_rows()[k]}
                        assert mine, (num_ranks, updates, extra, k)  # >= 1 whole group per rank and update
                        seen += mine
                    assert sorted(seen) == sorted(expected[k])  # aligned: the global mini-batch k
                for share in shares:  # whole groups: every row of a group on the same rank
                    gids = share.table.column("group_id").to_pylist()
                    for g in set(gids):
                        assert gids.count(g) == table.column("group_id").to_pylist().count(g)


def test_split_batch_refuses_too_few_groups_for_workers_times_updates():
    with pytest.raises(ValueError, match=r"3 group\(s\) but trainer.num_workers=2 x trainer.batching.updates_per_batch=2 = 4"):
        split_batch(synthetic_table(num_groups=3, group_size=2, vocab_size=50), 2, 2)


def test_rank_batch_of_empty_responses_has_one_masked_column():
    rb = RankBatch.from_table(synthetic_table(num_groups=2, group_size=2, vocab_size=50, response_len=(0, 0)))
    assert rb.mask_NR.shape == (4, 1) and rb.mask_NR.sum() == 0
    mbs = plan_micro_batches(rb, list(range(4)), max_tokens=40, pad_id=0)
    assert all(mb.width == 1 for mb in mbs)


def test_step_metrics_reduce_means_and_maxes():
    m = StepMetrics()
    m.add_mean("train/a", 3.0, 2)
    m.add_mean("train/a", 1.0, 2)
    m.add_mean("train/empty", 0.0, 0)
    m.add_max("train/b", 1.0)
    m.add_max("train/b", 4.0)
    assert m.reduce() == {"train/a": 1.0, "train/b": 4.0, "train/empty": 0.0}
    # a second "rank" with the same partials: sums double, the mean stays
    assert m.reduce(lambda t: 2 * t, lambda t: t)["train/a"] == 1.0


def test_fresh_logprob_gap_is_left_out_of_a_step_without_fresh_tokens():
    """A mean over no token is not a perfect match (0.0): the key is absent when nothing was measured."""
    from slime_rl.trainer.off_policy import record_mismatch

    trainer_BR, behaviour_BR, mask_BR = torch.zeros(2, 3), torch.full((2, 3), -0.5), torch.ones(2, 3)
    m = StepMetrics()
    record_mismatch(m, trainer_BR, behaviour_BR, torch.ones(2, 3, dtype=torch.long), mask_BR)  # every token stale
    out = m.reduce()
    assert "train/logprob_mismatch_fresh" not in out and out["train/logprob_mismatch"] == 0.5
    m = StepMetrics()
    record_mismatch(m, trainer_BR, behaviour_BR, torch.zeros(2, 3, dtype=torch.long), mask_BR)
    assert m.reduce()["train/logprob_mismatch_fresh"] == 0.5


def test_lr_schedule_warmup_then_cosine():
    f = lr_lambda(OptimConfig(warmup_steps=4, schedule="cosine", total_steps=8, min_lr_ratio=0.1))
    # warm-up (s+1)/4 ; then 0.1 + 0.9 * (1 + cos(pi * (s-4)/4)) / 2
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(6) == pytest.approx(0.1 + 0.9 * 0.5) and f(8) == pytest.approx(0.1) and f(20) == pytest.approx(0.1)
    assert lr_lambda(OptimConfig(warmup_steps=0))(100) == 1.0


def test_weight_buckets_respect_budget_and_skip_tied_head(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    budget = 300_000
    buckets = list(iter_weight_buckets(model, version=7, bucket_bytes=budget))
    names = [n for b in buckets for n in b.names]
    assert "lm_head.weight" not in names and len(names) == len(set(names))
    assert set(names) == set(model.state_dict()) - {"lm_head.weight"}
    for b in buckets:
        assert b.version == 7 and b.num_buckets == len(buckets)
        assert b.nbytes <= budget or len(b.names) == 1
    assert buckets[-1].last and not buckets[0].last
    sd = model.state_dict()
    for b in buckets:
        for n, t in b.named_tensors():
            assert torch.equal(t, sd[n])
    tied = [n for b in iter_weight_buckets(model, 7, budget, include_tied=True) for n in b.names]
    assert "lm_head.weight" in tied
