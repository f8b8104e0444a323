"""Helpers shared by the engine test modules (hf in tests/unit, vllm in tests/integration).

They drive an `EngineRunner` or an `ActorClient` (same synchronous surface) whose test
fixture tags it with `weights`: which reference model ("a" or "b") the engine holds now.
Importable as `engine_helpers`: pytest puts tests/ (the conftest's folder) on sys.path.
"""

from __future__ import annotations

from typing import Any

from slime_rl.rollout.engines import GenerateRequest, GenerateResult, SamplingParams


def set_weights(client: Any, models: dict[str, Any], which: str) -> None:
    """Load reference model `which` into the engine (a new version) unless it holds it."""
    if client.weights != which:
        client.update_weights(client.version() + 1, models[which].state_dict())
        client.weights = which


def gen(client: Any, prompt: list[int], tag: str = "g", **params: Any) -> GenerateResult:
    """Generate one request `tag` for `prompt` with `SamplingParams(**params)`."""
    return client.generate(GenerateRequest(tag, prompt, SamplingParams(**params)))
