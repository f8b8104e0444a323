"""examples/minimal_loop.py: the whole async loop in one file runs, stays within the staleness
bound, and leaves the engine serving the trainer's latest weights."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "minimal_loop.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("minimal_loop", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(300)
def test_minimal_loop_trains_async_within_the_staleness_bound(tmp_path: Path, tiny_model_dir: Path) -> None:
    rows = [{"prompt": f"What is {i} + {i % 7}?", "label": str(i + i % 7)} for i in range(30)]
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    loop = _load_example()
    result = asyncio.run(loop.run(str(tiny_model_dir), str(train), steps=4, groups=2, group_size=4,
                                  max_staleness=1, max_new_tokens=8))
    assert result.steps == 4 and len(result.rewards) == 4
    assert 0 <= result.staleness_max <= 1
    assert result.engine_version == 4  # the engine holds the last version the trainer published
