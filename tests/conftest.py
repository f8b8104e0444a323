"""Shared fixtures: one Ray cluster per test session, tiny models built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (gpu marker)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole session (2 CPUs, no dashboard)."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",  # never a cluster some other test (or the user) started on this machine
            num_cpus=int(os.environ.get("SLIME_RL_TEST_RAY_CPUS", "8")),
            include_dashboard=False,
            log_to_driver=False,
            ignore_reinit_error=True,
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained tiny Qwen2 model + the project tokenizer, in HF format (seconds to build)."""
    from slime_rl.tiny import random_tiny_model

    return random_tiny_model(tmp_path_factory.mktemp("tiny_a"), seed=0)


@pytest.fixture(scope="session")
def tiny_model_dir_b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second tiny model with the same architecture and tokenizer but other weights."""
    from slime_rl.tiny import random_tiny_model

    return random_tiny_model(tmp_path_factory.mktemp("tiny_b"), seed=1)
