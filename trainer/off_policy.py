"""Off-policy correction for stale samples, and the metrics that show how off-policy we are.

Three policies meet in one token's loss:

    behaviour  pi_b     the engine that sampled it (``response_logprobs``, maybe versions old)
    proximal   pi_prox  the trainer's weights before this step's update (recomputed here)
    current    pi_theta the weights being optimised

Decoupled PPO (``trainer.off_policy.proximal=trainer``) clips pi_theta / pi_prox, so the
trust region is anchored on the trainer's own recent policy, and multiplies each token's
loss by the behaviour weight w = pi_prox / pi_b (detached): ``truncate`` uses min(w, C)
(truncated importance sampling), ``mask`` drops tokens with w > C, ``none`` uses 1.
With ``proximal=engine`` the ratio is pi_theta / pi_b and no extra weight applies.

The gap between pi_prox and pi_b has two causes: staleness (the engine ran older weights)
and train/inference mismatch (kernels, precision). Tokens generated with the trainer's
current version (staleness 0) isolate the second: their gap is logged on its own.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from slime_rl.trainer.kl import exp_log_ratio
from slime_rl.trainer.metrics import StepMetrics


def _raw_weight(proximal_BL: torch.Tensor, behaviour_BL: torch.Tensor) -> torch.Tensor:
    return exp_log_ratio(proximal_BL - behaviour_BL)


def _truncate(proximal_BL: torch.Tensor, behaviour_BL: torch.Tensor, cap: float) -> torch.Tensor:
    return _raw_weight(proximal_BL, behaviour_BL).clamp(max=cap)


def _mask(proximal_BL: torch.Tensor, behaviour_BL: torch.Tensor, cap: float) -> torch.Tensor:
    w_BL = _raw_weight(proximal_BL, behaviour_BL)
    return torch.where(w_BL <= cap, w_BL, torch.zeros_like(w_BL))


def _none(proximal_BL: torch.Tensor, behaviour_BL: torch.Tensor, cap: float) -> torch.Tensor:
    return torch.ones_like(proximal_BL)


WeightFn = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
IS_WEIGHTS: dict[str, WeightFn] = {"truncate": _truncate, "mask": _mask, "none": _none}


def behaviour_weight(
    proximal_BL: torch.Tensor, behaviour_BL: torch.Tensor, mode: str, cap: float
) -> torch.Tensor:
    """Per-token importance weight pi_prox / pi_b after truncation or masking (no gradient)."""
    if mode not in IS_WEIGHTS:
        raise ValueError(f"trainer.off_policy.is_mode={mode!r} is unknown; choose one of {sorted(IS_WEIGHTS)}")
    with torch.no_grad():
        return IS_WEIGHTS[mode](proximal_BL.detach(), behaviour_BL, cap)


def record_mismatch(
    metrics: StepMetrics,
    trainer_BL: torch.Tensor,
    behaviour_BL: torch.Tensor,
    staleness_BL: torch.Tensor,
    mask_BL: torch.Tensor,
) -> None:
    """Add train-vs-engine log-prob gap and staleness metrics for the loss tokens.

    train/logprob_mismatch        mean |log pi_trainer - log pi_engine|
    train/logprob_mismatch_kl     KL(pi_engine || pi_trainer), k3 estimate on engine samples
    train/logprob_mismatch_fresh  mean |gap| on tokens of staleness 0 (pure numerics)
    train/staleness_mean|max      trainer version - token version
    """
    with torch.no_grad():
        m_BL = mask_BL > 0
        n = m_BL.sum()
        diff_BL = (trainer_BL - behaviour_BL).float()
        kl_BL = exp_log_ratio(diff_BL) - 1.0 - diff_BL
        metrics.add_mean("train/logprob_mismatch", diff_BL.abs()[m_BL].sum(), n)
        metrics.add_mean("train/logprob_mismatch_kl", kl_BL[m_BL].sum(), n)
        fresh_BL = m_BL & (staleness_BL == 0)
        metrics.add_mean("train/logprob_mismatch_fresh", diff_BL.abs()[fresh_BL].sum(), fresh_BL.sum())
        stale_BL = staleness_BL.float()
        metrics.add_mean("train/staleness_mean", stale_BL[m_BL].sum(), n)
        metrics.add_max("train/staleness_max", stale_BL[m_BL].max() if bool(n > 0) else 0.0)


def record_ratios(
    metrics: StepMetrics,
    ratio_BL: torch.Tensor,
    weight_BL: torch.Tensor,
    clipped_BL: torch.Tensor,
    dual_clipped_BL: torch.Tensor,
    mask_BL: torch.Tensor,
) -> None:
    """Add importance-ratio, behaviour-weight and clip-fraction metrics for the loss tokens."""
    with torch.no_grad():
        m_BL = mask_BL > 0
        n = m_BL.sum()
        has = bool(n > 0)
        metrics.add_mean("train/ratio_mean", ratio_BL.detach()[m_BL].sum(), n)
        metrics.add_max("train/ratio_max", ratio_BL.detach()[m_BL].max() if has else 0.0)
        metrics.add_mean("train/is_weight_mean", weight_BL[m_BL].sum(), n)
        metrics.add_max("train/is_weight_max", weight_BL[m_BL].max() if has else 0.0)
        metrics.add_mean("train/is_masked_frac", (weight_BL[m_BL] == 0).sum(), n)
        metrics.add_mean("train/clip_frac", clipped_BL[m_BL].sum(), n)
        metrics.add_mean("train/dual_clip_frac", dual_clipped_BL[m_BL].sum(), n)
