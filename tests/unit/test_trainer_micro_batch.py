"""Micro-batch layouts: the shared-prompt layout gives the padded layout's log-probs and updates."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch
from slime_rl.trainer.batching import RankBatch, plan_micro_batches
from slime_rl.trainer.config import TrainerConfig
from slime_rl.trainer.core import TrainerCore
from slime_rl.trainer.micro_batch import block_mask, prompt_units
from slime_rl.trainer.model import load_policy, response_logprobs
from slime_rl.trainer.testing import synthetic_table

VOCAB = 400  # < the tiny tokenizer's size

pytestmark = pytest.mark.usefixtures("one_thread")

LAYOUTS = {
    "padded": {},
    "packed": {"pack": True},
    "shared": {"share_prompt": True},
    "shared_packed": {"share_prompt": True, "pack": True},
}


def _table(seed: int = 3) -> pa.Table:
    # groups of different lengths, so first-fit rows hold more than one unit
    long = synthetic_table(num_groups=1, group_size=4, vocab_size=VOCAB, seed=seed, prompt_len=(12, 12), response_len=(10, 14))
    short = synthetic_table(num_groups=3, group_size=4, vocab_size=VOCAB, seed=seed + 1, prompt_len=(3, 6), response_len=(1, 4))
    short = _replace(short, "group_id", [f"s{g}" for g in short.column("group_id").to_pylist()])
    return pa.concat_tables([long, short])


def _replace(table: pa.Table, name: str, values: list) -> pa.Table:
    i = table.schema.get_field_index(name)
    return table.set_column(i, table.schema.field(i), pa.array(values, type=table.schema.field(i).type))


def _logprobs(model: torch.nn.Module, rb: RankBatch, max_tokens: int, **layout) -> tuple[torch.Tensor, list]:
    out_NR = torch.zeros_like(rb.mask_NR)
    mbs = plan_micro_batches(rb, list(range(rb.num_rows)), max_tokens, 0, **layout)
    with torch.no_grad():
        for mb in mbs:
            out_NR[mb.rows, : mb.width] = response_logprobs(model, mb, 1.0)[0]
    return out_NR * (rb.mask_NR > 0), mbs


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_every_layout_gives_the_padded_logprobs(tiny_model_dir, attn):
    model = load_policy(tiny_model_dir, torch.device("cpu"))
    model.config._attn_implementation = attn
    rb = RankBatch.from_table(_table())
    padded, _ = _logprobs(model, rb, 10_000)
    for name, layout in LAYOUTS.items():
        got, mbs = _logprobs(model, rb, 10_000, **layout)
        torch.testing.assert_close(got, padded, atol=1e-5, rtol=0, msg=name)
        assert sorted(i for mb in mbs for i in mb.rows.tolist()) == list(range(rb.num_rows)), name
    _, shared = _logprobs(model, rb, 10_000, share_prompt=True)
    _, rows = _logprobs(model, rb, 10_000)
    # the prompt once per group and short groups side by side: far fewer positions computed
    assert sum(mb.num_tokens for mb in shared) < 0.6 * sum(mb.num_tokens for mb in rows)


def test_shared_rows_are_first_fit_under_the_budget(tiny_model_dir):
    rb = RankBatch.from_table(_table())
    units = prompt_units(rb, list(range(rb.num_rows)), True)
    assert len(units) == 4 and all(len(u) == 4 for u in units)  # one unit per group
    longest = max(len(rb.prompt_ids[u[0]]) + sum(len(rb.response_ids[i]) for i in u) for u in units)
    (mb,) = plan_micro_batches(rb, list(range(rb.num_rows)), 10_000, 0, share_prompt=True)
    U, T = mb.input_ids_BT.shape
    assert T == longest and U == 2  # the long group's row, and one row holding the three short groups
    assert mb.block_mask_B1TT.shape == (U, 1, T, T)
    mbs = plan_micro_batches(rb, list(range(rb.num_rows)), longest + 10, 0, share_prompt=True)
    assert len(mbs) == 2 and all(mb.num_tokens <= longest + 10 for mb in mbs)


def test_a_response_never_sees_its_siblings(tiny_model_dir):
    model = load_policy(tiny_model_dir, torch.device("cpu"))
    table = synthetic_table(num_groups=1, group_size=3, vocab_size=VOCAB, seed=7, response_len=(5, 8))
    rb = RankBatch.from_table(table)
    before, _ = _logprobs(model, rb, 10_000, share_prompt=True)
    responses = table.column("response_ids").to_pylist()
    changed = _replace(table, "response_ids", [r if i == 0 else [5] * len(r) for i, r in enumerate(responses)])
    after, _ = _logprobs(model, RankBatch.from_table(changed), 10_000, share_prompt=True)
    torch.testing.assert_close(after[0], before[0], atol=1e-6, rtol=0)  # row 0 unchanged
    assert not torch.allclose(after[1], before[1])


def test_block_mask_keeps_units_and_siblings_apart():
    seg_BT = torch.tensor([[0, 0, 1, 1, 2, 0, 1, -1]])  # unit 0: prompt, resp 1, resp 2 | unit 1: prompt, resp | pad
    unit_BT = torch.tensor([[0, 0, 0, 0, 0, 1, 1, -1]])
    m = block_mask(seg_BT, unit_BT)[0, 0]
    assert m[3].tolist() == [True, True, True, True, False, False, False, False]  # resp 1: prompt + itself
    assert m[4].tolist() == [True, True, False, False, True, False, False, False]  # resp 2: not resp 1
    assert m[6].tolist() == [False] * 5 + [True, True, False]  # unit 1 never sees unit 0
    assert m[7].tolist() == [False] * 7 + [True]  # padding sees only itself (no empty softmax row)


def test_train_step_is_the_same_with_a_shared_prompt(tiny_model_dir):
    table = _table(seed=11)
    results = {}
    for share in (False, True):
        cfg = TrainerConfig(lr=1e-3, global_batch_groups=4, max_logprob_mismatch=0.0)
        cfg.batching.share_prompt = share
        core = TrainerCore(cfg, tiny_model_dir)
        assert core.share_prompt is share
        results[share] = (core.train_step(table), core.gradients())
    (m0, g0), (m1, g1) = results[False], results[True]
    assert m1["train/loss"] == pytest.approx(m0["train/loss"], rel=1e-4, abs=1e-7)
    assert m1["train/grad_norm"] == pytest.approx(m0["train/grad_norm"], rel=1e-4)
    assert g0.keys() == g1.keys() and len(g0) > 10
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], atol=1e-6, rtol=1e-3)


def test_share_prompt_defaults_to_cpu_and_refuses_unsupported_attention(tiny_model_dir, monkeypatch):
    assert TrainerCore(TrainerConfig(), tiny_model_dir).share_prompt  # None = auto: on for CPU
    cfg = TrainerConfig()
    cfg.batching.share_prompt = True
    monkeypatch.setattr("slime_rl.trainer.model.supports_block_mask", lambda m: False)
    with pytest.raises(ValueError, match="share_prompt=true needs sdpa or eager attention"):
        TrainerCore(cfg, tiny_model_dir)
    assert not TrainerCore(TrainerConfig(), tiny_model_dir).share_prompt  # auto falls back


def test_groups_with_long_responses_are_not_shared_short_ones_are(tiny_model_dir):
    """Sharing attends over prompt + every response at once: for long responses that costs more than
    the prompt it saves (the long-tail workload's 8 x 400-token chains), so those rows train alone,
    with the same log-probs; short groups still share."""
    from slime_rl.trainer.micro_batch import attention_weight_of
    from transformers import AutoConfig

    w = attention_weight_of(AutoConfig.from_pretrained(tiny_model_dir))
    assert 1e-4 < w < 1e-2  # the tiny model: 4 layers x 256 attention dims over ~2.4M dense parameters
    chains = synthetic_table(num_groups=1, group_size=8, vocab_size=VOCAB, seed=5, prompt_len=(20, 20), response_len=(300, 400))
    short = synthetic_table(num_groups=2, group_size=8, vocab_size=VOCAB, seed=6, prompt_len=(18, 18), response_len=(5, 20))
    short = _replace(short, "group_id", [f"s{g}" for g in short.column("group_id").to_pylist()])
    rb = RankBatch.from_table(pa.concat_tables([chains, short]))
    rows = list(range(rb.num_rows))
    units = prompt_units(rb, rows, True, w)
    assert [len(u) for u in units] == [1] * 8 + [8, 8]
    assert len(prompt_units(rb, rows, True)) == 3  # weight 0: every group shared (the former rule)
    model = load_policy(tiny_model_dir, torch.device("cpu"))
    padded, _ = _logprobs(model, rb, 10_000)
    mixed, mbs = _logprobs(model, rb, 10_000, share_prompt=True, attention_weight=w)
    torch.testing.assert_close(mixed, padded, atol=1e-5, rtol=0)
    assert sorted(i for mb in mbs for i in mb.rows.tolist()) == rows
    assert TrainerCore(TrainerConfig(), tiny_model_dir).attention_weight == pytest.approx(w)
