"""The Python entry point does what `slime-rl train` does: checks, config.yaml, the run, a typed result."""

from __future__ import annotations

from pathlib import Path

import pytest

import slime_rl


class FakeDriver:
    """Stands in for the RL run: the API's own contract is under test."""

    def __init__(self, cfg) -> None:
        self.cfg = cfg

    def run(self) -> dict:
        assert (self.cfg.run_dir / "config.yaml").exists(), "config.yaml is written before the run starts"
        return {"table": "t", "interrupted": False, "last_step": self.cfg.run.num_steps, "summary": None,
                "run_dir": str(self.cfg.run_dir)}


@pytest.fixture
def run_yaml(tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    import slime_rl.driver

    monkeypatch.setattr(slime_rl.driver, "Driver", FakeDriver)
    (tmp_path / "train.jsonl").write_text('{"prompt": "1 + 1?", "label": "2"}\n')
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model:\n  path: {tiny_model_dir}\ndata:\n  train_path: {tmp_path / 'train.jsonl'}\n"
                   f"run:\n  output_dir: {tmp_path / 'runs'}\n  name: api\n")
    return cfg


def test_train_applies_overrides_in_every_form_and_returns_a_run_result(run_yaml: Path) -> None:
    result = slime_rl.train(run_yaml, {"run.num_steps": 3}, trainer={"lr": 2e-5}, rollout={"stop": ["</answer>"]})
    assert isinstance(result, slime_rl.RunResult) and result.last_step == 3 and not result.interrupted
    saved = slime_rl.load_config(result.run_dir / "config.yaml")
    assert saved.trainer.lr == 2e-5 and saved.rollout.stop == ["</answer>"] and saved.run.num_steps == 3
    cfg = slime_rl.load_config(run_yaml, ["run.num_steps=2"])
    assert slime_rl.train(cfg, ["run.name=api2"]).run_dir.name == "api2"


def test_bad_input_raises_before_anything_runs(run_yaml: Path) -> None:
    with pytest.raises(slime_rl.ConfigError, match=r"trainer\.lrr"):
        slime_rl.train(run_yaml, {"trainer.lrr": 1e-5})
    with pytest.raises(slime_rl.ConfigError, match=r"run\.num_steps"):
        slime_rl.train(run_yaml, run={"num_steps": 0})
    assert not (run_yaml.parent / "runs").exists()
