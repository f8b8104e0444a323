"""Publishing weights: full tensors gathered from FSDP2 shards, in versioned byte-budget buckets.

    model.state_dict() (DTensor shards) ─► plan buckets by byte size (from shapes, no data)
        ─► per bucket: DTensor.full_tensor() on every rank (a collective, same order everywhere)
        ─► WeightBucket(version, index, num_buckets, names, tensors) on CPU ─► engine.update_weights

Names are the HF names of the unwrapped model (``model.layers.0.self_attn.q_proj.weight``).
With tied embeddings the state dict holds ``lm_head.weight`` as a second name for
``model.embed_tokens.weight``; it is left out by default (engines re-tie it, and a tied state
dict cannot be saved by safetensors as is).

Every rank must iterate the generator to the end (the gathers are collectives); only the
caller on rank 0 usually forwards the buckets.

>>> for bucket in iter_weight_buckets(model, version=3, bucket_bytes=64 << 20):  # doctest: +SKIP
...     engine.update_weights(bucket.version, bucket.named_tensors())
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

_WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth")
_MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json")


@dataclasses.dataclass(frozen=True)
class WeightBucket:
    """Some named full tensors (CPU, contiguous) of policy version ``version``."""

    version: int
    index: int
    num_buckets: int
    names: list[str]
    tensors: list[torch.Tensor]

    @property
    def last(self) -> bool:
        return self.index == self.num_buckets - 1

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)

    def named_tensors(self) -> list[tuple[str, torch.Tensor]]:
        return list(zip(self.names, self.tensors, strict=True))


def _is_tied(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return bool(getattr(config, "tie_word_embeddings", False))


def publishable_state(model: nn.Module, include_tied: bool = False) -> dict[str, torch.Tensor]:
    """The state dict entries to publish, in a fixed order (may be DTensor shards)."""
    state = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    tied = _is_tied(model)
    for name, t in state.items():
        if not include_tied and ((tied and name == "lm_head.weight") or id(t) in seen):
            continue
        seen.add(id(t))
        out[name] = t
    return out


def _full(t: torch.Tensor) -> torch.Tensor:
    if hasattr(t, "full_tensor"):  # DTensor: all-gather the shards
        t = t.full_tensor()
    return t.detach().to("cpu").contiguous()


def plan_buckets(state: dict[str, torch.Tensor], bucket_bytes: int) -> list[list[str]]:
    """Group names in order so each bucket holds <= bucket_bytes (a bigger tensor gets its own)."""
    buckets: list[list[str]] = []
    current: list[str] = []
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()  # DTensor numel() is the global size
        if current and size + nbytes > bucket_bytes:
            buckets.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    if current:
        buckets.append(current)
    return buckets


def iter_weight_buckets(
    model: nn.Module, version: int, bucket_bytes: int, include_tied: bool = False
) -> Iterator[WeightBucket]:
    """Full tensors of ``model`` in buckets of at most ``bucket_bytes``; collective under FSDP2."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}; set weight_sync.bucket_mb to a positive size")
    state = publishable_state(model, include_tied)
    plan = plan_buckets(state, bucket_bytes)
    for i, names in enumerate(plan):
        yield WeightBucket(version, i, len(plan), names, [_full(state[n]) for n in names])


def full_state_dict(model: nn.Module, include_tied: bool = False) -> dict[str, torch.Tensor]:
    """Every publishable tensor gathered to full size on CPU (collective under FSDP2)."""
    return {n: _full(t) for n, t in publishable_state(model, include_tied).items()}


def export_hf(model: nn.Module, out_dir: str | Path, source_dir: str | Path, write: bool = True) -> Path | None:
    """Save ``model`` as an HF folder loadable by transformers and vLLM.

    Writes ``model.safetensors`` (tied ``lm_head`` left out), ``config.json``,
    ``generation_config.json`` and copies the tokenizer and other non-weight files from
    ``source_dir``. Under FSDP2 every rank must call it (the gather is a collective); only the
    rank with ``write=True`` writes.
    """
    from safetensors.torch import save_file

    state = full_state_dict(model)
    if not write:
        return None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for f in Path(source_dir).iterdir():
        if f.is_file() and not f.name.endswith(_WEIGHT_FILES) and f.name not in _MODEL_FILES:
            shutil.copy2(f, out / f.name)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(str(out))
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(str(out))
    return out
