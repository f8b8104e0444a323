"""How a run fails: the error every part raises and the one-line account of a Ray failure.

Kept apart so that the driver, the actors' owner (`run_actors`), the checkpoints and the Python
API can all raise and describe failures without importing each other.
"""

from __future__ import annotations

CALL_TIMEOUT_S = 30.0
"""Limit of the driver's control calls to the rollout manager and the buffer (status, metrics,
clean shutdown); a call that takes longer means the actor is stuck."""


class RunError(RuntimeError):
    """The run stopped; the message names the actor, the step and the cause."""


def describe_error(e: BaseException) -> str:
    """One line for a Ray failure: the cause of a task error, the gist of a dead actor; no
    traceback, no terminal colour codes."""
    from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

    if isinstance(e, RayTaskError) and getattr(e, "cause", None) is not None:
        e = e.cause
    if isinstance(e, RayActorError):
        text = str(e)
        if "ray.kill" in text:
            return "the actor died (killed with ray.kill)"
        return "the actor died: " + " ".join(_strip_ansi(text).split())[:300]
    if isinstance(e, GetTimeoutError):
        return f"no answer within the call's timeout ({e})"
    first = (_strip_ansi(str(e)).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _strip_ansi(text: str) -> str:
    import re

    return re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text)
