"""slime-rl: asynchronous RL post-training for LLMs.

    from slime_rl import load_config, train, RunError
    result = train("configs/examples/arith_tiny.yaml", {"run.num_steps": 50})

Names are imported on first use, so `import slime_rl` stays cheap (no Ray, no torch).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "load_config": "slime_rl.config",
    "Config": "slime_rl.config",
    "ConfigError": "slime_rl.config",
    "train": "slime_rl.api",
    "prepare": "slime_rl.api",
    "run": "slime_rl.api",
    "RunResult": "slime_rl.api",
    "scale": "slime_rl.api",
    "RunError": "slime_rl.errors",
    "PreflightError": "slime_rl.preflight",
}

__all__ = [
    "Config", "ConfigError", "PreflightError", "RunError", "RunResult", "__version__",
    "load_config", "prepare", "run", "scale", "train",
]  # fmt: skip

if TYPE_CHECKING:
    from slime_rl.api import RunResult, prepare, run, scale, train
    from slime_rl.config import Config, ConfigError, load_config
    from slime_rl.errors import RunError
    from slime_rl.preflight import PreflightError


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'slime_rl' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
