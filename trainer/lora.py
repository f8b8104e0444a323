"""LoRA on the policy (peft): wrap, what a weight sync ships, and the adapter / merged exports.

    load_policy ─► apply_lora(model, trainer.lora) ─► PeftModel: base frozen, lora_A / lora_B
                   trainable (only they reach the optimizer: optim.build_optimizer keeps
                   parameters with requires_grad)
    WeightSync.publish ─► publish_state(model, "adapter") ─► {peft name: lora tensor}
                                                          (engines vllm / hf serve the adapter)
                       └► publish_state(model, "merged")  ─► {HF name: W + alpha/r · B @ A}
                                                          (any engine; full-size sync)
    final_hf / <checkpoint>/hf ─► save_adapter (PEFT folder) [+ merged HF model]

Adapter tensors are named as peft saves them (``base_model.model.model.layers.0.self_attn.
q_proj.lora_A.weight``): what ``PeftModel.from_pretrained``, ``set_peft_model_state_dict`` and
vLLM's ``LoRAModel.from_lora_tensors`` read. lora_B starts at zero, so version 0 of the policy
is exactly the base model (engines start without an adapter).

Tied embeddings stay untouched: adapters go on linear layers only (``LoraConfig`` refuses
embeddings and lm_head), so ``lm_head`` and ``embed_tokens`` remain one frozen weight.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from slime_rl.trainer.config import LoraConfig
from torch import nn

logger = logging.getLogger(__name__)

_INSTALL_HINT = "install slime-rl[lora] (peft) to use trainer.lora.rank > 0"
ADAPTER_NAME = "default"


def _peft():
    try:
        import peft
    except ImportError as e:
        raise ImportError(_INSTALL_HINT) from e
    return peft


def linear_module_names(model: nn.Module) -> list[str]:
    """The distinct last name parts of the model's ``nn.Linear`` layers, lm_head left out:
    what ``trainer.lora.target_modules`` may name."""
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear) and n}
    names.discard("lm_head")
    return sorted(names)


def is_lora(model: nn.Module) -> bool:
    """Whether ``model`` is a peft-wrapped policy."""
    return hasattr(model, "peft_config")


def peft_config(cfg: LoraConfig) -> Any:
    """peft's ``LoraConfig`` for ``trainer.lora``."""
    return _peft().LoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(cfg.target_modules),
        bias="none", task_type="CAUSAL_LM",
    )


def engine_adapter_config(cfg: LoraConfig) -> dict[str, Any]:
    """What an engine needs to serve the adapter (the keys of a PEFT ``adapter_config.json``)."""
    return {"r": int(cfg.rank), "lora_alpha": float(cfg.alpha), "target_modules": list(cfg.target_modules),
            "bias": "none", "peft_type": "LORA", "task_type": "CAUSAL_LM"}


def check_target_modules(model: nn.Module, cfg: LoraConfig) -> None:
    """Refuse ``trainer.lora.target_modules`` that ``model`` (real or on the meta device) lacks.

    Raises:
        ValueError: naming the key, the unknown names and the model's linear layers.
    """
    available = linear_module_names(model)
    unknown = [m for m in cfg.target_modules if m not in available]
    if unknown:
        raise ValueError(
            f"trainer.lora.target_modules={list(cfg.target_modules)}: {type(model).__name__} has no linear layer "
            f"named {unknown}; its linear layers are {available}"
        )


def apply_lora(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """Wrap ``model`` with LoRA adapters on ``cfg.target_modules``; the base is frozen.

    Raises:
        ValueError: a target module the model does not have (names what it has).
        ImportError: peft is not installed.
    """
    check_target_modules(model, cfg)
    peft = _peft()
    wrapped = peft.get_peft_model(model, peft_config(cfg))
    for name, p in wrapped.named_parameters():
        p.requires_grad_("lora_" in name)
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    total = sum(p.numel() for p in wrapped.parameters())
    logger.info(
        "trainer.lora: rank %d alpha %g on %s: %d trainable parameters of %d (%.2f %%)",
        cfg.rank, cfg.alpha, list(cfg.target_modules), trainable, total, 100.0 * trainable / max(total, 1),
    )
    return wrapped


def _full(t: torch.Tensor) -> torch.Tensor:
    if hasattr(t, "full_tensor"):  # DTensor under FSDP2: all-gather
        t = t.full_tensor()
    return t.detach().to("cpu")


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors under their PEFT (saved) names, in a fixed order (may be DTensor shards)."""
    peft = _peft()
    return dict(peft.get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME))


def _scaling(model: nn.Module) -> float:
    c = model.peft_config[ADAPTER_NAME]
    return float(c.lora_alpha) / float(c.r)


def _merge_plan(model: nn.Module) -> dict[str, tuple[str, str | None]]:
    """HF name -> (state-dict name of the base tensor, adapted module or None), in state order;
    tied ``lm_head`` and the lora tensors left out."""
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    plan: dict[str, tuple[str, str | None]] = {}
    for name in model.state_dict():
        if ".lora_" in name:
            continue
        hf = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
        if tied and hf == "lm_head.weight":
            continue
        module = name.rsplit(".base_layer.", 1)[0] if name.endswith(".base_layer.weight") else None
        plan[hf] = (name, module)
    return plan


def merged_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full HF-named weights with every adapter merged in (``W + alpha/r · B @ A``), tied
    ``lm_head`` left out, gathered to CPU (collective under FSDP2: all ranks call it, and
    rank by rank it holds a full copy of the model)."""
    state = model.state_dict()
    scaling = _scaling(model)
    out: dict[str, torch.Tensor] = {}
    for hf, (name, module) in _merge_plan(model).items():
        t = _full(state[name])
        if module is not None:
            a = _full(state[f"{module}.lora_A.{ADAPTER_NAME}.weight"]).float()
            b = _full(state[f"{module}.lora_B.{ADAPTER_NAME}.weight"]).float()
            t = (t.float() + scaling * (b @ a)).to(t.dtype)
        out[hf] = t.contiguous()
    return out


def publish_state(model: nn.Module, what: str, shapes_only: bool = False) -> dict[str, torch.Tensor]:
    """What a weight sync of a LoRA policy ships: ``adapter`` (lora tensors) or ``merged``.
    ``shapes_only``: tensors with the right names, shapes and dtypes, nothing gathered or
    merged (any one rank can answer; for ``weight_layout``)."""
    if what in ("adapter", "auto"):  # auto: resolved against the engine by the driver; alone, adapter
        return adapter_state(model)
    if what != "merged":
        raise ValueError(f"trainer.lora.publish={what!r}; choose one of auto, adapter, merged")
    if shapes_only:
        state = model.state_dict()
        return {hf: state[name] for hf, (name, _) in _merge_plan(model).items()}
    return merged_state(model)


def export_policy_hf(
    model: nn.Module, out_dir: str | Path, source_dir: str | Path, write: bool = True, merged: bool = False
) -> Path | None:
    """HF export of the policy: a plain HF folder without LoRA (``weights.export_hf``); with
    LoRA the PEFT adapter folder at ``out_dir`` and, when ``merged``, the merged model in
    ``out_dir/merged`` (a plain HF folder vLLM serves). Collective under FSDP2."""
    from slime_rl.trainer.weights import export_hf

    if not is_lora(model):
        return export_hf(model, out_dir, source_dir, write)
    out = save_adapter(model, out_dir, source_dir, write)
    if merged:
        export_hf(model, Path(out_dir) / "merged", source_dir, write, state=merged_state(model))
    return out


def save_adapter(model: nn.Module, out_dir: str | Path, source_dir: str | Path, write: bool = True) -> Path | None:
    """A PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``, and the
    tokenizer of ``source_dir``): ``PeftModel.from_pretrained(base, out_dir)`` and vLLM's
    ``LoRARequest`` load it. Collective under FSDP2; only ``write=True`` writes."""
    from slime_rl.trainer.weights import write_tensors_folder

    tensors = {n: _full(t).contiguous() for n, t in adapter_state(model).items()}
    if not write:
        return None
    out = write_tensors_folder(out_dir, source_dir, tensors, "adapter_model.safetensors")
    config = model.peft_config[ADAPTER_NAME].to_dict()
    config["base_model_name_or_path"] = str(Path(source_dir).resolve())
    config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2, default=str))
    return out
