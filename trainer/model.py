"""Policy, reference and critic models, FSDP2 sharding, and log-prob / value forward passes.

    HF folder ─► load_policy / load_reference / ValueModel ─► shard (fully_shard per decoder
    layer, then the root; only when torch.distributed is up) ─► response_logprobs(micro-batch)

Tied embeddings (``lm_head`` = ``embed_tokens``) stay one parameter: both live in the root
FSDP unit. With ``trainer.lora`` the policy is a peft model (``trainer.lora``): frozen base,
trainable adapters. Precision: fp32 parameters everywhere; bf16 autocast on GPU when
``trainer.batching.precision`` is ``auto`` or ``bf16``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from slime_rl.trainer.batching import MicroBatch
from slime_rl.trainer.config import LoraConfig
from torch import nn

logger = logging.getLogger(__name__)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on GPU for precision auto/bf16 (and on CPU only for an explicit bf16); else nothing."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def load_policy(
    path: str | Path, device: torch.device, gradient_checkpointing: bool = False, lora: LoraConfig | None = None
) -> nn.Module:
    """An HF causal LM in fp32 on ``device``, in train mode; with ``lora`` (rank > 0) wrapped
    by peft: base frozen, adapters trainable (``trainer.lora.apply_lora``)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    if lora is not None and lora.rank > 0:
        from slime_rl.trainer.lora import apply_lora

        model = apply_lora(model, lora)
    return model.to(device).train()


def load_reference(path: str | Path, device: torch.device) -> nn.Module:
    """A frozen copy of a causal LM for KL (eval mode, no gradients)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model.config.use_cache = False
    model.requires_grad_(False)
    return model.to(device).eval()


class ValueModel(nn.Module):
    """Critic: the policy's transformer body (HF ``AutoModel``) and a zero-initialised scalar head."""

    def __init__(self, path: str | Path, device: torch.device, gradient_checkpointing: bool = False) -> None:
        super().__init__()
        from transformers import AutoModel

        self.backbone = AutoModel.from_pretrained(str(path), dtype=torch.float32)
        if gradient_checkpointing:
            self.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.head = nn.Linear(self.backbone.config.hidden_size, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.to(device).train()

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        hidden_BTH = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        return self.head(hidden_BTH).squeeze(-1)  # (B, T)


def _layer_lists(model: nn.Module) -> Iterator[nn.ModuleList]:
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.split(".")[-1] == "layers":
            yield module


def shard(model: nn.Module) -> nn.Module:
    """FSDP2: ``fully_shard`` each decoder layer, then the root (which keeps tied embeddings together).
    A no-op without an initialised torch.distributed process group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return model
    from torch.distributed.fsdp import fully_shard

    for layers in _layer_lists(model):
        for layer in layers:
            fully_shard(layer)
    fully_shard(model)
    return model


def _at_response(x_BT: torch.Tensor, mb: MicroBatch) -> torch.Tensor:
    """Rows of ``x`` (B, T, ...) at the positions predicting each response token -> (B, R, ...)."""
    if mb.packed:  # packed / shared-prompt layouts: resp_pos indexes the flattened input
        return x_BT.flatten(0, 1)[mb.resp_pos_BR]
    B, R = mb.resp_pos_BR.shape
    idx = mb.resp_pos_BR.view(B, R, *([1] * (x_BT.dim() - 2))).expand(B, R, *x_BT.shape[2:])
    return x_BT.gather(1, idx)


def attention_mask(model: nn.Module, mb: MicroBatch) -> torch.Tensor | None:
    """The ``attention_mask`` argument of ``mb``: its (B, T) padding mask, or its (U, 1, T, T) block
    mask: bool for sdpa, additive float for eager attention (which adds the mask to the scores)."""
    if mb.block_mask_B1TT is None:
        return mb.attention_mask_BT
    impl = _attn_implementation(model)
    if impl not in BLOCK_MASK_ATTENTION:
        raise ValueError(
            f"the policy uses attn_implementation={impl!r}, which does not take a 4D block mask; set "
            "trainer.batching.share_prompt=off"
        )
    if impl == "eager":
        blocked = torch.finfo(torch.float32).min
        return torch.zeros(mb.block_mask_B1TT.shape, device=mb.block_mask_B1TT.device).masked_fill(
            ~mb.block_mask_B1TT, blocked
        )
    return mb.block_mask_B1TT


BLOCK_MASK_ATTENTION = ("sdpa", "eager")
"""Attention implementations that honour a custom 4D mask (shared-prompt micro-batches)."""


def _attn_implementation(model: nn.Module) -> str:
    """The HF attention implementation of a causal LM or of a ValueModel's backbone."""
    config = getattr(model, "config", None) or getattr(getattr(model, "backbone", None), "config", None)
    return str(getattr(config, "_attn_implementation", None) or "sdpa")


def supports_block_mask(model: nn.Module) -> bool:
    """Whether ``model``'s attention takes the shared-prompt layout's 4D block mask."""
    return _attn_implementation(model) in BLOCK_MASK_ATTENTION


def response_logprobs(
    model: nn.Module, mb: MicroBatch, temperature: float, with_entropy: bool = False, entropy_grad: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob of every response token under ``model`` -> (B, R), and optionally the entropy (B, R)
    (differentiable only with ``entropy_grad``; a metric-only entropy saves no graph)."""
    logits_BTV = model(
        input_ids=mb.input_ids_BT, attention_mask=attention_mask(model, mb), position_ids=mb.position_ids_BT,
        use_cache=False,
    ).logits
    logits_BRV = _at_response(logits_BTV, mb).float() / temperature
    logp_BRV = torch.log_softmax(logits_BRV, dim=-1)
    logprobs_BR = logp_BRV.gather(2, mb.response_ids_BR[:, :, None]).squeeze(-1)
    entropy_BR = None
    if with_entropy:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            entropy_BR = -(logp_BRV.exp() * logp_BRV).sum(dim=-1)
    return logprobs_BR, entropy_BR


def response_values(critic: nn.Module, mb: MicroBatch) -> torch.Tensor:
    """Critic value of the state before each response token -> (B, R)."""
    values_BT = critic(input_ids=mb.input_ids_BT, attention_mask=attention_mask(critic, mb), position_ids=mb.position_ids_BT)
    return _at_response(values_BT.float(), mb)
