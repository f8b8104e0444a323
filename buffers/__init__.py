"""slime_rl.buffers: the Arrow sample schema and the replay buffer between rollout and trainer.

Imports nothing else of slime-rl (see ARCHITECTURE.md).
"""

from slime_rl.buffers.schema import (
    PER_TOKEN_COLUMNS,
    SAMPLE_SCHEMA,
    SCHEMA_VERSION,
    Mode,
    Sample,
    Status,
    batch_to_samples,
    samples_to_batch,
    validate_batch,
)

__all__ = [
    "PER_TOKEN_COLUMNS",
    "SAMPLE_SCHEMA",
    "SCHEMA_VERSION",
    "Mode",
    "Sample",
    "Status",
    "batch_to_samples",
    "samples_to_batch",
    "validate_batch",
]
