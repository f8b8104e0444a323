"""Advantage estimators: rewards (and values) -> per-token advantages and returns.

All tensors are laid out ``(B, L)``: one row per sample, one column per predicted position,
with ``mask_BL`` = 1 on the tokens that carry loss (the policy's own response tokens;
prompt, padding and tool/observation tokens are 0). Time recursions (returns, GAE) walk
the masked tokens only, so a tool observation in the middle of a response is skipped.

Statistics that span the whole global batch (REINFORCE++ and GAE whitening) go through
``all_reduce_sum`` so every trainer rank normalises with the same numbers; group statistics
(GRPO, RLOO) need no communication because a group never spans two ranks. GRPO and RLOO
score each sample by its sequence reward ``rewards_B`` (the reward minus the summed KL
penalty), so a sample without loss tokens still counts in its group's baseline; samples with
``valid_B`` = False (excluded statuses such as failed rewards) are left out of the group
statistics, and a group with fewer than two valid samples gets zero advantage. Group
statistics run in float64 and a group whose valid scores are all equal (no spread beyond
``ZERO_SPREAD_RTOL`` of their magnitude) gets exactly zero advantage: the float mean of n
equal values is not always that value, and dividing its residue by std + eps would invent
a signal (8 rewards of 1.2 in float32 gave +0.106 each).

>>> import torch
>>> inp = AdvantageInputs(
...     token_rewards_BL=torch.tensor([[0.0, 1.0], [0.0, 0.0]]),
...     mask_BL=torch.ones(2, 2), group_index_B=torch.tensor([0, 0]), rewards_B=torch.tensor([1.0, 0.0]))
>>> compute_advantages("grpo", inp, AdvantageConfig(norm_std=False)).advantages_BL
tensor([[ 0.5000,  0.5000],
        [-0.5000, -0.5000]])
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from slime_rl.trainer.config import AdvantageConfig

AllReduce = Callable[[torch.Tensor], torch.Tensor]


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


@dataclasses.dataclass(frozen=True)
class AdvantageInputs:
    """What an estimator may read. ``token_rewards_BL`` holds the sample reward on its last
    loss token plus any per-token KL penalty; ``rewards_B`` the sequence score (reward minus
    summed KL penalty) used by group baselines; ``values_BL`` is the critic's value (gae only);
    ``valid_B`` (bool, default all) marks samples that may enter group statistics."""

    token_rewards_BL: torch.Tensor
    mask_BL: torch.Tensor
    group_index_B: torch.Tensor
    rewards_B: torch.Tensor
    values_BL: torch.Tensor | None = None
    valid_B: torch.Tensor | None = None


@dataclasses.dataclass(frozen=True)
class AdvantageOutputs:
    advantages_BL: torch.Tensor
    returns_BL: torch.Tensor


Estimator = Callable[[AdvantageInputs, AdvantageConfig, AllReduce], AdvantageOutputs]
ESTIMATORS: dict[str, Estimator] = {}


def register(name: str) -> Callable[[Estimator], Estimator]:
    def deco(fn: Estimator) -> Estimator:
        ESTIMATORS[name] = fn
        return fn

    return deco


def compute_advantages(
    name: str,
    inputs: AdvantageInputs,
    cfg: AdvantageConfig,
    all_reduce_sum: AllReduce = _identity,
) -> AdvantageOutputs:
    """Run the estimator registered as ``name`` (see ``ESTIMATORS``)."""
    if name not in ESTIMATORS:
        raise ValueError(f"trainer.advantage.estimator={name!r} is unknown; choose one of {sorted(ESTIMATORS)}")
    return ESTIMATORS[name](inputs, cfg, all_reduce_sum)


def place_rewards(rewards_B: torch.Tensor, mask_BL: torch.Tensor) -> torch.Tensor:
    """Put each sample's scalar reward on its last loss token -> (B, L). Rows without a loss
    token get no reward (they contribute nothing anyway)."""
    B, L = mask_BL.shape
    out_BL = torch.zeros(B, L, dtype=torch.float32, device=mask_BL.device)
    if L == 0:  # every response is empty: nothing to place
        return out_BL
    pos_L = torch.arange(L, device=mask_BL.device).expand(B, L)
    last_B = torch.where(mask_BL > 0, pos_L, -1).max(dim=1).values  # (B,)
    has = last_B >= 0
    out_BL[has, last_B[has]] = rewards_B[has].float()
    return out_BL


ZERO_SPREAD_RTOL = 1e-12
"""A group's valid scores whose max - min is at most this fraction of their magnitude are
treated as equal (float64 noise; distinct float32 rewards differ by >= 6e-8 relative)."""


@dataclasses.dataclass(frozen=True)
class _GroupStats:
    """Per-sample statistics of its group's valid samples, float64 (B,)."""

    mean_B: torch.Tensor
    std_B: torch.Tensor  # unbiased (n - 1)
    count_B: torch.Tensor
    informative_B: torch.Tensor  # bool: valid, >= 2 valid samples in the group, and a real spread


def _group_stats(scores_B: torch.Tensor, group_index_B: torch.Tensor, valid_B: torch.Tensor) -> _GroupStats:
    """Group mean, std and count over the valid samples of each group, and which samples may
    get a non-zero advantage. ``scores_B`` is float64."""
    n_groups = int(group_index_B.max().item()) + 1 if group_index_B.numel() else 0
    v_B = valid_B.to(scores_B.dtype)
    zeros_G = torch.zeros(n_groups, dtype=scores_B.dtype)
    count_G = zeros_G.index_add(0, group_index_B, v_B)
    sum_G = zeros_G.index_add(0, group_index_B, scores_B * v_B)
    mean_G = sum_G / count_G.clamp(min=1)
    dev_B = (scores_B - mean_G[group_index_B]) * v_B
    ss_G = zeros_G.index_add(0, group_index_B, dev_B * dev_B)
    std_G = torch.sqrt(ss_G / (count_G - 1).clamp(min=1))
    inf = float("inf")
    lo_B, hi_B = torch.where(valid_B, scores_B, -inf), torch.where(valid_B, scores_B, inf)
    max_G = torch.full_like(zeros_G, -inf).scatter_reduce(0, group_index_B, lo_B, "amax")
    min_G = torch.full_like(zeros_G, inf).scatter_reduce(0, group_index_B, hi_B, "amin")
    spread_G = torch.where(count_G > 1, max_G - min_G, torch.zeros_like(max_G))
    scale_G = torch.where(count_G > 1, torch.maximum(max_G.abs(), min_G.abs()), torch.zeros_like(max_G))
    has_signal_G = (count_G > 1) & (spread_G > ZERO_SPREAD_RTOL * scale_G)
    g = group_index_B
    return _GroupStats(mean_G[g], std_G[g], count_G[g], valid_B & has_signal_G[g])


def _scores(inp: AdvantageInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sequence scores in float64, group index, valid) on CPU."""
    scores_B = inp.rewards_B.detach().double().cpu()
    valid_B = torch.ones_like(scores_B, dtype=torch.bool) if inp.valid_B is None else inp.valid_B.bool().cpu()
    return scores_B, inp.group_index_B.cpu(), valid_B


def _broadcast(score_B: torch.Tensor, informative_B: torch.Tensor, mask_BL: torch.Tensor) -> torch.Tensor:
    """Zero outside informative samples, float32, on every loss token of the row -> (B, L)."""
    score_B = torch.where(informative_B, score_B, torch.zeros_like(score_B)).float().to(mask_BL.device)
    return score_B[:, None] * mask_BL


@register("grpo")
def grpo(inp: AdvantageInputs, cfg: AdvantageConfig, all_reduce_sum: AllReduce) -> AdvantageOutputs:
    """A_i = (R_i - mean_group(R)) [/ (std_group(R) + eps)], the same on every token of sample i.
    R_i is the sequence reward (minus any summed KL penalty). std is unbiased (n-1); groups of
    fewer than two valid samples or without reward spread, and invalid samples, get exactly 0."""
    scores_B, group_B, valid_B = _scores(inp)
    st = _group_stats(scores_B, group_B, valid_B)
    adv_B = scores_B - st.mean_B
    if cfg.norm_std:
        adv_B = adv_B / (st.std_B + cfg.eps)
    adv_BL = _broadcast(adv_B, st.informative_B, inp.mask_BL)
    return AdvantageOutputs(adv_BL, adv_BL)


@register("rloo")
def rloo(inp: AdvantageInputs, cfg: AdvantageConfig, all_reduce_sum: AllReduce) -> AdvantageOutputs:
    """A_i = R_i - mean_{j != i, same group, valid} R_j = n/(n-1) (R_i - mean). Groups of one,
    or without reward spread, get exactly 0."""
    scores_B, group_B, valid_B = _scores(inp)
    st = _group_stats(scores_B, group_B, valid_B)
    adv_B = (scores_B - st.mean_B) * st.count_B / (st.count_B - 1).clamp(min=1)
    adv_BL = _broadcast(adv_B, st.informative_B, inp.mask_BL)
    return AdvantageOutputs(adv_BL, adv_BL)


def discounted_returns(rewards_BL: torch.Tensor, mask_BL: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = r_t + gamma * G_next over loss tokens only (masked positions carry G through)."""
    B, L = rewards_BL.shape
    out_BL = torch.zeros_like(rewards_BL, dtype=torch.float32)
    running_B = torch.zeros(B, dtype=torch.float32, device=rewards_BL.device)
    for t in range(L - 1, -1, -1):
        m_B = mask_BL[:, t].float()
        running_B = m_B * (rewards_BL[:, t] + gamma * running_B) + (1 - m_B) * running_B
        out_BL[:, t] = running_B
    return out_BL * mask_BL


def masked_whiten(x_BL: torch.Tensor, mask_BL: torch.Tensor, eps: float, all_reduce_sum: AllReduce) -> torch.Tensor:
    """(x - mean) / (std + eps) over the loss tokens of the global batch (population std)."""
    m = mask_BL.float()
    stats = torch.stack([(x_BL * m).sum(), m.sum(), (x_BL * x_BL * m).sum()]).double()
    total, n, sq = all_reduce_sum(stats).tolist()
    n = max(n, 1.0)
    mean = total / n
    var = max(sq / n - mean * mean, 0.0)
    return (x_BL - mean) / (var**0.5 + eps) * m


@register("reinforce_pp")
def reinforce_pp(inp: AdvantageInputs, cfg: AdvantageConfig, all_reduce_sum: AllReduce) -> AdvantageOutputs:
    """REINFORCE++: discounted token returns, whitened over every loss token of the global batch."""
    returns_BL = discounted_returns(inp.token_rewards_BL, inp.mask_BL, cfg.gamma)
    return AdvantageOutputs(masked_whiten(returns_BL, inp.mask_BL, cfg.eps, all_reduce_sum), returns_BL)


@register("gae")
def gae(inp: AdvantageInputs, cfg: AdvantageConfig, all_reduce_sum: AllReduce) -> AdvantageOutputs:
    """delta_t = r_t + gamma V_next - V_t; A_t = delta_t + gamma lam A_next (next = the next loss
    token; 0 after the last one); returns = A + V (the critic's target, before whitening)."""
    if inp.values_BL is None:
        raise ValueError("trainer.advantage.estimator=gae needs critic values; none were computed")
    r_BL, v_BL, mask_BL = inp.token_rewards_BL.float(), inp.values_BL.float(), inp.mask_BL.float()
    B, L = r_BL.shape
    adv_BL = torch.zeros_like(r_BL)
    next_v_B = torch.zeros(B, device=r_BL.device)
    last_B = torch.zeros(B, device=r_BL.device)
    for t in range(L - 1, -1, -1):
        m_B = mask_BL[:, t]
        delta_B = r_BL[:, t] + cfg.gamma * next_v_B - v_BL[:, t]
        a_B = delta_B + cfg.gamma * cfg.lam * last_B
        last_B = m_B * a_B + (1 - m_B) * last_B
        next_v_B = m_B * v_BL[:, t] + (1 - m_B) * next_v_B
        adv_BL[:, t] = a_B * m_B
    returns_BL = (adv_BL + v_BL) * mask_BL
    if cfg.whiten:
        adv_BL = masked_whiten(adv_BL, mask_BL, cfg.eps, all_reduce_sum)
    return AdvantageOutputs(adv_BL, returns_BL)
