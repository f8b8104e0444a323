"""Format rewards: a well-formed reasoning block per mode, and DAPO's soft overlong penalty.

Both are meant to be combined with a correctness reward through ``reward.combine``.
"""

from __future__ import annotations

from typing import Any

from slime_rl.buffers.schema import Mode, Sample
from slime_rl.rewards.builtin.text import THINK_CLOSE, THINK_OPEN
from slime_rl.rewards.protocol import checked_by


def _think_problem(sample: Sample, allow_empty_block: bool) -> str | None:
    """Why the response's reasoning block is malformed for its mode, or None if it is fine."""
    text = sample.response
    n_open, n_close = text.count(THINK_OPEN), text.count(THINK_CLOSE)
    if sample.mode == Mode.THINK.value:
        body = text.lstrip()
        # Chat templates may open the block in the prompt (Qwen3's enable_thinking does); then
        # the block is already open and a <think> in the response nests a second one: malformed.
        if not sample.prompt.rstrip().endswith(THINK_OPEN):
            if not body.startswith(THINK_OPEN):
                return "think mode: the response does not start with <think>"
            body = body[len(THINK_OPEN) :]
            n_open -= 1
        if n_open or n_close != 1:
            return "think mode: expected exactly one <think>...</think> block"
        reasoning, answer = body.split(THINK_CLOSE, 1)
        if not reasoning.strip():
            return "think mode: the reasoning block is empty"
        if not answer.strip():
            return "think mode: nothing after </think>"
        return None
    if n_open == 0 and n_close == 0:
        return None
    if allow_empty_block and n_open == 1 and n_close == 1:
        head, _, rest = text.lstrip().partition(THINK_OPEN)
        inner, _, _ = rest.partition(THINK_CLOSE)
        if not head and not inner.strip():
            return None
    return "non-think mode: the response contains a reasoning block"


def think_format(
    sample: Sample, *, reward: float = 1.0, penalty: float = 0.0, allow_empty_block: bool = True
) -> dict[str, Any]:
    """``reward`` for a well-formed response for the sample's mode, else ``penalty``.

    Think mode: one ``<think>...</think>`` block (opened in the response, or at the end of the
    prompt, not both), non-empty reasoning, then a non-empty answer. Non-think mode: no reasoning block
    (an empty ``<think></think>`` at the start is allowed with ``allow_empty_block``).
    The reason for a penalty is kept in the sample's ``reward_info``.
    """
    problem = _think_problem(sample, allow_empty_block)
    if problem is None:
        return {"score": reward}
    return {"score": penalty, "format_error": problem}


def check_overlong_penalty(*, max_response_len: int, overlong_buffer: int, penalty_factor: float = 1.0) -> None:
    """Start-up check of :func:`overlong_penalty`'s settings (the loader runs it once)."""
    if max_response_len <= 0:
        raise ValueError(f"overlong_penalty: max_response_len={max_response_len} must be > 0")
    if overlong_buffer <= 0 or overlong_buffer > max_response_len:
        raise ValueError(
            f"overlong_penalty: overlong_buffer={overlong_buffer} must be in (0, max_response_len={max_response_len}]"
        )
    if penalty_factor < 0:
        raise ValueError(f"overlong_penalty: penalty_factor={penalty_factor} must be >= 0 (it is subtracted)")


@checked_by(check_overlong_penalty)
def overlong_penalty(
    sample: Sample, *, max_response_len: int, overlong_buffer: int, penalty_factor: float = 1.0
) -> dict[str, Any]:
    """DAPO's soft overlong punishment on the response length in tokens.

    0 up to ``max_response_len - overlong_buffer`` tokens, then a linear ramp down to
    ``-penalty_factor`` at ``max_response_len``, and ``-penalty_factor`` beyond. The settings
    are checked once at load time (:func:`check_overlong_penalty`), not per sample.
    """
    n = len(sample.response_ids)
    start = max_response_len - overlong_buffer
    if n <= start:
        score = 0.0
    elif n <= max_response_len:
        score = (start - n) / overlong_buffer * penalty_factor
    else:
        score = -penalty_factor
    return {"score": score, "response_len": float(n)}
