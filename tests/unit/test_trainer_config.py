"""Cross-field checks of the trainer config section."""

from __future__ import annotations

import dataclasses
import logging

import pytest
from slime_rl.trainer import config
from slime_rl.trainer.config import TrainerConfig


def test_validate_refuses_bad_combinations():
    cfg = TrainerConfig(num_workers=2, global_batch_groups=3)
    cfg.batching.updates_per_batch = 2
    with pytest.raises(ValueError, match="global_batch_groups=3 is too small.*use at least 4"):
        cfg.validate()
    cfg = TrainerConfig()
    cfg.loss.eps_low = 1.0
    with pytest.raises(ValueError, match="loss.eps_low=1.0 must be < 1"):
        cfg.validate()


def test_validate_warns_on_ignored_setting(caplog):
    cfg = TrainerConfig()
    cfg.off_policy.proximal = "engine"
    with caplog.at_level(logging.WARNING):
        cfg.validate()
    assert "is_mode=truncate is ignored with proximal=engine" in caplog.text


def _choices(section, name: str) -> tuple[str, ...]:
    return next(f.metadata["choices"] for f in dataclasses.fields(section) if f.name == name)


def test_config_choices_match_the_registries():
    """config.py cannot import the heavy modules, so its choices tuples are kept in step here."""
    from slime_rl.buffers.schema import Status
    from slime_rl.trainer.advantages import ESTIMATORS
    from slime_rl.trainer.kl import KL_ESTIMATORS
    from slime_rl.trainer.losses import AGGREGATIONS, POLICY_LOSSES
    from slime_rl.trainer.objective import PROXIMAL
    from slime_rl.trainer.off_policy import IS_WEIGHTS
    from slime_rl.trainer.optim import SCHEDULES

    pairs = [
        (_choices(config.AdvantageConfig, "estimator"), ESTIMATORS),
        (_choices(config.LossConfig, "policy_loss"), POLICY_LOSSES),
        (_choices(config.LossConfig, "aggregation"), AGGREGATIONS),
        (_choices(config.KLConfig, "estimator"), KL_ESTIMATORS),
        (_choices(config.OffPolicyConfig, "proximal"), PROXIMAL),
        (_choices(config.OffPolicyConfig, "is_mode"), IS_WEIGHTS),
        (_choices(config.OptimConfig, "schedule"), SCHEDULES),
    ]
    for choices, registry in pairs:
        assert sorted(choices) == sorted(registry)
    assert sorted(config.SAMPLE_STATUSES) == sorted(s.value for s in Status)


def test_exclude_status_values_are_checked():
    cfg = TrainerConfig(exclude_status=["failed", "broken"])
    with pytest.raises(ValueError, match=r"exclude_status has unknown value\(s\) \['broken'\]; each must be one of"):
        cfg.validate()
    TrainerConfig(exclude_status=[]).validate()
    assert TrainerConfig().exclude_status == ["failed", "aborted"]


def test_k1_kl_as_loss_warns(caplog):
    cfg = TrainerConfig()
    cfg.kl.coef, cfg.kl.estimator, cfg.kl.mode = 0.1, "k1", "loss"
    with caplog.at_level(logging.WARNING):
        cfg.validate()
    assert "kl.estimator=k1 with kl.mode=loss has zero expected gradient" in caplog.text
    caplog.clear()
    cfg.kl.mode = "reward"
    with caplog.at_level(logging.WARNING):
        cfg.validate()
    assert "k1" not in caplog.text
