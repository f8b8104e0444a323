"""Bad input at start-up: `slime-rl train` prints one line naming the key and exits with 2, in
seconds, before any actor starts (no Ray, no run directory)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from slime_rl.cli import main

pytestmark = [pytest.mark.timeout(180)]

FAST_S = 15.0
"""In-process start-up checks finish within this (generous for a busy 2-core machine)."""


@pytest.fixture
def project(tmp_path: Path, tiny_model_dir: Path) -> Path:
    """A folder with a config that passes every check: a copy of the tiny model, data, a reward."""
    shutil.copytree(tiny_model_dir, tmp_path / "model")
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"prompt": f"{i} + 1?", "label": str(i + 1)}) + "\n" for i in range(4)))
    (tmp_path / "reward.py").write_text("def score(sample, **kw):\n    return 1.0\n")
    (tmp_path / "run.yaml").write_text(
        f"model:\n  path: {tmp_path / 'model'}\ndata:\n  train_path: {tmp_path / 'train.jsonl'}\n"
        f"reward:\n  fn: {tmp_path / 'reward.py'}:score\nrun:\n  output_dir: {tmp_path / 'runs'}\n  name: r\n"
    )
    return tmp_path


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(project: Path, *overrides: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, float]:
    t0 = time.monotonic()
    code = main(["train", str(project / "run.yaml"), *overrides])
    took = time.monotonic() - t0
    return code, capsys.readouterr().err, took


def _drop(*names: str) -> Callable[[Path], None]:
    def edit(model: Path) -> None:
        for name in names:
            (model / name).unlink()
    return edit


def _set_json(name: str, **fields: object) -> Callable[[Path], None]:
    def edit(model: Path) -> None:
        data = json.loads((model / name).read_text())
        data.update(fields)
        for key, value in fields.items():
            if value is None:
                data.pop(key)
        (model / name).write_text(json.dumps(data))
    return edit


CASES = {
    "unreachable ray.address": (None, lambda p: [f"ray.address=127.0.0.1:{_closed_port()}"], "ray.address='127.0.0.1:"),
    "missing model folder": (None, lambda p: [f"model.path={p / 'nope'}"], "model.path="),
    "no weights": (_drop("model.safetensors"), lambda p: [], "has no weights"),
    "no tokenizer": (_drop("tokenizer.json", "tokenizer_config.json"), lambda p: [], "has no tokenizer files"),
    "no chat template": (_drop("chat_template.jinja"), lambda p: [], "has no chat template"),
    "model transformers cannot load": (
        _set_json("config.json", model_type="no_such_type", architectures=["NoSuchForCausalLM"]), lambda p: [],
        "model_type='no_such_type'",
    ),
    "sglang on CPU": (None, lambda p: ["rollout.engine=sglang"], "rollout.engine=sglang needs CUDA GPUs; on CPU use rollout.engine=vllm"),
    "missing dataset": (None, lambda p: [f"data.train_path={p / 'nope.jsonl'}"], "data.train_path="),
    "dataset without usable rows": (None, lambda p: ["data.train_path=" + str(_write(p / "bad.jsonl", '{"question": 1}'))],
                                    "data.train_path: dataset file"),
    "reward that does not import": (
        None, lambda p: [f"reward.fn={_write(p / 'broken.py', 'import no_such_module_xyz')}:score"],
        "ModuleNotFoundError: No module named 'no_such_module_xyz'",
    ),
    "unknown filter": (None, lambda p: ["rollout.filter=no_such_filter"], "rollout.filter='no_such_filter'"),
    "filter that does not import": (
        None, lambda p: ["rollout.filter=" + str(_write(p / "flt.py", 'raise RuntimeError("boom in filter")')) + ":keep"],
        "RuntimeError: boom in filter",
    ),
    "resume from a non-checkpoint": (None, lambda p: [f"checkpoint.resume={p}"], "checkpoint.resume="),
    "train_only without batches": (None, lambda p: [f"run.train_only={p}"], "run.train_only="),
}


def _write(path: Path, text: str) -> Path:
    path.write_text(text + "\n")
    return path


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_in_seconds(project: Path, case: str, capsys: pytest.CaptureFixture[str]) -> None:
    edit, overrides, needle = CASES[case]
    if edit is not None:
        edit(project / "model")
    code, err, took = _train(project, *overrides(project), capsys=capsys)
    lines = [x for x in err.splitlines() if x.strip()]
    assert code == 2, err
    assert len(lines) == 1, err
    assert needle in lines[0], lines[0]
    assert "Traceback" not in err
    assert took < FAST_S, f"{case}: {took:.1f} s"
    assert not (project / "runs").exists(), "nothing may start (not even the run directory) on bad input"


def test_the_good_project_passes_the_checks(project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The fixture is valid, so each case above fails only for its own reason."""
    from slime_rl.preflight import run_preflight

    monkeypatch.chdir(project)
    from slime_rl.config import load_config

    out = run_preflight(load_config(project / "run.yaml"))
    assert out["rows"] == {"train": 4} and out["architectures"] == ["Qwen2ForCausalLM"]


def test_vllm_engine_on_a_model_it_cannot_serve_names_hf(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """GPT-Neo: transformers (so the trainer and the hf engine) load it; vLLM has no implementation
    and its Transformers backend does not take that class."""
    pytest.importorskip("vllm")
    _set_json("config.json", model_type="gpt_neo", architectures=["GPTNeoForCausalLM"])(project / "model")
    code, err, took = _train(project, "rollout.engine=vllm", capsys=capsys)
    lines = [x for x in err.splitlines() if x.strip()]
    assert code == 2 and len(lines) == 1, err
    assert "rollout.engine=vllm cannot serve GPTNeoForCausalLM" in lines[0] and "rollout.engine=hf can" in lines[0]
    assert took < 30.0  # imports vLLM's model registry


def test_cli_subprocess_fails_fast_on_an_unreachable_cluster(project: Path) -> None:
    """The whole command, interpreter start-up and imports included, as a user runs it."""
    t0 = time.monotonic()
    out = subprocess.run(
        [str(Path(sys.executable).with_name("slime-rl")), "train", str(project / "run.yaml"),
         f"ray.address=127.0.0.1:{_closed_port()}"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    took = time.monotonic() - t0
    assert out.returncode == 2, out.stderr
    lines = [x for x in out.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("slime-rl: ray.address='127.0.0.1:") and "unreachable" in lines[0], out.stderr
    assert took < 45.0, f"{took:.1f} s"
