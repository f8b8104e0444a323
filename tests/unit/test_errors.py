"""Failures read as one line naming the actor and the cause: no Ray traceback, no colour codes."""

from __future__ import annotations

from ray.exceptions import RayTaskError

from slime_rl.errors import describe_error


def test_a_task_error_becomes_its_cause_in_one_line() -> None:
    cause = TimeoutError("rt-engine-0: weight update to version 7 took longer than 300 s (rollout.weight_update_timeout_s)")
    err = RayTaskError("update_weights", "Traceback (most recent call last):\n  \x1b[36mFile x\x1b[0m\n...", cause)
    assert describe_error(err) == f"TimeoutError: {cause}"


def test_colour_codes_and_extra_lines_are_dropped() -> None:
    err = RuntimeError("\x1b[31mrt-engine-1\x1b[39m: asked for weight version 3, the engine reports 2\n  at line 12\n")
    assert describe_error(err) == "RuntimeError: rt-engine-1: asked for weight version 3, the engine reports 2"
