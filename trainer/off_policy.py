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


def _raw_weight(proximal_BR: torch.Tensor, behaviour_BR: torch.Tensor) -> torch.Tensor:
    return exp_log_ratio(proximal_BR - behaviour_BR)


def _truncate(proximal_BR: torch.Tensor, behaviour_BR: torch.Tensor, cap: float) -> torch.Tensor:
    return _raw_weight(proximal_BR, behaviour_BR).clamp(max=cap)


def _mask(proximal_BR: torch.Tensor, behaviour_BR: torch.Tensor, cap: float) -> torch.Tensor:
    w_BR = _raw_weight(proximal_BR, behaviour_BR)
    return torch.where(w_BR <= cap, w_BR, torch.zeros_like(w_BR))


def _none(proximal_BR: torch.Tensor, behaviour_BR: torch.Tensor, cap: float) -> torch.Tensor:
    return torch.ones_like(proximal_BR)


WeightFn = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
IS_WEIGHTS: dict[str, WeightFn] = {"truncate": _truncate, "mask": _mask, "none": _none}


def behaviour_weight(
    proximal_BR: torch.Tensor, behaviour_BR: torch.Tensor, mode: str, cap: float
) -> torch.Tensor:
    """Per-token importance weight pi_prox / pi_b after truncation or masking (no gradient)."""
    if mode not in IS_WEIGHTS:
        raise ValueError(f"trainer.off_policy.is_mode={mode!r} is unknown; choose one of {sorted(IS_WEIGHTS)}")
    with torch.no_grad():
        return IS_WEIGHTS[mode](proximal_BR.detach(), behaviour_BR, cap)


def record_mismatch(
    metrics: StepMetrics,
    trainer_BR: torch.Tensor,
    behaviour_BR: torch.Tensor,
    staleness_BR: torch.Tensor,
    mask_BR: torch.Tensor,
) -> None:
    """Add train-vs-engine log-prob gap and staleness metrics for the loss tokens.

    train/logprob_mismatch        mean |log pi_trainer - log pi_engine|
    train/logprob_mismatch_kl     KL(pi_engine || pi_trainer), k3 estimate on engine samples
    train/logprob_mismatch_fresh  mean |gap| on tokens of staleness 0 (pure numerics); left out of
                                  a step that trained no such token
    train/staleness_mean|max      trainer version - token version
    """
    with torch.no_grad():
        m_BR = mask_BR > 0
        n = m_BR.sum()
        diff_BR = (trainer_BR - behaviour_BR).float()
        kl_BR = exp_log_ratio(diff_BR) - 1.0 - diff_BR
        metrics.add_mean("train/logprob_mismatch", diff_BR.abs()[m_BR].sum(), n)
        metrics.add_mean("train/logprob_mismatch_kl", kl_BR[m_BR].sum(), n)
        fresh_BR = m_BR & (staleness_BR == 0)
        metrics.add_mean("train/logprob_mismatch_fresh", diff_BR.abs()[fresh_BR].sum(), fresh_BR.sum(), omit_if_empty=True)
        stale_BR = staleness_BR.float()
        metrics.add_mean("train/staleness_mean", stale_BR[m_BR].sum(), n)
        metrics.add_max("train/staleness_max", stale_BR[m_BR].max() if bool(n > 0) else 0.0)


def record_ratios(
    metrics: StepMetrics,
    ratio_BR: torch.Tensor,
    weight_BR: torch.Tensor,
    clipped_BR: torch.Tensor,
    dual_clipped_BR: torch.Tensor,
    mask_BR: torch.Tensor,
) -> None:
    """Add importance-ratio, behaviour-weight and clip-fraction metrics for the loss tokens."""
    with torch.no_grad():
        m_BR = mask_BR > 0
        n = m_BR.sum()
        has = bool(n > 0)
        metrics.add_mean("train/ratio_mean", ratio_BR.detach()[m_BR].sum(), n)
        metrics.add_max("train/ratio_max", ratio_BR.detach()[m_BR].max() if has else 0.0)
        metrics.add_mean("train/is_weight_mean", weight_BR[m_BR].sum(), n)
        metrics.add_max("train/is_weight_max", weight_BR[m_BR].max() if has else 0.0)
        metrics.add_mean("train/is_masked_frac", (weight_BR[m_BR] == 0).sum(), n)
        metrics.add_mean("train/clip_frac", clipped_BR[m_BR].sum(), n)
        metrics.add_mean("train/dual_clip_frac", dual_clipped_BR[m_BR].sum(), n)
