"""Built-in rewards by short name: ``reward.fn: math_answer`` instead of a full reference.

Each entry is a reference string, so nothing is imported until a run asks for it.
"""

from __future__ import annotations

BUILTINS: dict[str, str] = {
    "exact_match": "slime_rl.rewards.builtin.answers:exact_match",
    "normalized_match": "slime_rl.rewards.builtin.answers:normalized_match",
    "math_answer": "slime_rl.rewards.builtin.answers:math_answer",
    "think_format": "slime_rl.rewards.builtin.formats:think_format",
    "overlong_penalty": "slime_rl.rewards.builtin.formats:overlong_penalty",
    "code_execution": "slime_rl.rewards.builtin.code_exec:CodeExecution",
    "remote_reward_model": "slime_rl.rewards.builtin.remote:RemoteRewardModel",
    "llm_judge": "slime_rl.rewards.builtin.judge:LLMJudge",
    "episode_reward": "slime_rl.rollout.agent_rewards:episode_reward",
    "overlong_penalty_by_mode": "slime_rl.rollout.agent_rewards:overlong_penalty_by_mode",
}
"""Short name -> ``package.module:attribute`` of every built-in reward."""
