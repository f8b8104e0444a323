"""`python -m benchmarks all --quick`: every benchmark module runs its smoke mode and writes JSON.

It asserts that each one runs and writes JSON that parses, never a speed. The benchmarks start
their own Ray clusters (and `slime-rl train` runs); RAY_ADDRESS=local keeps each on a private one,
never a cluster this test session or someone else on the machine started.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(960)]

ROOT = Path(__file__).resolve().parents[2]


def test_every_benchmark_runs_quick_and_writes_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks.__main__ import modules

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    env["RAY_ADDRESS"] = "local"
    log = tmp_path / "smoke.log"
    with log.open("w") as f:
        rc = subprocess.run([sys.executable, "-m", "benchmarks", "all", "--quick", "--out", str(tmp_path)],
                            cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=900).returncode
    tail = log.read_text()[-4000:]  # ends with the summary table
    assert rc == 0, tail
    assert modules(), "no benchmark modules found"
    for name in modules():
        path = tmp_path / f"{name}.json"
        assert path.exists() and path.stat().st_size > 0, f"{name} wrote no JSON\n{tail}"
        with path.open() as f:
            assert json.load(f), f"{name}: empty JSON"
