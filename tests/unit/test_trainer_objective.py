"""The composed micro-batch objective (off-policy correction, entropy, KL-as-loss, SFT) by hand.

One row of three tokens, token_mean over N = 3 tokens, so d loss / d logp_t = coef_t / 3 with
coef_t computed below with plain floats.
"""

from __future__ import annotations

import math

import pytest
import torch
from slime_rl.trainer.config import KLConfig, LossConfig, OffPolicyConfig
from slime_rl.trainer.losses import LossNorm
from slime_rl.trainer.objective import ObjectiveInputs, micro_batch_loss

LP = [-1.0, -2.0, -0.5]  # current policy log-probs of the three sampled tokens
E = math.e
LC = LossConfig(eps_low=0.2, eps_high=0.28, dual_clip=3.0)
NORM = LossNorm(num_tokens=3, num_seqs=1)


def _run(adv, behaviour, *, proximal=None, oc=OffPolicyConfig(), lc=LC, kc=KLConfig(), **extra):
    lp = torch.tensor([LP], requires_grad=True)
    extra = {k: torch.tensor([v]) if not isinstance(v, torch.Tensor) else v for k, v in extra.items()}
    inp = ObjectiveInputs(
        logprobs_BR=lp,
        proximal_BR=None if proximal is None else torch.tensor([proximal]),
        behaviour_BR=torch.tensor([behaviour]),
        advantages_BR=torch.tensor([adv]),
        mask_BR=torch.ones(1, 3),
        **extra,
    )
    out = micro_batch_loss(inp, lc, oc, kc, NORM)
    out.loss.backward()
    return out, lp.grad[0].tolist()


# Engine log-probs = LP + offset: w = pi_prox / pi_engine = exp(-offset) = e, 0.60653, 1.
OFFSET = [-1.0, 0.5, 0.0]
BEHAVIOUR = [lp + o for lp, o in zip(LP, OFFSET, strict=True)]
W = math.exp(-0.5)  # 0.6065307


@pytest.mark.parametrize(
    ("is_mode", "weights"),
    [("truncate", [2.0, W, 1.0]), ("mask", [0.0, W, 1.0]), ("none", [1.0, 1.0, 1.0])],
)
def test_decoupled_on_policy_pass_weights_by_truncated_is(is_mode, weights):
    # proximal=trainer, update pass = pre-update policy: ratio 1 (inside the clip), so
    # loss_t = -A_t w_t and d loss / d logp_t = -A_t w_t / 3.
    adv = [1.0, 1.0, -2.0]
    out, grad = _run(adv, BEHAVIOUR, oc=OffPolicyConfig(proximal="trainer", is_mode=is_mode, is_cap=2.0))
    expected = [-a * w for a, w in zip(adv, weights, strict=True)]
    assert out.loss.item() == pytest.approx(sum(expected) / 3, abs=1e-6)
    assert grad == pytest.approx([e / 3 for e in expected], abs=1e-6)
    assert out.weight_BR[0].tolist() == pytest.approx(weights, abs=1e-6)
    assert out.pg.ratio_BR[0].tolist() == pytest.approx([1.0, 1.0, 1.0])


def test_decoupled_objective_ratio_against_proximal_weight_against_engine():
    # pi_theta moved away from pi_prox by [+0.1, -0.1, 0]: ratio r = e^0.1, e^-0.1, 1 (inside
    # [0.8, 1.28]); engine = prox + OFFSET -> w = min(e, 2), e^-0.5, 1.
    prox = [LP[0] - 0.1, LP[1] + 0.1, LP[2]]
    behaviour = [p + o for p, o in zip(prox, OFFSET, strict=True)]
    r = [math.exp(0.1), math.exp(-0.1), 1.0]
    w = [2.0, W, 1.0]
    adv = [1.0, 1.0, 1.0]
    out, grad = _run(adv, behaviour, proximal=prox, oc=OffPolicyConfig(proximal="trainer", is_mode="truncate", is_cap=2.0))
    # loss_t = -A w r ; d/dlogp = -A w r (d r / d logp = r)
    expected = [-a * wi * ri for a, wi, ri in zip(adv, w, r, strict=True)]
    assert out.loss.item() == pytest.approx(sum(expected) / 3, abs=1e-6)
    assert grad == pytest.approx([e / 3 for e in expected], abs=1e-6)


def test_proximal_engine_ratio_against_engine_with_ppo_clip():
    # ratio = pi / pi_engine = exp(-OFFSET) = e, e^-0.5, 1 ; no behaviour weight.
    # t0: A=+1, r=e > 1.28: max(-e, -1.28) = -1.28, clipped -> grad 0
    # t1: A=+1, r=.6065 < .8: max(-.6065, -.8) = -.6065, unclipped -> grad -.6065
    # t2: A=-2, r=1: 2, grad 2
    adv = [1.0, 1.0, -2.0]
    out, grad = _run(adv, BEHAVIOUR, oc=OffPolicyConfig(proximal="engine", is_mode="truncate", is_cap=2.0))
    assert out.loss.item() == pytest.approx((-1.28 - W + 2.0) / 3, abs=1e-6)
    assert grad == pytest.approx([0.0, -W / 3, 2.0 / 3], abs=1e-6)
    assert out.weight_BR[0].tolist() == [1.0, 1.0, 1.0]
    # A = -1 on a token with r = e: -A r = e > -A clip = 1.28, dual clip caps at 3 (not hit)
    out, grad = _run([-1.0, -1.0, -1.0], BEHAVIOUR, oc=OffPolicyConfig(proximal="engine", is_mode="none"))
    # t0: e (grad e) ; t1: r=.6065 -> max(.6065, .8) = .8 clipped (grad 0) ; t2: 1 (grad 1)
    assert out.loss.item() == pytest.approx((E + 0.8 + 1.0) / 3, abs=1e-6)
    assert grad == pytest.approx([E / 3, 0.0, 1 / 3], abs=1e-6)


def test_entropy_bonus_is_subtracted_and_raises_entropy():
    ent = torch.tensor([[0.5, 1.0, 1.5]], requires_grad=True)
    out, grad = _run([0.0] * 3, LP, lc=LossConfig(entropy_coef=0.1), entropy_BR=ent)
    assert out.loss.item() == pytest.approx(-0.1 * 1.0)  # -coef * mean entropy
    assert ent.grad[0].tolist() == pytest.approx([-0.1 / 3] * 3)  # descent raises entropy
    assert grad == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="entropy_coef > 0 needs the entropy"):
        _run([0.0] * 3, LP, lc=LossConfig(entropy_coef=0.1))


def test_sft_term_is_nll_on_eligible_tokens():
    # sft_mask [1, 1, 0]: loss = 0.5 * (1 + 2) / 3 ; grad = -0.5/3 on the eligible tokens
    out, grad = _run([0.0] * 3, LP, lc=LossConfig(sft_coef=0.5), sft_mask_BR=[1.0, 1.0, 0.0])
    assert out.loss.item() == pytest.approx(0.5)
    assert grad == pytest.approx([-0.5 / 3, -0.5 / 3, 0.0])


@pytest.mark.parametrize(
    ("estimator", "values", "grads"),
    # r = logp - ref = [0.5, -0.5, 0]
    # k1 = r, d/dlogp = 1 ; k2 = r^2/2, d = r ; k3 = e^-r - 1 + r, d = 1 - e^-r
    [
        ("k1", [0.5, -0.5, 0.0], [1.0, 1.0, 1.0]),
        ("k2", [0.125, 0.125, 0.0], [0.5, -0.5, 0.0]),
        ("k3", [W - 0.5, math.exp(0.5) - 1.5, 0.0], [1 - W, 1 - math.exp(0.5), 0.0]),
    ],
)
def test_kl_as_loss_value_and_gradient(estimator, values, grads):
    ref = [LP[0] - 0.5, LP[1] + 0.5, LP[2]]
    kc = KLConfig(coef=0.2, estimator=estimator, mode="loss")
    out, grad = _run([0.0] * 3, LP, kc=kc, ref_BR=ref)
    assert out.loss.item() == pytest.approx(0.2 * sum(values) / 3, abs=1e-6)
    assert grad == pytest.approx([0.2 * g / 3 for g in grads], abs=1e-6)
    # mode=reward: the KL is only reported, never in the loss
    out, grad = _run([0.0] * 3, LP, kc=KLConfig(coef=0.2, estimator=estimator, mode="reward"), ref_BR=ref)
    assert out.loss.item() == 0.0 and grad == [0.0, 0.0, 0.0]
    assert out.kl_BR[0].tolist() == pytest.approx(values, abs=1e-6)
