"""Rollout engines: one async protocol, backends `hf`, `vllm`, `sglang` (see docs/engines.md)."""

from slime_rl.rollout.engines.base import (
    EngineHealth,
    FinishReason,
    GenerateRequest,
    GenerateResult,
    NamedTensors,
    PauseMode,
    RequestRejected,
    RolloutEngine,
    SamplingParams,
    as_named_tensors,
    error_result,
    sampling_from_config,
)
from slime_rl.rollout.engines.registry import (
    create_engine,
    create_engine_from_config,
    engine_kinds,
    engine_params_from_config,
    register_engine,
)

__all__ = [
    "EngineHealth",
    "FinishReason",
    "GenerateRequest",
    "GenerateResult",
    "NamedTensors",
    "PauseMode",
    "RequestRejected",
    "RolloutEngine",
    "SamplingParams",
    "as_named_tensors",
    "error_result",
    "create_engine",
    "create_engine_from_config",
    "engine_params_from_config",
    "engine_kinds",
    "register_engine",
    "sampling_from_config",
]
