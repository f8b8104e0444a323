"""AdamW, the LR schedule (linear warm-up, then constant or cosine) and gradient clipping.

>>> import torch
>>> from slime_rl.trainer.config import OptimConfig
>>> f = lr_lambda(OptimConfig(warmup_steps=2, schedule="cosine", total_steps=10))
>>> [round(f(s), 3) for s in (0, 1, 2, 10)]
[0.5, 1.0, 1.0, 0.0]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from slime_rl.trainer.config import OptimConfig


def build_optimizer(params: Iterable[torch.nn.Parameter], lr: float, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters (works on FSDP2 DTensor parameters)."""
    trainable = [p for p in params if p.requires_grad]
    return torch.optim.AdamW(
        trainable, lr=lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, weight_decay=cfg.weight_decay
    )


def _constant(progress: float, cfg: OptimConfig) -> float:
    return 1.0


def _cosine(progress: float, cfg: OptimConfig) -> float:
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


SCHEDULES: dict[str, Callable[[float, OptimConfig], float]] = {"constant": _constant, "cosine": _cosine}
"""LR multiplier after warm-up as a function of progress in [0, 1] over total_steps - warmup_steps."""


def lr_lambda(cfg: OptimConfig) -> Callable[[int], float]:
    """LR multiplier at optimizer step s (0-based): (s+1)/warmup during warm-up, then ``SCHEDULES[cfg.schedule]``."""
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"trainer.optim.schedule={cfg.schedule!r} is unknown; choose one of {sorted(SCHEDULES)}")
    after_warmup = SCHEDULES[cfg.schedule]

    def factor(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        span = max(cfg.total_steps - cfg.warmup_steps, 1)
        return after_warmup(min(max(step - cfg.warmup_steps, 0) / span, 1.0), cfg)

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR following ``lr_lambda(cfg)``; step it once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))


def clip_grad_norm(params: Iterable[torch.nn.Parameter], max_norm: float | None) -> float:
    """Global gradient L2 norm across all shards (before clipping); clips when ``max_norm`` is set."""
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(grads, max_norm if max_norm is not None else float("inf"))
    if hasattr(norm, "full_tensor"):  # DTensor under FSDP2
        norm = norm.full_tensor()
    return float(norm)
