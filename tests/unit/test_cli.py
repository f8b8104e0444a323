"""The `slime-rl` console script as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.timeout(180)]

SUBCOMMANDS = ["train", "submit", "config", "make-tiny-model"]


def slime_rl(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("slime-rl")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, cwd=cwd, timeout=120,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


@pytest.fixture
def run_files(tmp_path: Path) -> list[str]:
    (tmp_path / "model").mkdir()
    (tmp_path / "train.jsonl").write_text('{"prompt": "1 + 1?", "label": "2"}\n')
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"model:\n  path: {tmp_path / 'model'}\ndata:\n  train_path: {tmp_path / 'train.jsonl'}\n"
        f"run:\n  output_dir: {tmp_path / 'runs'}\n  name: r1\n"
    )
    return [str(cfg)]


@pytest.mark.parametrize("sub", [None, *SUBCOMMANDS])
def test_help_on_every_subcommand(sub: str | None) -> None:
    out = slime_rl(*([sub] if sub else []), "--help")
    assert out.returncode == 0, out.stderr
    assert "usage: slime-rl" in out.stdout
    if sub is None:
        for name in SUBCOMMANDS:
            assert name in out.stdout


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("rollout.temperature=-1", "rollout.temperature=-1.0 is out of range"),
        ("buffer.max_staleness=-2", "buffer.max_staleness=-2 is out of range"),
        ("run.mode=fast", "run.mode='fast' is not allowed"),
        ("rollout.temprature=1", "did you mean rollout.temperature"),
        ("model.path=/no/such/dir", "model.path='/no/such/dir' does not exist"),
    ],
)
@pytest.mark.parametrize("sub", ["train", "submit", "config"])
def test_config_errors_are_one_line_exit_2(run_files: list[str], sub: str, override: str, needle: str) -> None:
    out = slime_rl(sub, *run_files, override)
    assert out.returncode == 2, (out.stdout, out.stderr)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, out.stderr
    assert needle in lines[0]
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(
    ("ref", "needle"),
    [
        ("no_such_dir/rew.py:score", "reward.fn='no_such_dir/rew.py:score'"),
        ("slime_rl.rewards.builtin:no_such_fn", "no_such_fn"),
        ("not_a_builtin", "not a built-in reward name"),
    ],
)
def test_bad_reward_reference_fails_at_start_up(run_files: list[str], tmp_path: Path, ref: str, needle: str) -> None:
    out = slime_rl("train", *run_files, f"reward.fn={ref}")
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert needle in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs" / "r1" / "config.yaml").exists()  # nothing started


def test_config_prints_resolved_yaml(run_files: list[str]) -> None:
    out = slime_rl("config", *run_files, "rollout.temperature=0.25")
    assert out.returncode == 0, out.stderr
    assert "temperature: 0.25" in out.stdout
    defaults = slime_rl("config", "--defaults")
    assert defaults.returncode == 0 and "# Sampling temperature" in defaults.stdout


class FakeDriver:
    """Stands in for the RL run: the CLI's own contract (config written, exit codes) is under test."""

    outcome: str = "done"
    seen: list = []

    def __init__(self, cfg) -> None:
        self.cfg = cfg

    def run(self) -> dict:
        from slime_rl.driver import RunError

        FakeDriver.seen.append((self.cfg.run_dir / "config.yaml").read_text())
        if FakeDriver.outcome == "fail":
            raise RunError("step 3: metrics on r1-rollout failed: the actor died (killed with ray.kill)\n  more detail")
        return {"table": "summary table", "interrupted": FakeDriver.outcome == "interrupted", "last_step": 2,
                "summary": None, "run_dir": str(self.cfg.run_dir)}


@pytest.fixture
def fake_driver(monkeypatch: pytest.MonkeyPatch):
    import slime_rl.driver

    monkeypatch.setattr(slime_rl.driver, "Driver", FakeDriver)
    FakeDriver.seen = []
    yield FakeDriver
    FakeDriver.outcome = "done"


@pytest.fixture
def real_run_files(tmp_path: Path, tiny_model_dir: Path) -> list[str]:
    """A config that passes every start-up check (the random tiny model, one usable prompt)."""
    (tmp_path / "train.jsonl").write_text('{"prompt": "1 + 1?", "label": "2"}\n')
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"model:\n  path: {tiny_model_dir}\ndata:\n  train_path: {tmp_path / 'train.jsonl'}\n"
        f"run:\n  output_dir: {tmp_path / 'runs'}\n  name: r1\n"
    )
    return [str(cfg)]


@pytest.mark.parametrize(("outcome", "code", "needle"), [
    ("done", 0, None),
    ("interrupted", 130, "slime-rl: stopped by Ctrl-C after step 2 (checkpoint written)"),
    ("fail", 1, "slime-rl: run failed: step 3: metrics on r1-rollout failed: the actor died (killed with ray.kill) more detail"),
])
def test_train_writes_the_config_then_exits_with_the_runs_outcome(
    real_run_files: list[str], tmp_path: Path, fake_driver, capsys: pytest.CaptureFixture[str],
    outcome: str, code: int, needle: str | None,
) -> None:
    from slime_rl.cli import main

    fake_driver.outcome = outcome
    assert main(["train", *real_run_files, "rollout.top_k=5"]) == code
    assert fake_driver.seen and "top_k: 5" in fake_driver.seen[0]  # written before the run starts
    err = capsys.readouterr().err
    if needle:
        assert any(line.startswith(needle) for line in err.splitlines())  # one line, whatever the message held
    assert "Traceback" not in err


def test_saved_config_redacts_reward_secrets(real_run_files: list[str], tmp_path: Path, fake_driver) -> None:
    from slime_rl.cli import main

    reward = tmp_path / "judge.py"
    reward.write_text("def score(sample, api_key=''):\n    return 1.0\n")
    assert main(["train", *real_run_files, f"reward.fn={reward}:score", "reward.kwargs.api_key=sk-secret-123"]) == 0
    written = (tmp_path / "runs" / "r1" / "config.yaml").read_text()
    assert "sk-secret-123" not in written
    assert "api_key" in written
