"""Benchmarks: each module prints a table and writes JSON under benchmarks/results/ (see docs/BENCHMARKS.md)."""

from __future__ import annotations

import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def json_path(given: str | Path | None, name: str, quick: bool) -> Path:
    """Where a benchmark writes its JSON: `given` (its `--json`), else `benchmarks/results/<name>`
    for a full run, else a fresh temporary folder: a `--quick` smoke run never overwrites the
    recorded results."""
    if given:
        return Path(given)
    return Path(tempfile.mkdtemp(prefix="slime-rl-bench-")) / name if quick else RESULTS / name
