"""TrainerCore on the tiny model, in-process (no Ray, no process group)."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch
from slime_rl.trainer.batching import RankBatch, plan_micro_batches
from slime_rl.trainer.config import TrainerConfig
from slime_rl.trainer.core import TrainerCore
from slime_rl.trainer.model import response_logprobs
from slime_rl.trainer.testing import on_policy, policy_logprobs, synthetic_table

VOCAB = 400  # < the tiny tokenizer's size


pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(**kw) -> TrainerConfig:
    cfg = TrainerConfig(lr=kw.pop("lr", 1e-3), global_batch_groups=kw.pop("global_batch_groups", 2))
    cfg.batching.max_tokens_per_micro_batch = 64
    # synthetic_table's constant engine log-probs (-3.0) are not the tiny model's: the
    # plausibility check (its own tests: test_trainer_step_faults.py) would refuse them.
    cfg.max_logprob_mismatch = 0.0
    for k, v in kw.items():
        section, _, name = k.rpartition("__")
        setattr(getattr(cfg, section) if section else cfg, name, v)
    return cfg


def _with_column(table: pa.Table, name: str, values: list, type_: pa.DataType) -> pa.Table:
    i = table.schema.get_field_index(name)
    return table.set_column(i, table.schema.field(i), pa.array(values, type=type_))


def _params(core: TrainerCore) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in core.policy.state_dict().items()}


def test_steps_raise_logprob_of_rewarded_responses(tiny_model_dir):
    core = TrainerCore(_cfg(max_logprob_mismatch=1.0), tiny_model_dir)  # on-policy data passes the check
    table = on_policy(core, synthetic_table(num_groups=2, group_size=4, vocab_size=VOCAB, seed=1))
    rewards = table.column("reward").to_pylist()
    before = [sum(x) / len(x) for x in policy_logprobs(core, table)]
    for _ in range(4):
        metrics = core.train_step(table)
    after = [sum(x) / len(x) for x in policy_logprobs(core, table)]
    for r, b, a in zip(rewards, before, after, strict=True):
        assert (a > b) if r > 0 else (a < b), (r, b, a)
    assert metrics["train/version"] == 4.0 and core.version == 4
    assert metrics["train/staleness_max"] == 3.0  # the batch says version 0; trainer was at 3


def test_loss_mask_honoured(tiny_model_dir):
    """Masked tail tokens and fully masked groups change nothing in the update."""
    base = synthetic_table(num_groups=2, group_size=2, vocab_size=VOCAB, seed=2, response_len=(6, 8))
    masks = [[1] * (len(r) - 3) + [0] * 3 for r in base.column("response_ids").to_pylist()]
    masked = _with_column(base, "loss_mask", masks, pa.list_(pa.int32()))
    # Same samples with different token ids (and engine log-probs) on the masked tail.
    ids = [r[:-3] + [5, 6, 7] for r in base.column("response_ids").to_pylist()]
    altered = _with_column(_with_column(masked, "response_ids", ids, pa.list_(pa.int32())), "response_logprobs",
                           [[-3.0] * (len(r) - 3) + [-9.0] * 3 for r in ids], pa.list_(pa.float32()))
    # Plus a whole extra group whose every token is masked.
    extra = synthetic_table(num_groups=1, group_size=2, vocab_size=VOCAB, seed=9)
    extra = _with_column(extra, "group_id", ["gx", "gx"], pa.string())
    extra = _with_column(extra, "loss_mask", [[0] * len(r) for r in extra.column("response_ids").to_pylist()], pa.list_(pa.int32()))
    with_extra = pa.concat_tables([altered, extra])
    results = []
    for table, groups in ((masked, 2), (with_extra, 3)):
        core = TrainerCore(_cfg(global_batch_groups=groups), tiny_model_dir)
        m = core.train_step(table)
        results.append((m, _params(core)))
    (m1, p1), (m2, p2) = results
    assert m1["train/loss_tokens"] == m2["train/loss_tokens"] == sum(map(sum, masks))
    assert m1["train/loss"] == pytest.approx(m2["train/loss"], rel=1e-5)
    assert m1["train/grad_norm"] == pytest.approx(m2["train/grad_norm"], rel=1e-5)
    # Adam's first step g/(|g|+eps) amplifies float noise on ~0 gradients: allow 5% of lr.
    for k in p1:
        torch.testing.assert_close(p1[k], p2[k], rtol=0, atol=5e-5)


def test_checkpoint_resume_equals_uninterrupted(tiny_model_dir, tmp_path):
    cfg = _cfg(optim__warmup_steps=2, optim__schedule="cosine", optim__total_steps=5)
    tables = [synthetic_table(num_groups=2, group_size=2, vocab_size=VOCAB, seed=s) for s in range(3)]
    core = TrainerCore(cfg, tiny_model_dir)
    core.train_step(tables[0])
    core.save_checkpoint(tmp_path / "ck")
    expected = [core.train_step(tables[1]), core.train_step(tables[2])]
    final = _params(core)

    resumed = TrainerCore(cfg, tiny_model_dir)
    assert resumed.load_checkpoint(tmp_path / "ck") == {"step": 1, "version": 1}
    got = [resumed.train_step(tables[1]), resumed.train_step(tables[2])]
    for e, g in zip(expected, got, strict=True):
        for key in ("train/loss", "train/grad_norm", "train/lr", "train/version"):
            assert g[key] == e[key], key
    for k, v in _params(resumed).items():
        torch.testing.assert_close(v, final[k], rtol=0, atol=0)


def test_incomplete_checkpoint_is_refused(tiny_model_dir, tmp_path):
    core = TrainerCore(_cfg(), tiny_model_dir)
    with pytest.raises(ValueError, match="not a complete trainer checkpoint"):
        core.load_checkpoint(tmp_path)


def test_hf_export_reloads_with_same_logits(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    core = TrainerCore(_cfg(), tiny_model_dir)
    core.train_step(synthetic_table(num_groups=2, group_size=2, vocab_size=VOCAB, seed=0))
    out = core.export_hf(tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    AutoTokenizer.from_pretrained(out)  # the tokenizer came along
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, core.policy(input_ids=ids).logits)


def test_all_algorithms_run_and_update(tiny_model_dir):
    """GAE critic + KL in reward + GSPO + two updates per batch + stale tokens: one step each."""
    table = synthetic_table(num_groups=2, group_size=3, vocab_size=VOCAB, seed=4, policy_version=0)
    variants = [
        _cfg(advantage__estimator="gae", kl__coef=0.05, kl__mode="reward", batching__updates_per_batch=2),
        _cfg(advantage__estimator="rloo", loss__policy_loss="gspo", loss__aggregation="seq_mean_token_mean",
             kl__coef=0.05, kl__estimator="k2", loss__entropy_coef=0.01, loss__sft_coef=0.1, loss__sft_min_reward=0.5),
        _cfg(advantage__estimator="reinforce_pp", off_policy__proximal="engine", loss__aggregation="seq_mean_token_sum"),
        _cfg(advantage__norm_std=False, off_policy__is_mode="mask", off_policy__is_cap=1.5),
    ]
    for cfg in variants:
        core = TrainerCore(cfg, tiny_model_dir)
        before = _params(core)
        m = core.train_step(table)
        assert all(torch.isfinite(torch.tensor(v)) for v in m.values()), m
        assert any((before[k] - v).abs().max() > 0 for k, v in _params(core).items())
        if cfg.advantage.estimator == "gae":
            assert m["train/value_loss"] > 0 and m["train/critic_grad_norm"] > 0
            assert "train/kl_reward_penalty" in m
        if cfg.kl.coef > 0:
            assert "train/kl" in m


def test_bad_batches_are_refused_with_reasons(tiny_model_dir):
    core = TrainerCore(_cfg(batching__updates_per_batch=3), tiny_model_dir)
    table = synthetic_table(num_groups=2, group_size=2, vocab_size=VOCAB, seed=0)
    with pytest.raises(ValueError, match="updates_per_batch=3"):
        core.train_step(table)
    with pytest.raises(ValueError, match=r"trainer rank 0 step 1: sample batch is missing column\(s\) \['loss_mask'\]"):
        core.train_step(table.drop_columns(["loss_mask"]))


def test_packed_micro_batches_match_padded(tiny_model_dir):
    table = synthetic_table(num_groups=2, group_size=3, vocab_size=VOCAB, seed=5)
    rb = RankBatch.from_table(table)
    core = TrainerCore(_cfg(), tiny_model_dir)
    rows = list(range(rb.num_rows))
    with torch.no_grad():
        results = []
        for pack in (False, True):
            out = torch.zeros_like(rb.mask_NR)
            mbs = plan_micro_batches(rb, rows, 48, core.pad_id, pack=pack)
            for mb in mbs:
                out[mb.rows, : mb.width] = response_logprobs(core.policy, mb, 1.0)[0]
            results.append((out * (rb.mask_NR > 0), mbs))
    (padded, _), (packed, packed_mbs) = results
    assert any(len(mb.rows) > 1 for mb in packed_mbs)  # samples really share a sequence
    assert all(mb.input_ids_BT.shape[0] == 1 and mb.input_ids_BT.numel() <= 48 for mb in packed_mbs if len(mb.rows) > 1)
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=0)
    m_padded = core.train_step(table)
    packed_core = TrainerCore(_cfg(batching__pack=True), tiny_model_dir)
    assert packed_core.train_step(table)["train/loss"] == pytest.approx(m_padded["train/loss"], rel=1e-4, abs=1e-7)


@pytest.mark.gpu
def test_gpu_bf16_steps_raise_rewarded_logprob(tiny_model_dir):
    core = TrainerCore(_cfg(), tiny_model_dir, device=torch.device("cuda"))
    table = synthetic_table(num_groups=2, group_size=4, vocab_size=VOCAB, seed=1)
    rewards = table.column("reward").to_pylist()
    before = [sum(x) / len(x) for x in policy_logprobs(core, table)]
    for _ in range(4):
        metrics = core.train_step(table)
    after = [sum(x) / len(x) for x in policy_logprobs(core, table)]
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    gain = [a - b if r > 0 else b - a for r, b, a in zip(rewards, before, after, strict=True)]
    assert sum(gain) > 0
