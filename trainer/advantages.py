"""Advantage estimators: rewards (and values) -> per-token advantages and returns.

All tensors are laid out ``(N, R)``: one row per sample, one column per predicted position,
with ``mask_NR`` = 1 on the tokens that carry loss (the policy's own response tokens;
prompt, padding and tool/observation tokens are 0). Time recursions (returns, GAE) walk
the masked tokens only, so a tool observation in the middle of a response is skipped.

Statistics that span the whole global batch (REINFORCE++ and GAE whitening) go through
``all_reduce_sum`` so every trainer rank normalises with the same numbers; group statistics
(GRPO, RLOO) need no communication because a group never spans two ranks. GRPO and RLOO
score each sample by its sequence reward ``rewards_N`` (the reward minus the summed KL
penalty), so a sample without loss tokens still counts in its group's baseline; samples with
``valid_N`` = False (excluded statuses such as failed rewards) are left out of the group
statistics, and a group with fewer than two valid samples gets zero advantage. Group
statistics run in float64 and a group whose valid scores are all equal (no spread beyond
``ZERO_SPREAD_RTOL`` of their magnitude) gets exactly zero advantage: the float mean of n
equal values is not always that value, and dividing its residue by std + eps would invent
a signal (8 rewards of 1.2 in float32 gave +0.106 each).

>>> import torch
>>> inp = AdvantageInputs(
...     token_rewards_NR=torch.tensor([[0.0, 1.0], [0.0, 0.0]]),
...     mask_NR=torch.ones(2, 2), group_index_N=torch.tensor([0, 0]), rewards_N=torch.tensor([1.0, 0.0]))
>>> compute_advantages("grpo", inp, AdvantageConfig(norm_std=False)).advantages_NR
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
    """What an estimator may read. ``token_rewards_NR`` holds the sample reward on its last
    loss token plus any per-token KL penalty; ``rewards_N`` the sequence score (reward minus
    summed KL penalty) used by group baselines; ``values_NR`` is the critic's value (gae only);
    ``valid_N`` (bool, default all) marks samples that may enter group statistics."""

    token_rewards_NR: torch.Tensor
    mask_NR: torch.Tensor
    group_index_N: torch.Tensor
    rewards_N: torch.Tensor
    values_NR: torch.Tensor | None = None
    valid_N: torch.Tensor | None = None


@dataclasses.dataclass(frozen=True)
class AdvantageOutputs:
    advantages_NR: torch.Tensor
    returns_NR: torch.Tensor


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


def place_rewards(rewards_N: torch.Tensor, mask_NR: torch.Tensor) -> torch.Tensor:
    """Put each sample's scalar reward on its last loss token -> (N, R). Rows without a loss
    token get no reward (they contribute nothing anyway)."""
    N, R = mask_NR.shape
    out_NR = torch.zeros(N, R, dtype=torch.float32, device=mask_NR.device)
    if R == 0:  # every response is empty: nothing to place
        return out_NR
    pos_R = torch.arange(R, device=mask_NR.device).expand(N, R)
    last_N = torch.where(mask_NR > 0, pos_R, -1).max(dim=1).values  # (N,)
    has = last_N >= 0
    out_NR[has, last_N[has]] = rewards_N[has].float()
    return out_NR


ZERO_SPREAD_RTOL = 1e-12
"""A group's valid scores whose max - min is at most this fraction of their magnitude are
treated as equal (float64 noise; distinct float32 rewards differ by >= 6e-8 relative)."""


@dataclasses.dataclass(frozen=True)
class _GroupStats:
    """Per-sample statistics of its group's valid samples, float64 (N,)."""

    mean_N: torch.Tensor
    std_N: torch.Tensor  # unbiased (n - 1)
    count_N: torch.Tensor
    informative_N: torch.Tensor  # bool: valid, >= 2 valid samples in the group, and a real spread


def _group_stats(scores_N: torch.Tensor, group_index_N: torch.Tensor, valid_N: torch.Tensor) -> _GroupStats:
    """Group mean, std and count over the valid samples of each group, and which samples may
    get a non-zero advantage. ``scores_N`` is float64."""
    n_groups = int(group_index_N.max().item()) + 1 if group_index_N.numel() else 0
    v_N = valid_N.to(scores_N.dtype)
    zeros_G = torch.zeros(n_groups, dtype=scores_N.dtype)
    count_G = zeros_G.index_add(0, group_index_N, v_N)
    sum_G = zeros_G.index_add(0, group_index_N, scores_N * v_N)
    mean_G = sum_G / count_G.clamp(min=1)
    dev_N = (scores_N - mean_G[group_index_N]) * v_N
    ss_G = zeros_G.index_add(0, group_index_N, dev_N * dev_N)
    std_G = torch.sqrt(ss_G / (count_G - 1).clamp(min=1))
    inf = float("inf")
    lo_N, hi_N = torch.where(valid_N, scores_N, -inf), torch.where(valid_N, scores_N, inf)
    max_G = torch.full_like(zeros_G, -inf).scatter_reduce(0, group_index_N, lo_N, "amax")
    min_G = torch.full_like(zeros_G, inf).scatter_reduce(0, group_index_N, hi_N, "amin")
    spread_G = torch.where(count_G > 1, max_G - min_G, torch.zeros_like(max_G))
    scale_G = torch.where(count_G > 1, torch.maximum(max_G.abs(), min_G.abs()), torch.zeros_like(max_G))
    has_signal_G = (count_G > 1) & (spread_G > ZERO_SPREAD_RTOL * scale_G)
    g = group_index_N
    return _GroupStats(mean_G[g], std_G[g], count_G[g], valid_N & has_signal_G[g])


def _scores(inp: AdvantageInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sequence scores in float64, group index, valid) on CPU."""
    scores_N = inp.rewards_N.detach().double().cpu()
    valid_N = torch.ones_like(scores_N, dtype=torch.bool) if inp.valid_N is None else inp.valid_N.bool().cpu()
    return scores_N, inp.group_index_N.cpu(), valid_N


def _broadcast(score_N: torch.Tensor, informative_N: torch.Tensor, mask_NR: torch.Tensor) -> torch.Tensor:
    """Zero outside informative samples, float32, on every loss token of the row -> (N, R)."""
    score_N = torch.where(informative_N, score_N, torch.zeros_like(score_N)).float().to(mask_NR.device)
    return score_N[:, None] * mask_NR


@register("grpo")
def grpo(inp: AdvantageInputs, cfg: AdvantageConfig, all_reduce_sum: AllReduce) -> AdvantageOutputs:
    """A_i = (R_i - mean_group(R)) [/ (std_group(R) + eps)], the same on every token of sample i.
    R_i is the sequence reward (minus any summed KL penalty). std is unbiased (n-1); groups of
    fewer than two valid samples or without reward spread, and invalid samples, get exactly 0."""
    scores_N, group_N, valid_N = _scores(inp)
    st = _group_stats(scores_N, group_N, valid_N)
    adv_N = scores_N - st.mean_N
    if cfg.norm_std:
        adv_N = adv_N / (st.std_N + cfg.eps)
    adv_NR = _broadcast(adv_N, st.informative_N, inp.mask_NR)
    return AdvantageOutputs(adv_NR, adv_NR)


@register("rloo")
def rloo(inp: AdvantageInputs, cfg: AdvantageConfig, all_reduce_sum: AllReduce) -> AdvantageOutputs:
    """A_i = R_i - mean_{j != i, same group, valid} R_j = n/(n-1) (R_i - mean). Groups of one,
    or without reward spread, get exactly 0."""
    scores_N, group_N, valid_N = _scores(inp)
    st = _group_stats(scores_N, group_N, valid_N)
    adv_N = (scores_N - st.mean_N) * st.count_N / (st.count_N - 1).clamp(min=1)
    adv_NR = _broadcast(adv_N, st.informative_N, inp.mask_NR)
    return AdvantageOutputs(adv_NR, adv_NR)


def discounted_returns(rewards_NR: torch.Tensor, mask_NR: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = r_t + gamma * G_next over loss tokens only (masked positions carry G through)."""
    N, R = rewards_NR.shape
    out_NR = torch.zeros_like(rewards_NR, dtype=torch.float32)
    running_N = torch.zeros(N, dtype=torch.float32, device=rewards_NR.device)
    for t in range(R - 1, -1, -1):
        m_N = mask_NR[:, t].float()
        running_N = m_N * (rewards_NR[:, t] + gamma * running_N) + (1 - m_N) * running_N
        out_NR[:, t] = running_N
    return out_NR * mask_NR


def masked_whiten(x_NR: torch.Tensor, mask_NR: torch.Tensor, eps: float, all_reduce_sum: AllReduce) -> torch.Tensor:
    """(x - mean) / (std + eps) over the loss tokens of the global batch (population std)."""
    m = mask_NR.float()
    stats = torch.stack([(x_NR * m).sum(), m.sum(), (x_NR * x_NR * m).sum()]).double()
    total, n, sq = all_reduce_sum(stats).tolist()
    n = max(n, 1.0)
    mean = total / n
    var = max(sq / n - mean * mean, 0.0)
    return (x_NR - mean) / (var**0.5 + eps) * m


@register("reinforce_pp")
def reinforce_pp(inp: AdvantageInputs, cfg: AdvantageConfig, all_reduce_sum: AllReduce) -> AdvantageOutputs:
    """REINFORCE++: discounted token returns, whitened over every loss token of the global batch."""
    returns_NR = discounted_returns(inp.token_rewards_NR, inp.mask_NR, cfg.gamma)
    return AdvantageOutputs(masked_whiten(returns_NR, inp.mask_NR, cfg.eps, all_reduce_sum), returns_NR)


@register("gae")
def gae(inp: AdvantageInputs, cfg: AdvantageConfig, all_reduce_sum: AllReduce) -> AdvantageOutputs:
    """delta_t = r_t + gamma V_next - V_t; A_t = delta_t + gamma lam A_next (next = the next loss
    token; 0 after the last one); returns = A + V (the critic's target, before whitening)."""
    if inp.values_NR is None:
        raise ValueError("trainer.advantage.estimator=gae needs critic values; none were computed")
    r_NR, v_NR, mask_NR = inp.token_rewards_NR.float(), inp.values_NR.float(), inp.mask_NR.float()
    N, R = r_NR.shape
    adv_NR = torch.zeros_like(r_NR)
    next_v_N = torch.zeros(N, device=r_NR.device)
    last_N = torch.zeros(N, device=r_NR.device)
    for t in range(R - 1, -1, -1):
        m_N = mask_NR[:, t]
        delta_N = r_NR[:, t] + cfg.gamma * next_v_N - v_NR[:, t]
        a_N = delta_N + cfg.gamma * cfg.lam * last_N
        last_N = m_N * a_N + (1 - m_N) * last_N
        next_v_N = m_N * v_NR[:, t] + (1 - m_N) * next_v_N
        adv_NR[:, t] = a_N * m_N
    returns_NR = (adv_NR + v_NR) * mask_NR
    if cfg.whiten:
        adv_NR = masked_whiten(adv_NR, mask_NR, cfg.eps, all_reduce_sum)
    return AdvantageOutputs(adv_NR, returns_NR)
