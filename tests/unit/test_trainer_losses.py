"""Policy/value/entropy losses, KL estimators, aggregation and off-policy weights, by hand."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from slime_rl.trainer.batching import MicroBatch
from slime_rl.trainer.config import LossConfig
from slime_rl.trainer.kl import MAX_LOG_RATIO, exp_log_ratio, kl_estimate
from slime_rl.trainer.losses import LossNorm, aggregate, policy_loss, value_loss
from slime_rl.trainer.metrics import StepMetrics
from slime_rl.trainer.model import response_logprobs
from slime_rl.trainer.off_policy import behaviour_weight, record_mismatch

CFG = LossConfig(eps_low=0.2, eps_high=0.28, dual_clip=3.0)


def test_ppo_clip_higher_and_dual_clip():
    # ratio, advantage -> loss (by hand):
    # 1.5, +1: max(-1.5, -1.28) = -1.28 (clipped at 1+eps_high)
    # 0.5, +1: max(-0.5, -0.8)  = -0.5
    # 0.5, -1: max(0.5, 0.8)    = 0.8  (clipped at 1-eps_low)
    # 5.0, -1: max(5, 1.28) = 5 -> dual clip min(5, 3) = 3
    # 1.1, +2: -2.2
    ratios = [1.5, 0.5, 0.5, 5.0, 1.1]
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, 2.0]])
    logp = torch.tensor([[math.log(r) for r in ratios]], requires_grad=True)
    out = policy_loss("ppo", logp, torch.zeros(1, 5), adv, torch.ones(1, 5), CFG)
    assert out.loss_BR.tolist()[0] == pytest.approx([-1.28, -0.5, 0.8, 3.0, -2.2], abs=1e-6)
    assert out.clipped_BR.tolist()[0] == [True, False, True, False, False]
    assert out.dual_clipped_BR.tolist()[0] == [False, False, False, True, False]
    out.loss_BR.sum().backward()
    # d(-A r)/dlogp = -A r where unclipped; 0 where a clip is active
    assert logp.grad.tolist()[0] == pytest.approx([0.0, -0.5, 0.0, 0.0, -2.2], abs=1e-6)


def test_ppo_without_dual_clip_keeps_large_negative_loss():
    cfg = LossConfig(eps_low=0.2, eps_high=0.2, dual_clip=None)
    out = policy_loss("ppo", torch.tensor([[math.log(5.0)]]), torch.zeros(1, 1), torch.tensor([[-1.0]]), torch.ones(1, 1), cfg)
    assert out.loss_BR.item() == pytest.approx(5.0)


def test_gspo_uses_sequence_ratio_and_ignores_masked_tokens():
    # log-ratios log 1.2, log 0.9 (third token masked, log 10 must not count):
    # s = exp((log 1.2 + log 0.9)/2) = sqrt(1.08) = 1.0392305 ; A = 1 -> loss -1.0392305 on every token
    logp = torch.tensor([[math.log(1.2), math.log(0.9), math.log(10.0)]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    out = policy_loss("gspo", logp, torch.zeros(1, 3), torch.ones(1, 3), mask, CFG)
    s = math.sqrt(1.08)
    assert out.ratio_BR.tolist()[0] == pytest.approx([s, s, s])
    loss = aggregate(out.loss_BR, mask, "seq_mean_token_mean", LossNorm(2, 1))
    assert loss.item() == pytest.approx(-s)
    loss.backward()
    # d(-s)/dlogp_t = -s/2 for the two loss tokens, 0 for the masked one
    assert logp.grad.tolist()[0] == pytest.approx([-s / 2, -s / 2, 0.0])


def test_aggregations_by_hand():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    norm = LossNorm(num_tokens=3, num_seqs=2)
    assert aggregate(loss, mask, "token_mean", norm).item() == pytest.approx(8 / 3)  # (1+3+4)/3
    assert aggregate(loss, mask, "seq_mean_token_mean", norm).item() == pytest.approx(3.0)  # (2+4)/2
    assert aggregate(loss, mask, "seq_mean_token_sum", norm).item() == pytest.approx(4.0)  # (4+4)/2
    # micro-batch shares with the global normaliser add up to the whole
    for mode in ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum"):
        parts = aggregate(loss[:1], mask[:1], mode, norm) + aggregate(loss[1:], mask[1:], mode, norm)
        assert parts.item() == pytest.approx(aggregate(loss, mask, mode, norm).item())


def test_masked_tokens_get_zero_gradient():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, -0.9]], requires_grad=True)
    mask = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    out = policy_loss("ppo", logp, logp.detach() - 0.1, torch.ones(2, 3), mask, CFG)
    aggregate(out.loss_BR, mask, "token_mean", LossNorm(3, 2)).backward()
    assert (logp.grad[mask == 0] == 0).all()
    assert (logp.grad[mask == 1] != 0).all()


class _FixedLogits(torch.nn.Module):
    """A stand-in causal LM whose logits are given (B, T, V), whatever the input."""

    def __init__(self, logits_BTV: torch.Tensor) -> None:
        super().__init__()
        self.logits_BTV = torch.nn.Parameter(logits_BTV)

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False):
        return SimpleNamespace(logits=self.logits_BTV)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_training_entropy_and_logprobs_by_hand(temperature):
    """The entropy the train step uses (model.response_logprobs), at the scoring temperature."""
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.0, math.log(3.0), -1e9, -1e9], [5.0, 0.0, 0.0, 0.0]]])
    mb = MicroBatch(
        rows=torch.tensor([0]),
        input_ids_BT=torch.tensor([[7, 8, 9]]),
        attention_mask_BT=torch.ones(1, 3, dtype=torch.long),
        resp_pos_BR=torch.tensor([[0, 1]]),  # logits at positions 0, 1 predict response tokens 2, 1
        response_ids_BR=torch.tensor([[2, 1]]),
    )
    model = _FixedLogits(logits)
    lp_BR, ent_BR = response_logprobs(model, mb, temperature, with_entropy=True, entropy_grad=True)
    # position 0 uniform over 4 at any temperature: log-prob -ln 4, entropy ln 4.
    # position 1: p proportional to (1, 3^(1/T)); T=1: (.25, .75), entropy 0.5623351.
    q = 3.0 ** (1 / temperature)
    p = (1 / (1 + q), q / (1 + q))
    assert lp_BR.tolist()[0] == pytest.approx([-math.log(4), math.log(p[1])], abs=1e-6)
    assert ent_BR.tolist()[0] == pytest.approx([math.log(4), -sum(x * math.log(x) for x in p)], abs=1e-6)
    if temperature == 1.0:
        assert ent_BR[0, 1].item() == pytest.approx(0.5623351, abs=1e-6)
    ent_BR.sum().backward()  # differentiable for the entropy bonus
    assert model.logits_BTV.grad[0, 1].abs().sum() > 0
    _, ent = response_logprobs(model, mb, temperature, with_entropy=True, entropy_grad=False)
    assert not ent.requires_grad  # metric-only entropy keeps no graph


def test_every_exponentiated_log_ratio_is_capped():
    """One cap (kl.MAX_LOG_RATIO) for PPO/GSPO ratios, importance weights, k3 and the mismatch KL."""
    x = torch.tensor([-1e4, -MAX_LOG_RATIO - 1, -3.0, 0.0, 3.0, MAX_LOG_RATIO + 1, 1e4])
    y = exp_log_ratio(x)
    assert torch.isfinite(y).all()
    assert y[2:5].tolist() == pytest.approx([math.exp(-3), 1.0, math.exp(3)], rel=1e-6)
    assert y[-1] == y[-2] == pytest.approx(math.exp(MAX_LOG_RATIO), rel=1e-6)
    far = torch.tensor([[-1e4, 1e4]])
    ones = torch.ones(1, 2)
    for name in ("ppo", "gspo"):
        out = policy_loss(name, far, torch.zeros(1, 2), ones, ones, CFG)
        assert torch.isfinite(out.loss_BR).all() and torch.isfinite(out.ratio_BR).all()
    assert torch.isfinite(behaviour_weight(far, torch.zeros(1, 2), "none", 2.0)).all()
    assert torch.isfinite(behaviour_weight(far.flip(1), torch.zeros(1, 2), "truncate", 1e12)).all()
    assert torch.isfinite(kl_estimate("k3", far, torch.zeros(1, 2))).all()
    m = StepMetrics()
    record_mismatch(m, far, torch.zeros(1, 2), torch.zeros(1, 2), ones)
    assert all(math.isfinite(v) for v in m.reduce().values())


def test_value_loss_clipping():
    # V=1, V_old=.5, R=2, clip .2: max((1-2)^2, (0.7-2)^2) / 2 = 1.69/2
    # V=.6, V_old=.5, R=.55: both (0.05)^2 -> 0.00125
    v, vl = torch.tensor([[1.0, 0.6]]), torch.tensor([[0.5, 0.5]])
    loss, clipped = value_loss(v, vl, torch.tensor([[2.0, 0.55]]), clip=0.2)
    assert loss.tolist()[0] == pytest.approx([0.845, 0.00125])
    assert clipped.tolist()[0] == [True, False]


@pytest.mark.parametrize(
    ("name", "expected"),
    # r = logp - ref = 1 and -0.5: k1 = r, k2 = r^2/2, k3 = exp(-r) - 1 + r
    [("k1", [1.0, -0.5]), ("k2", [0.5, 0.125]), ("k3", [math.exp(-1), math.exp(0.5) - 1.5])],
)
def test_kl_estimators(name, expected):
    out = kl_estimate(name, torch.tensor([-1.0, -2.0]), torch.tensor([-2.0, -1.5]))
    assert out.tolist() == pytest.approx(expected, abs=1e-6)


def test_kl_unknown_estimator_message():
    with pytest.raises(ValueError, match="trainer.kl.estimator='k4'"):
        kl_estimate("k4", torch.zeros(1), torch.zeros(1))


def test_behaviour_weight_truncate_mask_none():
    # w = exp(prox - behav): e (=2.718) and exp(-0.1) = 0.904837
    prox, behav = torch.tensor([-1.0, -2.0]), torch.tensor([-2.0, -1.9])
    assert behaviour_weight(prox, behav, "truncate", 2.0).tolist() == pytest.approx([2.0, 0.904837], abs=1e-6)
    assert behaviour_weight(prox, behav, "mask", 2.0).tolist() == pytest.approx([0.0, 0.904837], abs=1e-6)
    assert behaviour_weight(prox, behav, "none", 2.0).tolist() == [1.0, 1.0]


def test_mismatch_and_staleness_metrics():
    # gaps |(-1)-(-1.5)| = .5 and 0 ; k3 of d = .5: e^.5 - 1 - .5 = 0.1487213 ; fresh token = first
    m = StepMetrics()
    record_mismatch(m, torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -2.0]]), torch.tensor([[0, 2]]), torch.ones(1, 2))
    out = m.reduce()
    assert out["train/logprob_mismatch"] == pytest.approx(0.25)
    assert out["train/logprob_mismatch_kl"] == pytest.approx(0.1487213 / 2, abs=1e-6)
    assert out["train/logprob_mismatch_fresh"] == pytest.approx(0.5)
    assert out["train/staleness_mean"] == 1.0 and out["train/staleness_max"] == 2.0
