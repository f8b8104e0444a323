"""`slime-rl submit` and the plain `ray job submit` against a Ray head started here.

The head is `ray start --head --block` in the background with its own ports, temp dir and auth
token (token authentication on, as `ray start` does by default; the token comes from
RAY_AUTH_TOKEN so ~/.ray/auth_token is not touched), and ending that one process stops it
(never `ray stop`, which would end every Ray process on the machine). A user project folder
holds the config, a reward file given by relative path, and things that must not be uploaded:
a model copy (weights), a virtual environment and old runs.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

BIN = Path(sys.executable).parent

REWARD = '''
def score(sample, **kwargs):
    """Varies within a group."""
    return float(sum(sample.response_ids) % 2)
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(token: str, *, auth_mode: bool = True) -> dict[str, str]:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}", "RAY_AUTH_TOKEN": token,
           "PYTHONWARNINGS": "ignore"}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_MODE", None)
    if auth_mode:
        env["RAY_AUTH_MODE"] = "token"
    return env


@pytest.fixture(scope="module")
def head() -> Iterator[dict[str, object]]:
    """A Ray head with the job server on 127.0.0.1; yields its dashboard URL, token and temp dir."""
    token = secrets.token_hex(16)
    temp = Path(tempfile.mkdtemp(prefix="slr", dir="/tmp"))  # short: Ray's socket paths live under it
    port, dash = _free_port(), _free_port()
    cmd = [
        str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", f"--dashboard-port={dash}",
        "--dashboard-host=127.0.0.1", f"--temp-dir={temp}", "--num-cpus=4", "--include-dashboard=true",
        f"--ray-client-server-port={_free_port()}", f"--dashboard-agent-listen-port={_free_port()}",
        "--disable-usage-stats",
    ]
    log = (temp / "head.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(token), start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    deadline = time.monotonic() + 180
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/version", timeout=2)
            break
        except urllib.error.HTTPError:  # 401 without the token: the server is up
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"ray head did not come up:\n{(temp / 'head.log').read_text()[-3000:]}")
            time.sleep(1)
    try:
        yield {"url": url, "token": token, "temp": temp}
    finally:
        proc.send_signal(signal.SIGTERM)  # `ray start --block` stops its cluster when it ends
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def project(tmp_path: Path, tiny_model_dir: Path) -> Path:
    """A user's project folder: config with relative paths, reward file, and what must stay home."""
    proj = tmp_path / "proj"
    proj.mkdir()
    shutil.copytree(tiny_model_dir, proj / "model")  # ~10 MB of weights in the working directory
    rows = [{"prompt": f"What is {i} + 1?", "label": str(i + 1)} for i in range(16)]
    (proj / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (proj / "my_reward.py").write_text(REWARD)
    (proj / ".venv" / "lib").mkdir(parents=True)
    (proj / ".venv" / "lib" / "big.py").write_bytes(b"#" * (4 << 20))
    (proj / "runs" / "old").mkdir(parents=True)
    (proj / "runs" / "old" / "state.bin").write_bytes(b"\0" * (4 << 20))
    (proj / ".gitignore").write_text(".venv/\nruns/\n*.safetensors\n")
    (proj / "run.yaml").write_text(
        "model:\n  path: model\ndata:\n  train_path: train.jsonl\nreward:\n  fn: my_reward.py:score\n"
        "run:\n  num_steps: 2\n  output_dir: runs\nrollout:\n  engine: hf\n  n_samples_per_prompt: 2\n"
        "  max_new_tokens: 8\n  cpu_threads: 1\ntrainer:\n  global_batch_groups: 2\n"
        "logging:\n  progress: false\n  wandb_mode: disabled\ncheckpoint:\n  save_hf: false\n"
    )
    return proj


def _packages(temp: Path) -> list[Path]:
    return sorted(p for p in temp.glob("session_*/runtime_resources/working_dir_files/_ray_pkg_*") if p.is_dir())


def _check_package(pkg: Path) -> None:
    files = [p.relative_to(pkg) for p in pkg.rglob("*") if p.is_file()]
    names = {str(p) for p in files}
    assert "my_reward.py" in names and "run.yaml" in names, names
    leaked = [n for n in names if n.startswith((".venv", "runs")) or n.endswith(".safetensors")]
    assert not leaked, f"uploaded what must stay home: {leaked}"
    size = sum((pkg / p).stat().st_size for p in files)
    assert size < 1 << 20, f"the upload holds {size / 1e6:.1f} MB"


def _steps(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x)["step"] for x in lines if '"kind"' not in x]


def test_slime_rl_submit_follow_runs_the_job_and_streams_its_logs(head: dict, project: Path) -> None:
    before = set(_packages(head["temp"]))
    out = subprocess.run(
        [str(BIN / "slime-rl"), "submit", "run.yaml", "run.name=sub", "--address", head["url"], "--follow"],
        cwd=project, capture_output=True, text=True, timeout=600,
        env=_env(head["token"], auth_mode=False),  # submit turns token mode on when a token is given
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "submitted job slime-rl-sub-" in out.stdout
    assert "slime-rl: run sub (async, 2 steps)" in out.stdout  # the job's own output, streamed
    assert out.stdout.rstrip().endswith("SUCCEEDED"), out.stdout[-2000:]
    assert _steps(project / "runs" / "sub") == [1, 2]  # run.output_dir was made absolute: it lands here
    new = [p for p in _packages(head["temp"]) if p not in before]
    assert new, "no working-dir package was unpacked on the cluster"
    for pkg in new:
        _check_package(pkg)


def test_plain_ray_job_submit_with_the_working_dir(head: dict, project: Path) -> None:
    """The documented plain way; the project's .gitignore keeps weights, venv and runs at home."""
    out_dir = project / "plain_runs"
    out = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", head["url"], "--working-dir", ".", "--",
         "slime-rl", "train", "run.yaml", "run.name=plain", f"model.path={project / 'model'}", f"run.output_dir={out_dir}"],
        cwd=project, capture_output=True, text=True, timeout=600, env=_env(head["token"]),
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "succeeded" in out.stdout.lower()
    assert _steps(out_dir / "plain") == [1, 2]
    for pkg in _packages(head["temp"]):
        _check_package(pkg)


def test_submissions_in_a_row_do_not_upload_earlier_runs(head: dict, tmp_path: Path, tiny_model_dir: Path) -> None:
    """A project folder without any .gitignore: the first run leaves checkpoints and samples in
    `runs/` (the default output_dir, inside the folder); the next submissions, both ways, must not
    upload them (the run writes runs/.gitignore, which Ray honours)."""
    proj = tmp_path / "bare"
    proj.mkdir()
    rows = [{"prompt": f"What is {i} + 1?", "label": str(i + 1)} for i in range(16)]
    (proj / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (proj / "my_reward.py").write_text(REWARD)
    (proj / "run.yaml").write_text(
        f"model:\n  path: {tiny_model_dir}\ndata:\n  train_path: train.jsonl\nreward:\n  fn: my_reward.py:score\n"
        "run:\n  num_steps: 2\nrollout:\n  engine: hf\n  n_samples_per_prompt: 2\n  max_new_tokens: 8\n  cpu_threads: 1\n"
        "trainer:\n  global_batch_groups: 2\nlogging:\n  progress: false\n  wandb_mode: disabled\n  save_samples: true\n"
    )
    for name in ("first", "second"):
        submit = [str(BIN / "slime-rl"), "submit", "run.yaml", f"run.name={name}", "--address", head["url"], "--follow"]
        out = subprocess.run(submit, cwd=proj, capture_output=True, text=True, timeout=600,
                             env=_env(head["token"], auth_mode=False))
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
        assert _steps(proj / "runs" / name) == [1, 2]
    assert (proj / "runs" / ".gitignore").read_text().strip().endswith("*")
    out = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", head["url"], "--working-dir", ".", "--",
         "slime-rl", "train", "run.yaml", "run.name=plain", f"run.output_dir={proj / 'runs'}"],
        cwd=proj, capture_output=True, text=True, timeout=600, env=_env(head["token"]),
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert _steps(proj / "runs" / "plain") == [1, 2]
    # Ray keys packages by content: an upload with runs/ in it would be a new package holding it.
    for pkg in _packages(head["temp"]):
        _check_package(pkg)
