"""Per-token estimators of KL(policy || reference) from tokens sampled by the policy.

With r = log pi(y_t) - log pi_ref(y_t) (the sampled token's log-ratio):

    k1 = r                          unbiased, can be negative, high variance
    k2 = r^2 / 2                    biased, low variance, always >= 0
    k3 = exp(-r) - 1 + r            unbiased and always >= 0 (Schulman's estimator)

Used as a loss term (``trainer.kl.mode=loss``: coef * aggregate(k)) or as a per-token reward
penalty (``mode=reward``: r_t -= coef * k, applied before advantages). With
``trainer.kl.coef=0`` nothing here runs and no reference model is loaded.

>>> import torch
>>> kl_estimate("k2", torch.tensor([-1.0]), torch.tensor([-2.0]))
tensor([0.5000])
"""

from __future__ import annotations

from collections.abc import Callable

import torch

KLFn = Callable[[torch.Tensor], torch.Tensor]

MAX_LOG_RATIO = 20.0
"""|log-ratio| cap before ``exp``: e^20 ~ 4.9e8 keeps ratios, importance weights and k3 finite
(float32 and bf16) on wildly diverged tokens."""


def exp_log_ratio(log_ratio: torch.Tensor) -> torch.Tensor:
    """exp(clamp(log_ratio, -MAX_LOG_RATIO, MAX_LOG_RATIO)), elementwise: a probability ratio
    that cannot overflow (its gradient is 0 beyond the cap). Used for every ratio the trainer
    exponentiates: PPO/GSPO ratios, behaviour importance weights, k3, mismatch KL."""
    return torch.exp(log_ratio.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))


def _k1(log_ratio: torch.Tensor) -> torch.Tensor:
    return log_ratio


def _k2(log_ratio: torch.Tensor) -> torch.Tensor:
    return 0.5 * log_ratio * log_ratio


def _k3(log_ratio: torch.Tensor) -> torch.Tensor:
    # exp_log_ratio cannot overflow on wildly diverged tokens; the estimate stays huge.
    return exp_log_ratio(-log_ratio) - 1.0 + log_ratio


KL_ESTIMATORS: dict[str, KLFn] = {"k1": _k1, "k2": _k2, "k3": _k3}


def kl_estimate(name: str, logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Elementwise estimate of KL(pi || pi_ref) at the sampled tokens, same shape as the inputs."""
    if name not in KL_ESTIMATORS:
        raise ValueError(f"trainer.kl.estimator={name!r} is unknown; choose one of {sorted(KL_ESTIMATORS)}")
    return KL_ESTIMATORS[name](logprobs - ref_logprobs)
