"""Named errors of the replay buffer, so callers (also through Ray) can catch them by type.

Ray re-raises an actor's exception as an instance of the original class, so
``except BufferTimeoutError`` works around ``ray.get(actor.get_batch.remote(...))`` too.
"""

from __future__ import annotations


class BufferTimeoutError(TimeoutError):
    """`get_batch` waited its whole timeout without enough eligible groups."""


class BufferFullError(RuntimeError):
    """`put` found no room: rejected at once (`put_policy=reject`) or after `put_timeout_s`."""


class BufferClosedError(RuntimeError):
    """The buffer was closed (shutdown) while, or before, a caller used it."""
