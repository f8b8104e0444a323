"""Run benchmarks by name: `python -m benchmarks all --quick` (CI smoke test) or one by name.

    python -m benchmarks all --quick        every benchmark module's `--quick` mode, each in its
                                            own process, JSON into a temporary folder (or --out
                                            DIR); fails when one fails or writes no JSON. A module
                                            without `--quick` is listed as skipped (and fails
                                            tests/integration/test_benchmarks_smoke.py, part of
                                            `make test-slow`).
    python -m benchmarks weight_sync [args] one module with its own arguments

The contract for a module `benchmarks/<name>.py`: accept `--quick` (seconds, tiny inputs) and
`--json PATH` (where to write its results). The smoke run asserts that it runs and writes its
JSON, never a speed.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def modules() -> list[str]:
    """Benchmark modules in this folder, by name."""
    return sorted(p.stem for p in HERE.glob("*.py") if not p.stem.startswith("_"))


def has_quick(name: str) -> bool:
    return '"--quick"' in (HERE / f"{name}.py").read_text()


def run_all_quick(out_dir: Path) -> int:
    out_dir.mkdir(parents=True, exist_ok=True)
    failed, rows = [], []
    for name in modules():
        if not has_quick(name):
            rows.append((name, "skipped (no --quick mode)", 0.0))
            continue
        json_path = out_dir / f"{name}.json"
        t0 = time.monotonic()
        rc = subprocess.call([sys.executable, "-m", f"benchmarks.{name}", "--quick", "--json", str(json_path)],
                             cwd=HERE.parent)
        seconds = time.monotonic() - t0
        ok = rc == 0 and json_path.exists() and json_path.stat().st_size > 0
        rows.append((name, "ok" if ok else f"FAILED (exit {rc}, json {'written' if json_path.exists() else 'missing'})",
                     seconds))
        if not ok:
            failed.append(name)
    print(f"\n{'benchmark':<16}{'result':<50}{'seconds':>8}")
    for name, result, seconds in rows:
        print(f"{name:<16}{result:<50}{seconds:>8.1f}")
    print(f"JSON in {out_dir}")
    return 1 if failed else 0


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        print("benchmarks:", ", ".join(modules()))
        return 0
    name, rest = argv[0], argv[1:]
    if name == "all":
        if "--quick" not in rest:
            print("python -m benchmarks all needs --quick (the full runs take long: run them one by one)")
            return 2
        out = rest[rest.index("--out") + 1] if "--out" in rest else tempfile.mkdtemp(prefix="slime-rl-bench-")
        return run_all_quick(Path(out))
    if name not in modules():
        print(f"unknown benchmark {name!r}; choose one of {', '.join(modules())} or all")
        return 2
    return subprocess.call([sys.executable, "-m", f"benchmarks.{name}", *rest], cwd=HERE.parent)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
