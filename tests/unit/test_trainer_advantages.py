"""Advantage estimators against hand-computed numbers."""

from __future__ import annotations

import math

import pytest
import torch
from slime_rl.trainer.advantages import (
    AdvantageInputs,
    compute_advantages,
    discounted_returns,
    masked_whiten,
    place_rewards,
)
from slime_rl.trainer.config import AdvantageConfig


def _close(t: torch.Tensor, expected, atol: float = 1e-6) -> None:
    torch.testing.assert_close(t, torch.tensor(expected, dtype=t.dtype), atol=atol, rtol=0)


def _inputs(rewards, groups, width=2, mask=None, values=None, valid=None):
    mask_NR = torch.ones(len(rewards), width) if mask is None else torch.tensor(mask, dtype=torch.float32)
    rewards_N = torch.tensor(rewards, dtype=torch.float32)
    return AdvantageInputs(
        token_rewards_NR=place_rewards(rewards_N, mask_NR),
        mask_NR=mask_NR,
        group_index_N=torch.tensor(groups),
        rewards_N=rewards_N,
        values_NR=None if values is None else torch.tensor(values, dtype=torch.float32),
        valid_N=None if valid is None else torch.tensor(valid),
    )


def test_place_rewards_goes_on_last_loss_token():
    out = place_rewards(torch.tensor([2.0, 3.0, 4.0]), torch.tensor([[1, 1, 0, 0], [0, 1, 0, 1], [0, 0, 0, 0]]))
    assert out.tolist() == [[0, 2, 0, 0], [0, 0, 0, 3], [0, 0, 0, 0]]


def test_grpo_with_std():
    # group rewards 1,0,0,1: mean 0.5, unbiased std sqrt(1/3) -> +-0.5/0.57735 = +-0.866025
    out = compute_advantages("grpo", _inputs([1, 0, 0, 1], [0, 0, 0, 0]), AdvantageConfig(norm_std=True))
    expected = 0.5 / math.sqrt(1 / 3)
    assert out.advantages_NR[:, 0].tolist() == pytest.approx([expected, -expected, -expected, expected], abs=1e-5)
    assert torch.equal(out.advantages_NR[:, 0], out.advantages_NR[:, 1])  # same on every token


def test_dr_grpo_two_groups_and_mask():
    # g0: 1,0 -> +-0.5; g1: 2,2,5 (mean 3) -> -1,-1,2. Masked tokens carry 0.
    mask = [[1, 1], [1, 0], [1, 1], [0, 1], [1, 1]]
    out = compute_advantages("grpo", _inputs([1, 0, 2, 2, 5], [0, 0, 1, 1, 1], mask=mask), AdvantageConfig(norm_std=False))
    _close(out.advantages_NR, [[0.5, 0.5], [-0.5, 0.0], [-1.0, -1.0], [0.0, -1.0], [2.0, 2.0]])


def test_rloo_leave_one_out():
    # g0: 2,2,5 -> 2-3.5, 2-3.5, 5-2 ; g1 has one sample -> 0
    out = compute_advantages("rloo", _inputs([2, 2, 5, 7], [0, 0, 0, 1]), AdvantageConfig())
    assert out.advantages_NR[:, 0].tolist() == pytest.approx([-1.5, -1.5, 3.0, 0.0])


def test_reinforce_pp_whitens_over_batch_tokens():
    # returns (gamma 1): A = [1,1,1], B = [0,0] (third token is padding)
    # 5 tokens: mean 0.6, population std sqrt(0.6 - 0.36) = 0.4898979
    inp = _inputs([1, 0], [0, 1], width=3, mask=[[1, 1, 1], [1, 1, 0]])
    out = compute_advantages("reinforce_pp", inp, AdvantageConfig(gamma=1.0, eps=1e-8))
    hi, lo = 0.4 / 0.4898979, -0.6 / 0.4898979
    _close(out.advantages_NR, [[hi, hi, hi], [lo, lo, 0.0]], atol=1e-5)
    assert out.returns_NR.tolist() == [[1, 1, 1], [0, 0, 0]]


def test_discounted_returns_skip_masked_tool_tokens():
    # mask [1,0,1], reward 1 on the last token, gamma 0.5: the tool token is not a step
    out = discounted_returns(torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[1.0, 0.0, 1.0]]), gamma=0.5)
    assert out.tolist() == [[0.5, 0.0, 1.0]]
    out = discounted_returns(torch.tensor([[0.0, 0.0, 1.0]]), torch.ones(1, 3), gamma=0.5)
    assert out.tolist() == [[0.25, 0.5, 1.0]]


def test_gae_hand_example():
    # rewards [0,0,1], values [.5,.6,.8], gamma 1, lam .5:
    # delta2 = .2, A2 = .2 ; delta1 = .8-.6 = .2, A1 = .2+.5*.2 = .3 ; delta0 = .6-.5 = .1, A0 = .1+.5*.3 = .25
    inp = _inputs([1.0], [0], width=3, values=[[0.5, 0.6, 0.8]])
    out = compute_advantages("gae", inp, AdvantageConfig(gamma=1.0, lam=0.5, whiten=False))
    _close(out.advantages_NR, [[0.25, 0.3, 0.2]])
    _close(out.returns_NR, [[0.75, 0.9, 1.0]])
    # gamma .9, lam 1: A2 = .2 ; A1 = (.72-.6) + .9*.2 = .3 ; A0 = (.54-.5) + .9*.3 = .31
    out = compute_advantages("gae", inp, AdvantageConfig(gamma=0.9, lam=1.0, whiten=False))
    _close(out.advantages_NR, [[0.31, 0.3, 0.2]])


def test_gae_without_values_is_a_clear_error():
    with pytest.raises(ValueError, match="needs critic values"):
        compute_advantages("gae", _inputs([1.0], [0]), AdvantageConfig())


def test_unknown_estimator_names_the_field():
    with pytest.raises(ValueError, match="trainer.advantage.estimator='ppo' is unknown"):
        compute_advantages("ppo", _inputs([1.0], [0]), AdvantageConfig())


def test_whitening_across_ranks_matches_whole_batch():
    # Two "ranks" each whiten their half; the all-reduce adds the other half's statistics.
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0], [0.0, 1.0, 5.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]], dtype=torch.float32)
    full = masked_whiten(x, mask, 1e-8, lambda t: t)

    def stats(xs, ms):
        return torch.stack([(xs * ms).sum(), ms.sum(), (xs * xs * ms).sum()]).double()

    top = masked_whiten(x[:2], mask[:2], 1e-8, lambda t: t + stats(x[2:], mask[2:]))
    bottom = masked_whiten(x[2:], mask[2:], 1e-8, lambda t: t + stats(x[:2], mask[:2]))
    torch.testing.assert_close(torch.cat([top, bottom]), full)


def test_group_baseline_uses_sequence_reward_of_rows_without_loss_tokens():
    # Row 2 has no loss token but reward 1: it still counts in the group mean (2/3), so
    # Dr.GRPO gives 1 - 2/3 and 0 - 2/3 (not 1 - 1/3, 0 - 1/3 as if its reward were 0).
    mask = [[1, 1], [1, 1], [0, 0]]
    out = compute_advantages("grpo", _inputs([1, 0, 1], [0, 0, 0], mask=mask), AdvantageConfig(norm_std=False))
    _close(out.advantages_NR, [[1 / 3, 1 / 3], [-2 / 3, -2 / 3], [0.0, 0.0]])
    # RLOO: 1 - mean(0, 1) = 0.5 ; 0 - mean(1, 1) = -1
    out = compute_advantages("rloo", _inputs([1, 0, 1], [0, 0, 0], mask=mask), AdvantageConfig())
    _close(out.advantages_NR, [[0.5, 0.5], [-1.0, -1.0], [0.0, 0.0]])


def test_invalid_samples_leave_group_statistics():
    # g0: rewards 1, 0, 5 with the 5 invalid -> mean .5, unbiased std .7071 over the two valid ones.
    # g1: one valid (3) and one invalid (9) -> fewer than 2 valid samples: zero advantage.
    valid = [True, True, False, True, False]
    inp = _inputs([1, 0, 5, 3, 9], [0, 0, 0, 1, 1], valid=valid)
    a = 0.5 / (math.sqrt(0.5) + 1e-6)
    out = compute_advantages("grpo", inp, AdvantageConfig(norm_std=True))
    assert out.advantages_NR[:, 0].tolist() == pytest.approx([a, -a, 0.0, 0.0, 0.0], abs=1e-5)
    out = compute_advantages("rloo", inp, AdvantageConfig())
    assert out.advantages_NR[:, 0].tolist() == pytest.approx([1.0, -1.0, 0.0, 0.0, 0.0])


ZERO_INFO_VALUES = [0.1, 1.2, 1e6 + 0.3, -7.7, 1 / 3, 1e-7, -123.456, 0.0, 3e9 + 0.7]
ZERO_INFO_SIZES = [2, 3, 5, 7, 8, 13, 16, 31, 64]


@pytest.mark.parametrize(("estimator", "norm_std"), [("grpo", True), ("grpo", False), ("rloo", True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_groups_of_equal_rewards_get_exactly_zero_advantage(estimator, norm_std, dtype):
    """A float mean of n equal values is not always that value (1.2 x 8 in float32 leaves a
    residue that std + eps then inflates to 0.1); a group without reward spread carries no
    signal and must get exactly 0, whatever the value and the group size."""
    cfg = AdvantageConfig(norm_std=norm_std)
    for value in ZERO_INFO_VALUES:
        for n in ZERO_INFO_SIZES:
            # the zero-information group sits beside an informative one, and holds an excluded
            # sample whose different reward must not count as spread
            rewards = [value] * n + [99.0] + [0.0, 1.0, 0.5]
            groups = [0] * (n + 1) + [1, 1, 1]
            valid = [True] * n + [False] + [True] * 3
            inp = _inputs(rewards, groups, width=3, valid=valid)
            inp = AdvantageInputs(inp.token_rewards_NR, inp.mask_NR, inp.group_index_N,
                                  torch.tensor(rewards, dtype=dtype), valid_N=inp.valid_N)
            adv = compute_advantages(estimator, inp, cfg).advantages_NR
            assert torch.count_nonzero(adv[: n + 1]) == 0, (value, n, adv[:n, 0].tolist())
            assert torch.count_nonzero(adv[n + 1 :]) > 0  # the informative group still learns


def test_grpo_keeps_small_but_real_spread():
    """Rewards one float32 step apart are different rewards: the group is not zeroed."""
    a32 = torch.tensor(1e6 + 0.3, dtype=torch.float32)
    a, b = float(a32), float(torch.nextafter(a32, torch.tensor(2e6)))
    out = compute_advantages("grpo", _inputs([a, b, a, b], [0, 0, 0, 0]), AdvantageConfig(norm_std=False))
    assert out.advantages_NR[:, 0].tolist() == pytest.approx([-(b - a) / 2, (b - a) / 2] * 2)


@pytest.mark.parametrize("estimator", ["grpo", "rloo", "reinforce_pp", "gae"])
def test_estimators_accept_responses_without_tokens(estimator):
    """A batch whose responses all have 0 tokens: (B, 0) tensors in, (B, 0) advantages out."""
    mask_NR = torch.ones(4, 0)
    rewards_N = torch.tensor([1.0, 0.0, 1.0, 1.0])
    inp = AdvantageInputs(place_rewards(rewards_N, mask_NR), mask_NR, torch.tensor([0, 0, 1, 1]), rewards_N,
                          values_NR=torch.zeros(4, 0))
    out = compute_advantages(estimator, inp, AdvantageConfig())
    assert out.advantages_NR.shape == (4, 0) and out.returns_NR.shape == (4, 0)
