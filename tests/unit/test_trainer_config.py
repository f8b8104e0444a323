"""Cross-field checks of the trainer config section."""

from __future__ import annotations

import logging

import pytest
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
