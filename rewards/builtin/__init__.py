"""Built-in rewards (short names in :data:`slime_rl.rewards.registry.BUILTINS`).

Importing this package is cheap: HTTP clients import aiohttp when first used, math-verify is
imported only when installed and asked for.
"""

from slime_rl.rewards.builtin.answers import exact_match, math_answer, normalized_match
from slime_rl.rewards.builtin.code_exec import CodeExecution
from slime_rl.rewards.builtin.formats import overlong_penalty, think_format
from slime_rl.rewards.builtin.judge import LLMJudge
from slime_rl.rewards.builtin.remote import RemoteRewardModel

code_execution = CodeExecution
remote_reward_model = RemoteRewardModel
llm_judge = LLMJudge

__all__ = [
    "CodeExecution",
    "LLMJudge",
    "RemoteRewardModel",
    "code_execution",
    "exact_match",
    "llm_judge",
    "math_answer",
    "normalized_match",
    "overlong_penalty",
    "remote_reward_model",
    "think_format",
]
