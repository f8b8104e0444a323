"""slime_rl.rewards: the reward-function plug-in API, its loader and runner, and built-ins.

    from slime_rl.rewards import RewardRunner
    runner = RewardRunner.from_config(cfg.reward)     # loads + checks every term at start-up
    outcomes = await runner.score(group)              # per group, in the rollout manager
    metrics = runner.end_step().metrics()             # per step; raises if a term always failed
    RewardRunner.from_config(cfg.reward, faults=cfg.faults.reward)   # with injected reward faults

Nothing here imports Ray, rollout or trainer code.
"""

from slime_rl.rewards.config import (
    RewardComponentConfig,
    RewardConfig,
    RewardFaultsConfig,
    redacted,
)
from slime_rl.rewards.faults import InjectedRewardFault, RewardFaults
from slime_rl.rewards.loader import (
    RewardComponent,
    RewardLoadError,
    components_from_config,
    load_reward,
    resolve_config,
    resolve_reference,
)
from slime_rl.rewards.outcome import AllRewardsFailedError, RewardOutcome, RewardStepStats
from slime_rl.rewards.protocol import (
    BatchedRewardFn,
    RewardFn,
    RewardResult,
    batched,
    checked_by,
    is_batched,
    is_queued,
    queued,
    work_started,
)
from slime_rl.rewards.registry import BUILTINS
from slime_rl.rewards.runner import RewardRunner

__all__ = [
    "BUILTINS",
    "AllRewardsFailedError",
    "BatchedRewardFn",
    "InjectedRewardFault",
    "RewardComponent",
    "RewardComponentConfig",
    "RewardConfig",
    "RewardFaults",
    "RewardFaultsConfig",
    "RewardFn",
    "RewardLoadError",
    "RewardOutcome",
    "RewardResult",
    "RewardRunner",
    "RewardStepStats",
    "batched",
    "checked_by",
    "components_from_config",
    "is_batched",
    "is_queued",
    "queued",
    "redacted",
    "load_reward",
    "resolve_config",
    "resolve_reference",
    "work_started",
]
