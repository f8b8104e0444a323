"""Helpers of the run tests: data, configs, `slime-rl train` subprocesses, metrics lines, and the
group accounting every fault test checks (docs/run.md, "Checkpoint and resume"): over the whole
run, every dataset position the cursor handed out is either trained exactly once (in the final
`samples/step_*.parquet`) or still buffered / in flight in the final checkpoint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest
from slime_rl.rollout.cursor import DatasetCursor

REWARD = '''
def parity(sample, **kwargs):
    """Varies within a group."""
    return float(sum(sample.response_ids) % 2)
'''

SLIME_RL = str(Path(sys.executable).with_name("slime-rl"))


def _write_data(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"prompt": f"What is {i} + {i % 5}?", "label": str(i + i % 5)} for i in range(n)]
    (folder / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (folder / "eval.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:4]) + "\n")
    (folder / "reward.py").write_text(REWARD)
    return folder


def _base(tmp_path: Path, model_dir: Path, data: Path) -> list[str]:
    return [
        f"model.path={model_dir}", f"data.train_path={data / 'train.jsonl'}", f"reward.fn={data / 'reward.py'}:parity",
        f"run.output_dir={tmp_path / 'runs'}", "rollout.engine=hf", "rollout.n_samples_per_prompt=2",
        "rollout.max_new_tokens=8", "rollout.cpu_threads=1", "trainer.global_batch_groups=2", "trainer.lr=1e-2",
        "logging.progress=false", "logging.wandb_mode=disabled", "logging.save_samples=true", "checkpoint.save_hf=false",
        "rollout.filter=none",
    ]


def _config_file(tmp_path: Path, overrides: list[str]) -> str:
    """The overrides as a YAML file (what a user passes to `slime-rl train`)."""
    from omegaconf import OmegaConf

    path = tmp_path / "run.yaml"
    path.write_text(OmegaConf.to_yaml(OmegaConf.from_dotlist(overrides)))
    return str(path)


def _start(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`slime-rl train ...` in its own session, like a command in a terminal."""
    return subprocess.Popen([SLIME_RL, "train", *args], stdout=subprocess.DEVNULL, stderr=log.open("w"),
                            start_new_session=True, env=env or {**os.environ, "PYTHONWARNINGS": "ignore"})


def _train_lines(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line being written
            continue
    return [r for r in rows if r.get("kind") != "eval"]


def _latest_checkpoint(run_dir: Path) -> int:
    done = sorted((run_dir / "checkpoints").glob("step_*/run_state.json")) if (run_dir / "checkpoints").exists() else []
    return int(done[-1].parent.name.removeprefix("step_")) if done else 0


def _wait_for(pred, proc: subprocess.Popen, log: Path, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (rc {proc.returncode}) before it was interrupted:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for the run:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)


def _session_processes(sid: int) -> list[str]:
    """Live (not zombie) processes of session `sid`: what a killed driver left running."""
    out = []
    for line in subprocess.run(["ps", "-eo", "pid=,sid=,stat=,args="], capture_output=True, text=True).stdout.splitlines():
        pid, sess, stat, *args = line.split(None, 3)
        if int(sess) == sid and not stat.startswith("Z"):
            out.append(f"{pid} {' '.join(args)}")
    return out


def _assert_nothing_left(sid: int, within_s: float = 10.0) -> None:
    deadline = time.monotonic() + within_s
    while (left := _session_processes(sid)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"processes of the driver (session {sid}) still running after {within_s:.0f} s: {left}"


def _cursor_group_ids(train_path: Path, model_dir: Path, count: int, seed: int = 0) -> list[str]:
    """The first `count` group ids the rollout manager's cursor hands out (`<prompt uid>-e<epoch>`)."""
    from slime_rl.rollout.config import DataConfig
    from slime_rl.rollout.data import PromptDataset
    from transformers import AutoTokenizer

    ds = PromptDataset.load(str(train_path), DataConfig(train_path=str(train_path)), AutoTokenizer.from_pretrained(model_dir),
                            max_prompt_tokens=0, seed=seed, name="train")
    cursor = DatasetCursor(len(ds), seed=seed, shuffle=True)
    return [f"{ds[i].uid}-e{e}" for i, e in (cursor.next() for _ in range(count))]


def _group_accounting(run_dir: Path, n_samples: int, train_path: Path, model_dir: Path) -> dict[str, set[str]]:
    """Trained / buffered / in-flight group ids at the end of the run, checked against the cursor."""
    trained: Counter[str] = Counter()
    for path in sorted((run_dir / "samples").glob("step_*.parquet")):
        rows = Counter(pq.read_table(path, columns=["group_id"]).column("group_id").to_pylist())
        assert all(c == n_samples for c in rows.values()), f"{path.name}: a group with a wrong number of rows {rows}"
        trained.update(rows.keys())
    twice = sorted(g for g, c in trained.items() if c > 1)
    assert not twice, f"groups trained twice: {twice}"
    final = run_dir / "checkpoints" / f"step_{_latest_checkpoint(run_dir):06d}"
    state = json.loads((final / "run_state.json").read_text())["rollout"]
    with ipc.open_file(str(final / "buffer" / "buffer_groups.arrow")) as f:
        buffered = set(f.read_all().column("group_id").to_pylist())
    in_flight = {entry[0] for entry in state["admission"]["in_flight"]}
    handed = state["cursor"]["epoch"] * state["cursor"]["size"] + state["cursor"]["position"]
    expected = set(_cursor_group_ids(train_path, model_dir, handed))
    trained_ids = set(trained)
    assert not trained_ids & buffered and not trained_ids & in_flight, "a group both trained and still pending"
    skipped = expected - trained_ids - buffered - in_flight
    dropped = max((r.get("buffer/dropped_stale", 0.0) for r in _train_lines(run_dir)), default=0.0)
    assert not skipped, (f"groups the cursor handed out that were never trained nor are pending: {sorted(skipped)} "
                         f"(buffer/dropped_stale: {dropped:g})")
    assert trained_ids | buffered | in_flight <= expected, "groups from outside the cursor's order"
    return {"trained": trained_ids, "buffered": buffered, "in_flight": in_flight}
