"""TrainerCore.train_step on inputs that used to break it or to train silently on garbage:
empty responses, unfilled or implausible behaviour log-probs, per-token columns of the wrong
length; and the metrics of what the update used (LR, gradient norm), the thread count."""

from __future__ import annotations

import math

import pyarrow as pa
import pytest
import torch
from slime_rl.trainer import core as core_mod
from slime_rl.trainer.config import TrainerConfig
from slime_rl.trainer.core import TrainerCore
from slime_rl.trainer.testing import on_policy, synthetic_table

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 400  # < the tiny tokenizer's size


def _cfg(groups: int = 2, **kw) -> TrainerConfig:
    cfg = TrainerConfig(lr=1e-3, global_batch_groups=groups)
    cfg.batching.max_tokens_per_micro_batch = 64
    for k, v in kw.items():
        section, _, name = k.rpartition("__")
        setattr(getattr(cfg, section) if section else cfg, name, v)
    return cfg


def _with_column(table: pa.Table, name: str, values: list) -> pa.Table:
    i = table.schema.get_field_index(name)
    return table.set_column(i, table.schema.field(i), pa.array(values, type=table.schema.field(i).type))


def _params(core: TrainerCore) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in core.policy.state_dict().items()}


def _moved(before: dict[str, torch.Tensor], core: TrainerCore) -> float:
    return max((before[k] - v).abs().max().item() for k, v in _params(core).items())


# -- item: empty responses ------------------------------------------------------------------
def test_batch_of_empty_responses_is_a_counted_no_op(tiny_model_dir):
    """Every response has 0 tokens (e.g. all aborted before the first token): the step goes on,
    changes no weight, and says so in train/empty_samples."""
    table = synthetic_table(num_groups=2, group_size=3, vocab_size=VOCAB, seed=0, response_len=(0, 0))
    core = TrainerCore(_cfg(), tiny_model_dir)
    before = _params(core)
    m = core.train_step(table)
    assert all(math.isfinite(v) for v in m.values()), m
    assert m["train/empty_samples"] == 6.0 and m["train/loss_tokens"] == 0.0 and m["train/loss"] == 0.0
    assert m["train/skipped_updates"] == 1.0 and m["train/grad_norm"] == 0.0
    assert _moved(before, core) == 0.0
    assert core.version == 1 and m["train/version"] == 1.0


def test_empty_aborted_group_beside_real_ones_is_counted(tiny_model_dir):
    real = synthetic_table(num_groups=2, group_size=2, vocab_size=VOCAB, seed=1)
    empty = synthetic_table(num_groups=1, group_size=2, vocab_size=VOCAB, seed=2, response_len=(0, 0))
    empty = _with_column(_with_column(empty, "group_id", ["gx", "gx"]), "status", ["aborted", "aborted"])
    core = TrainerCore(_cfg(3, max_logprob_mismatch=0.0), tiny_model_dir)
    before = _params(core)
    m = core.train_step(pa.concat_tables([real, empty]))
    assert m["train/empty_samples"] == 2.0 and m["train/excluded_samples"] == 2.0
    assert m["train/skipped_updates"] == 0.0 and _moved(before, core) > 1e-4


# -- item: what the update used ---------------------------------------------------------------
@pytest.mark.parametrize(("updates", "expected"), [(1, [2.5e-4, 5e-4]), (2, [(2.5e-4 + 5e-4) / 2, (7.5e-4 + 1e-3) / 2])])
def test_lr_metric_is_the_lr_the_updates_used(tiny_model_dir, updates, expected):
    """Warm-up 4 at lr 1e-3: the first update runs at 2.5e-4 (the scheduler's value for the
    *next* update, 5e-4, is not what this step used). Several updates: their mean."""
    core = TrainerCore(_cfg(optim__warmup_steps=4, batching__updates_per_batch=updates), tiny_model_dir)
    used: list[float] = []
    core.optimizer.register_step_pre_hook(lambda opt, args, kwargs: used.append(opt.param_groups[0]["lr"]))
    table = on_policy(core, synthetic_table(num_groups=2, group_size=2, vocab_size=VOCAB, seed=3))
    got = [core.train_step(table)["train/lr"] for _ in range(2)]
    assert used[:2] == pytest.approx([2.5e-4, 5e-4])
    assert got == pytest.approx(expected, rel=1e-9)


def test_grad_norm_metrics_cover_every_update(tiny_model_dir, monkeypatch):
    norms: list[float] = []
    clip = core_mod.clip_grad_norm

    def spy(params, max_norm):
        norms.append(clip(params, max_norm))
        return norms[-1]

    monkeypatch.setattr(core_mod, "clip_grad_norm", spy)
    core = TrainerCore(_cfg(4, batching__updates_per_batch=2, max_logprob_mismatch=0.0), tiny_model_dir)
    m = core.train_step(synthetic_table(num_groups=4, group_size=2, vocab_size=VOCAB, seed=4))
    assert len(norms) == 2 and norms[0] != norms[1]
    assert m["train/micro_batches"] >= 2  # summed over both updates, not averaged
    assert m["train/grad_norm"] == pytest.approx(sum(norms) / 2, rel=1e-12)
    assert m["train/grad_norm_max"] == pytest.approx(max(norms), rel=1e-12)


# -- item: behaviour log-probs ------------------------------------------------------------------
def test_unfilled_behaviour_logprobs_are_refused(tiny_model_dir):
    """response_logprobs never filled (the Sample default, all 0.0): refused before any update,
    fresh or stale."""
    table = synthetic_table(num_groups=2, group_size=2, vocab_size=VOCAB, seed=5, behaviour_logprob=0.0)
    core = TrainerCore(_cfg(), tiny_model_dir)
    before = _params(core)
    with pytest.raises(ValueError, match=r"column 'response_logprobs' is 0\.0 on all \d+ loss tokens"):
        core.train_step(table)
    core.version = 5  # every token 5 versions stale: still refused
    with pytest.raises(ValueError, match="response_logprobs"):
        core.train_step(table)
    assert _moved(before, core) == 0.0 and core.step == 0


def test_all_zero_behaviour_logprobs_pass_only_when_the_trainer_is_certain_too():
    """A policy certain of every token it samples has float32 log-probs of exactly 0.0: trained
    on; all zero while the trainer gives the tokens real log-probs: refused as never filled."""
    from slime_rl.trainer.checks import CERTAIN_NATS, check_all_zero_behaviour

    check_all_zero_behaviour(total=0.5 * CERTAIN_NATS * 64, count=64)
    with pytest.raises(ValueError, match=r"0\.0 on all 64 loss tokens .* trainer gives those tokens -2\.000 nats"):
        check_all_zero_behaviour(total=2.0 * 64, count=64)


@pytest.mark.parametrize("offset", [1.5, -2.0])
def test_implausible_fresh_mismatch_is_refused(tiny_model_dir, offset):
    core = TrainerCore(_cfg(), tiny_model_dir)
    base = synthetic_table(num_groups=2, group_size=2, vocab_size=VOCAB, seed=6)
    before = _params(core)
    with pytest.raises(ValueError, match=r"response_logprobs.*differ from the trainer's by \d\.\d+ nats.*max_logprob_mismatch=1\.0"):
        core.train_step(on_policy(core, base, offset))
    assert _moved(before, core) == 0.0 and core.step == 0


def test_mismatch_check_passes_plausible_or_stale_data_and_can_be_disabled(tiny_model_dir):
    base = synthetic_table(num_groups=2, group_size=2, vocab_size=VOCAB, seed=6)
    core = TrainerCore(_cfg(), tiny_model_dir)
    m = core.train_step(on_policy(core, base, 0.5))  # a gap under the threshold trains
    assert m["train/logprob_mismatch_fresh"] == pytest.approx(0.5, rel=1e-3)
    stale = TrainerCore(_cfg(), tiny_model_dir)
    stale.version = 3  # staleness explains a gap: not checked
    stale.train_step(on_policy(stale, base, 3.0))
    off = TrainerCore(_cfg(max_logprob_mismatch=0.0), tiny_model_dir)
    off.train_step(on_policy(off, base, 3.0))
    with pytest.raises(ValueError, match="max_logprob_mismatch"):  # updates_per_batch=2: checked from the pre-pass
        two = TrainerCore(_cfg(batching__updates_per_batch=2), tiny_model_dir)
        two.train_step(on_policy(two, base, 3.0))


# -- item: per-token column lengths -------------------------------------------------------------
@pytest.mark.parametrize("column", ["response_logprobs", "loss_mask", "token_versions"])
def test_per_token_column_of_wrong_length_names_column_and_row(tiny_model_dir, column):
    table = synthetic_table(num_groups=2, group_size=2, vocab_size=VOCAB, seed=7)
    values = table.column(column).to_pylist()
    values[2] = values[2][:-1]
    core = TrainerCore(_cfg(max_logprob_mismatch=0.0), tiny_model_dir)
    with pytest.raises(ValueError, match=rf"column '{column}' row 2 has \d+ entries but response_ids has \d+"):
        core.train_step(_with_column(table, column, values))


# -- item: thread count -----------------------------------------------------------------------
def test_trainer_core_sets_its_thread_count_even_after_vllm_patched_torch(tiny_model_dir, monkeypatch):
    """vLLM's CPU worker replaces torch.set_num_threads by a no-op in its process; the trainer
    must still get trainer.num_threads."""
    TrainerCore(_cfg(num_threads=2), tiny_model_dir)
    assert torch.get_num_threads() == 2
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    TrainerCore(_cfg(num_threads=3), tiny_model_dir)
    assert torch.get_num_threads() == 3
