"""Reward terms for episodes and hybrid (think / non-think) runs; use them in `reward.fn` or
`reward.combine` by reference (`slime_rl.rollout.agent_rewards:episode_reward`).

- `episode_reward`: the reward the episode produced itself: an environment's `final_reward`
  (agent loop) or what a `rollout.agent_fn` agent returned, kept in `metadata["episode_reward"]`,
  plus optionally the per-turn rewards.
- `overlong_penalty_by_mode`: DAPO's soft overlong punishment with a length budget per mode
  (think replies are allowed to be longer than direct answers); counts only model-generated
  tokens (`loss_mask` 1), so tool results in an episode do not count against it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from slime_rl.buffers.schema import Sample
from slime_rl.rewards.protocol import checked_by


def episode_reward(sample: Sample, *, missing: float | None = None, turn_reward_weight: float = 0.0) -> dict[str, Any]:
    """`metadata["episode_reward"]` (+ `turn_reward_weight` x the sum of `metadata["turn_rewards"]`).

    Raises:
        ValueError: the sample has no episode reward and `missing` is None (the runner then fails
            that sample: the environment or agent returned nothing to score).
    """
    meta = sample.metadata
    value = meta.get("episode_reward")
    if value is None:
        if missing is None:
            raise ValueError(
                f"sample {sample.sample_id} has no metadata['episode_reward'] (the environment's final_reward or the "
                "agent function returned None); set reward.kwargs.missing to score such samples"
            )
        value = missing
    turns = [float(x) for x in meta.get("turn_rewards", [])]
    score = float(value) + turn_reward_weight * sum(turns)
    out: dict[str, Any] = {"score": score}
    agent = meta.get("agent")
    if isinstance(agent, dict):
        out["turns"] = float(agent.get("turns", 0))
        out["tool_calls"] = float(agent.get("tool_calls", 0))
    return out


def _per_mode(value: int | Mapping[str, int], mode: str, name: str) -> int:
    if isinstance(value, Mapping):
        if mode not in value:
            raise ValueError(f"overlong_penalty_by_mode: {name} has no entry for mode {mode!r} (keys: {sorted(value)})")
        return int(value[mode])
    return int(value)


def check_overlong_penalty_by_mode(
    *, max_response_len: int | Mapping[str, int], overlong_buffer: int | Mapping[str, int], penalty_factor: float = 1.0
) -> None:
    """Start-up check: each mode's budget > 0 and buffer in (0, budget]; keys `think` / `non_think`."""
    for mode in ("think", "non_think"):
        for name, v in (("max_response_len", max_response_len), ("overlong_buffer", overlong_buffer)):
            if isinstance(v, Mapping) and set(v) - {"think", "non_think"}:
                raise ValueError(f"overlong_penalty_by_mode: {name} keys must be 'think' / 'non_think', got {sorted(v)}")
        if isinstance(max_response_len, Mapping) and mode not in max_response_len:
            continue
        top = _per_mode(max_response_len, mode, "max_response_len")
        buf = _per_mode(overlong_buffer, mode, "overlong_buffer")
        if top <= 0:
            raise ValueError(f"overlong_penalty_by_mode: max_response_len[{mode}]={top} must be > 0")
        if not 0 < buf <= top:
            raise ValueError(f"overlong_penalty_by_mode: overlong_buffer[{mode}]={buf} must be in (0, max_response_len={top}]")
    if penalty_factor < 0:
        raise ValueError(f"overlong_penalty_by_mode: penalty_factor={penalty_factor} must be >= 0 (it is subtracted)")


@checked_by(check_overlong_penalty_by_mode)
def overlong_penalty_by_mode(
    sample: Sample,
    *,
    max_response_len: int | Mapping[str, int],
    overlong_buffer: int | Mapping[str, int],
    penalty_factor: float = 1.0,
) -> dict[str, Any]:
    """DAPO's soft overlong penalty with per-mode settings (`{think: 512, non_think: 64}` or one int).

    0 up to `max_response_len - overlong_buffer` generated tokens, then linear down to
    `-penalty_factor` at `max_response_len`, `-penalty_factor` beyond.
    """
    n = sum(sample.loss_mask) if sample.loss_mask is not None else len(sample.response_ids)
    top = _per_mode(max_response_len, sample.mode, "max_response_len")
    buf = _per_mode(overlong_buffer, sample.mode, "overlong_buffer")
    start = top - buf
    if n <= start:
        score = 0.0
    elif n <= top:
        score = (start - n) / buf * penalty_factor
    else:
        score = -penalty_factor
    return {"score": score, "response_len": float(n)}
