"""Config section ``buffer`` (composed into the root config by slime_rl.config).

Field metadata declares the allowed values (``ge``/``gt``/``le``/``choices``); the root
loader checks them and names the full key path on error.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class BufferConfig:
    capacity_groups: int = field(default=1024, metadata={"ge": 1})
    """Most groups held at once; beyond it `put` blocks or rejects (see `put_policy`)."""
    max_staleness: int = field(default=1, metadata={"ge": 0})
    """Largest `trainer_version - policy_version` a group may have when trained on."""
    stale_policy: str = field(default="drop", metadata={"choices": ("drop", "keep")})
    """Groups beyond `max_staleness`: `drop` them (counted) or `keep` them for off-policy use."""
    order: str = field(default="fifo", metadata={"choices": ("fifo", "freshest")})
    """Which eligible groups `get_batch` returns first."""
    put_policy: str = field(default="block", metadata={"choices": ("block", "reject")})
    """When full: `block` the writer (backpressure, up to `put_timeout_s`) or `reject` at once."""
    put_timeout_s: float = field(default=600.0, metadata={"gt": 0})
    """How long a blocked `put` waits for room before raising."""
    spill_dir: str | None = None
    """Write-ahead log folder: every accepted group is on disk before `put` returns. None = memory only."""
