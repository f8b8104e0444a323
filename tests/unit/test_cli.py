"""The `slime-rl` console script as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_train_writes_resolved_config_then_says_not_yet(run_files: list[str], tmp_path: Path) -> None:
    out = slime_rl("train", *run_files, "rollout.top_k=5")
    written = tmp_path / "runs" / "r1" / "config.yaml"
    assert written.is_file()
    assert "top_k: 5" in written.read_text()
    assert out.returncode == 1
    assert "not yet" in out.stderr and "Traceback" not in out.stderr


def test_saved_config_redacts_reward_secrets(run_files: list[str], tmp_path: Path) -> None:
    reward = tmp_path / "judge.py"
    reward.write_text("def score(sample, api_key=''):\n    return 1.0\n")
    out = slime_rl("train", *run_files, f"reward.fn={reward}:score", "reward.kwargs.api_key=sk-secret-123")
    assert "not yet" in out.stderr, out.stderr
    written = (tmp_path / "runs" / "r1" / "config.yaml").read_text()
    assert "sk-secret-123" not in written
    assert "api_key" in written
