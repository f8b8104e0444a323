"""Engine registry: `create_engine(kind, model_path, **params)` instead of an if/elif chain.

Built-ins are registered by import path so that importing the registry loads no backend
(vllm and sglang are optional extras, imported only when their engine is created).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from slime_rl.rollout.config import RolloutConfig
from slime_rl.rollout.engines.base import RolloutEngine

_BUILTINS: dict[str, str] = {
    "hf": "slime_rl.rollout.engines.hf:HFEngine",
    "vllm": "slime_rl.rollout.engines.vllm_engine:VLLMEngine",
    "sglang": "slime_rl.rollout.engines.sglang_engine:SGLangEngine",
}
_CUSTOM: dict[str, Callable[..., RolloutEngine]] = {}


ParamsFromConfig = Callable[[RolloutConfig], dict[str, Any]]
"""`rollout` config section -> the backend's constructor keyword arguments."""


def _hf_params(cfg: RolloutConfig) -> dict[str, Any]:
    return dict(
        dtype=cfg.dtype,
        seed=cfg.seed,
        max_batch_size=cfg.max_batch_size,
        num_threads=cfg.cpu_threads or None,
        record_routed_experts=cfg.record_routed_experts,
        recompute_kv_on_update=cfg.recompute_kv_on_update,
        **cfg.engine_kwargs,
    )


def _vllm_params(cfg: RolloutConfig) -> dict[str, Any]:
    extra = dict(cfg.engine_kwargs)
    extra.setdefault("max_num_seqs", cfg.max_batch_size)
    return dict(
        dtype=cfg.dtype,
        seed=cfg.seed,
        kv_cache_gb=cfg.kv_cache_gb,
        tensor_parallel_size=cfg.tensor_parallel_size,
        max_model_len=cfg.max_model_len or None,
        enable_prefix_caching=cfg.enable_prefix_caching,
        enforce_eager=cfg.enforce_eager,
        num_threads=cfg.cpu_threads or None,
        engine_kwargs=extra,
        record_routed_experts=cfg.record_routed_experts,
        recompute_kv_on_update=cfg.recompute_kv_on_update,
    )


def _sglang_params(cfg: RolloutConfig) -> dict[str, Any]:
    return dict(
        dtype=cfg.dtype,
        seed=cfg.seed,
        tensor_parallel_size=cfg.tensor_parallel_size,
        engine_kwargs=dict(cfg.engine_kwargs),
    )


def _kwargs_only(cfg: RolloutConfig) -> dict[str, Any]:
    return dict(cfg.engine_kwargs)


_PARAMS: dict[str, ParamsFromConfig] = {
    "hf": _hf_params,
    "vllm": _vllm_params,
    "sglang": _sglang_params,
}


def register_engine(
    kind: str,
    factory: Callable[..., RolloutEngine],
    params_from_config: ParamsFromConfig | None = None,
) -> None:
    """Add a backend: `factory(model_path, **params)` must return a `RolloutEngine`;
    `params_from_config(cfg)` builds `params` from the `rollout` section (default: only
    `cfg.engine_kwargs`)."""
    if kind in _BUILTINS or kind in _CUSTOM:
        raise ValueError(f"rollout engine {kind!r} is already registered")
    _CUSTOM[kind] = factory
    _PARAMS[kind] = params_from_config or _kwargs_only


def engine_kinds() -> list[str]:
    return sorted([*_BUILTINS, *_CUSTOM])


def engine_factory(kind: str) -> Callable[..., RolloutEngine]:
    if kind in _CUSTOM:
        return _CUSTOM[kind]
    if kind not in _BUILTINS:
        raise ValueError(f"rollout.engine={kind!r} is unknown; choose one of {engine_kinds()}")
    module, _, name = _BUILTINS[kind].partition(":")
    return getattr(importlib.import_module(module), name)


def create_engine(kind: str, model_path: str | Path, **params: Any) -> RolloutEngine:
    """Build a rollout engine by name (`hf`, `vllm`, `sglang` or a registered one).

    Must be called inside a running event loop's thread for the async backends' loops to attach
    (construction itself is synchronous and may take seconds).
    """
    return engine_factory(kind)(model_path, **params)


def engine_params_from_config(cfg: RolloutConfig) -> dict[str, Any]:
    """Constructor keyword arguments for `cfg.engine`, from the `rollout` config section
    (each backend's registered `params_from_config`)."""
    if cfg.engine not in _PARAMS:
        raise ValueError(
            f"rollout.engine={cfg.engine!r} is unknown; choose one of {engine_kinds()}"
        )
    return _PARAMS[cfg.engine](cfg)


def create_engine_from_config(cfg: RolloutConfig, model_path: str | Path) -> RolloutEngine:
    """`create_engine(cfg.engine, model_path, **engine_params_from_config(cfg))`."""
    return create_engine(cfg.engine, model_path, **engine_params_from_config(cfg))
