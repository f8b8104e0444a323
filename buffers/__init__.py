"""slime_rl.buffers: the Arrow sample schema and the replay buffer between rollout and trainer.

Imports nothing else of slime-rl (see ARCHITECTURE.md). The Ray actor wrapper
(``BufferActor``, ``create_buffer_actor``) is imported lazily so that ``rewards`` can use the
``Sample`` view without importing Ray.
"""

from typing import Any

from slime_rl.buffers.config import BufferConfig
from slime_rl.buffers.errors import BufferClosedError, BufferFullError, BufferTimeoutError
from slime_rl.buffers.groups import group_staleness, token_staleness
from slime_rl.buffers.replay_buffer import ReplayBuffer
from slime_rl.buffers.schema import (
    PER_TOKEN_COLUMNS,
    SAMPLE_SCHEMA,
    SCHEMA_VERSION,
    Mode,
    Sample,
    Status,
    batch_to_samples,
    samples_to_batch,
)
from slime_rl.buffers.stats import BufferCounts
from slime_rl.buffers.validation import validate_batch

_LAZY = {"BufferActor", "RemoteBufferActor", "create_buffer_actor"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from slime_rl.buffers import actor

        return getattr(actor, name)
    raise AttributeError(f"module 'slime_rl.buffers' has no attribute {name!r}")


__all__ = [
    "PER_TOKEN_COLUMNS",
    "SAMPLE_SCHEMA",
    "SCHEMA_VERSION",
    "BufferActor",
    "BufferClosedError",
    "BufferConfig",
    "BufferCounts",
    "BufferFullError",
    "BufferTimeoutError",
    "Mode",
    "RemoteBufferActor",
    "ReplayBuffer",
    "Sample",
    "Status",
    "batch_to_samples",
    "create_buffer_actor",
    "group_staleness",
    "samples_to_batch",
    "token_staleness",
    "validate_batch",
]
