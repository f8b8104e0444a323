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
    order: str = field(default="oldest", metadata={"choices": ("oldest", "fifo", "freshest")})
    """Which eligible groups `get_batch` returns first: `oldest` policy version first (arrival
    order among equals; with the trainer's wait for groups that are due, no group outlives the
    staleness bound), `fifo` (arrival), `freshest` (newest version first)."""
    put_policy: str = field(default="block", metadata={"choices": ("block", "reject")})
    """When full: `block` the writer (backpressure, up to `put_timeout_s`) or `reject` at once."""
    put_timeout_s: float = field(default=600.0, metadata={"gt": 0})
    """How long a blocked `put` waits for room before raising."""
    get_timeout_s: float = field(default=600.0, metadata={"gt": 0})
    """How long `get_batch` waits for enough eligible groups before raising `BufferTimeoutError`."""
    spill_dir: str | None = None
    """Write-ahead log folder: every accepted group is on disk before `put` returns. None = memory only."""
    fsync: bool = False
    """Also fsync the log on every put/get (survives power loss, slower); without it a killed process loses nothing."""
    compact_min_mb: float = field(default=64.0, metadata={"ge": 0})
    """Compact the log once it exceeds this size (MiB) and at least half of its groups have left."""
    keep_history: bool = True
    """Keep consumed/dropped groups (in `spill_dir/history`, or in memory without a spill_dir) so `export` writes every sample seen (up to `history_max_mb`). A `slime-rl train` run without a spill_dir keeps none (nothing there exports it; `samples/` holds what was trained)."""
    history_max_mb: float = field(default=1024.0, metadata={"ge": 0})
    """Most history kept (MiB of Arrow data, on disk or in memory); beyond it the oldest is deleted, so `export` covers the newest part of the run."""
