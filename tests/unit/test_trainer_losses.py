"""Policy/value/entropy losses, KL estimators, aggregation and off-policy weights, by hand."""

from __future__ import annotations

import math

import pytest
import torch
from slime_rl.trainer.config import LossConfig
from slime_rl.trainer.kl import kl_estimate
from slime_rl.trainer.losses import (
    LossNorm,
    aggregate,
    entropy_from_logits,
    policy_loss,
    value_loss,
)
from slime_rl.trainer.metrics import StepMetrics
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
    assert out.loss_BL.tolist()[0] == pytest.approx([-1.28, -0.5, 0.8, 3.0, -2.2], abs=1e-6)
    assert out.clipped_BL.tolist()[0] == [True, False, True, False, False]
    assert out.dual_clipped_BL.tolist()[0] == [False, False, False, True, False]
    out.loss_BL.sum().backward()
    # d(-A r)/dlogp = -A r where unclipped; 0 where a clip is active
    assert logp.grad.tolist()[0] == pytest.approx([0.0, -0.5, 0.0, 0.0, -2.2], abs=1e-6)


def test_ppo_without_dual_clip_keeps_large_negative_loss():
    cfg = LossConfig(eps_low=0.2, eps_high=0.2, dual_clip=None)
    out = policy_loss("ppo", torch.tensor([[math.log(5.0)]]), torch.zeros(1, 1), torch.tensor([[-1.0]]), torch.ones(1, 1), cfg)
    assert out.loss_BL.item() == pytest.approx(5.0)


def test_gspo_uses_sequence_ratio_and_ignores_masked_tokens():
    # log-ratios log 1.2, log 0.9 (third token masked, log 10 must not count):
    # s = exp((log 1.2 + log 0.9)/2) = sqrt(1.08) = 1.0392305 ; A = 1 -> loss -1.0392305 on every token
    logp = torch.tensor([[math.log(1.2), math.log(0.9), math.log(10.0)]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    out = policy_loss("gspo", logp, torch.zeros(1, 3), torch.ones(1, 3), mask, CFG)
    s = math.sqrt(1.08)
    assert out.ratio_BL.tolist()[0] == pytest.approx([s, s, s])
    loss = aggregate(out.loss_BL, mask, "seq_mean_token_mean", LossNorm(2, 1))
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
    aggregate(out.loss_BL, mask, "token_mean", LossNorm(3, 2)).backward()
    assert (logp.grad[mask == 0] == 0).all()
    assert (logp.grad[mask == 1] != 0).all()


def test_entropy_by_hand():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.0, math.log(3.0), -1e9, -1e9]]])
    # uniform over 4: ln 4 ; p = (.25, .75): -(.25 ln .25 + .75 ln .75) = 0.5623351
    assert entropy_from_logits(logits).tolist()[0] == pytest.approx([math.log(4), 0.5623351], abs=1e-6)


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
