"""The rollout side's part of fault injection (`faults:` in the run config; slime_rl/faults.py has
the rest): train rows made unparsable at load, and weight loads held back."""

from __future__ import annotations

from pathlib import Path


def corrupt_jsonl(path: str, rows: list[int], out_dir: str) -> str:
    """A copy of the JSONL `path` with the given 0-based lines replaced by unparsable text
    (`faults.corrupt_rows`); the copy is what the rollout side then loads.

    Raises:
        ValueError: `path` is not a JSONL file.
    """
    src = Path(path)
    if src.suffix not in (".jsonl", ".json"):
        raise ValueError(f"faults.corrupt_rows needs a JSONL data.train_path, got {path}")
    lines = src.read_text(encoding="utf-8").splitlines()
    bad = set(rows)
    out = Path(out_dir) / f"corrupted-{src.name}"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join('{"prompt": "corrupted by faults.corrupt_rows' if i in bad else line
                             for i, line in enumerate(lines)) + "\n", encoding="utf-8")
    return str(out)
