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

A ``WeightBucket`` pickles its tensors as raw byte buffers (pickle protocol 5, out of band):
``ray.put`` copies them into the object store once, and ``ray.get`` in an engine maps them
without a copy (read-only tensors over shared memory; an engine copies them into its own
parameters). Pickling torch tensors the default way costs a copy on each side and ~10x the time.

>>> for bucket in iter_weight_buckets(model, version=3, bucket_bytes=64 << 20):  # doctest: +SKIP
...     engine.update_weights(bucket.version, bucket.named_tensors())
"""

from __future__ import annotations

import dataclasses
import shutil
import warnings
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

    def __reduce__(self):
        """Tensors as flat byte views (no copy here; out-of-band buffers under pickle 5)."""
        raw = [_byte_view(t) for t in self.tensors]
        meta = [(str(t.dtype).removeprefix("torch."), tuple(t.shape)) for t in self.tensors]
        return _rebuild_bucket, (self.version, self.index, self.num_buckets, list(self.names), raw, meta)


def _byte_view(t: torch.Tensor):
    """The bytes of a CPU tensor as a flat uint8 numpy array (a view when already contiguous)."""
    t = t.detach().to("cpu").contiguous()
    return t.reshape(-1).view(torch.uint8).numpy()


def _rebuild_bucket(version: int, index: int, num_buckets: int, names: list[str], raw: list, meta: list) -> WeightBucket:
    tensors = []
    with warnings.catch_warnings():  # read-only object-store memory: engines only read it
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for buf, (dtype, shape) in zip(raw, meta, strict=True):
            tensors.append(torch.from_numpy(buf).view(getattr(torch, dtype)).reshape(shape))
    return WeightBucket(version, index, num_buckets, names, tensors)


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


def _full(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    if hasattr(t, "full_tensor"):  # DTensor: all-gather the shards
        t = t.full_tensor()
    return t.detach().to("cpu", dtype=dtype or t.dtype).contiguous()


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"bfloat16"`` / ``torch.bfloat16`` / None (keep the trainer's dtype) as a torch dtype."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    got = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(got, torch.dtype) or not got.is_floating_point:
        raise ValueError(f"weight publish dtype {dtype!r} is not a torch floating-point dtype; use e.g. bfloat16")
    return got


def plan_buckets(state: dict[str, torch.Tensor], bucket_bytes: int, dtype: torch.dtype | None = None) -> list[list[str]]:
    """Group names in order so each bucket holds <= bucket_bytes (a bigger tensor gets its own)."""
    buckets: list[list[str]] = []
    current: list[str] = []
    size = 0
    for name, t in state.items():
        itemsize = torch.empty((), dtype=dtype).element_size() if dtype is not None else t.element_size()
        nbytes = t.numel() * itemsize  # DTensor numel() is the global size
        if current and size + nbytes > bucket_bytes:
            buckets.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    if current:
        buckets.append(current)
    return buckets


def iter_weight_buckets(
    model: nn.Module,
    version: int,
    bucket_bytes: int,
    include_tied: bool = False,
    dtype: str | torch.dtype | None = None,
    state: dict[str, torch.Tensor] | None = None,
) -> Iterator[WeightBucket]:
    """Full tensors of ``model`` (or of ``state``, e.g. a LoRA policy's adapter tensors, see
    ``trainer.lora.publish_state``) in buckets of at most ``bucket_bytes``, cast to ``dtype``
    when given (e.g. the engines' bfloat16: half the bytes to move); collective under FSDP2."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}; set weight_sync.bucket_mb to a positive size")
    dtype = resolve_dtype(dtype)
    if state is None:
        state = publishable_state(model, include_tied)
    plan = plan_buckets(state, bucket_bytes, dtype)
    for i, names in enumerate(plan):
        yield WeightBucket(version, i, len(plan), names, [_full(state[n], dtype) for n in names])


def weight_layout(
    model: nn.Module,
    bucket_bytes: int,
    include_tied: bool = False,
    dtype: str | torch.dtype | None = None,
    state: dict[str, torch.Tensor] | None = None,
) -> list[list[tuple[str, tuple[int, ...], str]]]:
    """``(name, shape, dtype)`` of every tensor of every bucket ``iter_weight_buckets`` yields
    (for ``model``, or for ``state`` when given), from the shapes alone (no data moved; without
    ``state`` no gather either, any one rank can answer)."""
    dtype = resolve_dtype(dtype)
    if state is None:
        state = publishable_state(model, include_tied)
    return [
        [(n, tuple(state[n].shape), str(dtype or state[n].dtype).removeprefix("torch.")) for n in names]
        for names in plan_buckets(state, bucket_bytes, dtype)
    ]


def full_state_dict(model: nn.Module, include_tied: bool = False) -> dict[str, torch.Tensor]:
    """Every publishable tensor gathered to full size on CPU (collective under FSDP2)."""
    return {n: _full(t) for n, t in publishable_state(model, include_tied).items()}


def write_tensors_folder(out_dir: str | Path, source_dir: str | Path, tensors: dict[str, torch.Tensor], filename: str) -> Path:
    """``out_dir`` with ``tensors`` in ``filename`` (safetensors) and the tokenizer and other
    non-weight, non-model-config files of the HF folder ``source_dir``; returns ``out_dir``."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for f in Path(source_dir).iterdir():
        if f.is_file() and not f.name.endswith(_WEIGHT_FILES) and f.name not in _MODEL_FILES:
            shutil.copy2(f, out / f.name)
    save_file(tensors, str(out / filename), metadata={"format": "pt"})
    return out


def export_hf(
    model: nn.Module,
    out_dir: str | Path,
    source_dir: str | Path,
    write: bool = True,
    state: dict[str, torch.Tensor] | None = None,
) -> Path | None:
    """Save ``model`` as an HF folder loadable by transformers and vLLM.

    Writes ``model.safetensors`` (tied ``lm_head`` left out), ``config.json``,
    ``generation_config.json`` and copies the tokenizer and other non-weight files from
    ``source_dir``. Under FSDP2 every rank must call it (the gather is a collective); only the
    rank with ``write=True`` writes. ``state``: the full HF-named tensors to write instead of
    the model's own (a LoRA policy's merged weights, ``trainer.lora.merged_state``).
    """
    if state is None:
        state = full_state_dict(model)
    if not write:
        return None
    out = write_tensors_folder(out_dir, source_dir, state, "model.safetensors")
    model.config.save_pretrained(str(out))
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(str(out))
    return out
