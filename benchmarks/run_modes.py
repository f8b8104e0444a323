"""Async vs sync on the demo run: steady-state throughput and where the time goes, side by side.

Runs `slime-rl train CONFIG` in sync and in async mode, alternating (sync, async, sync, async, ...) so
both see the same machine load, each for `--steps` steps without evaluation or checkpoints, and
reads every run's metrics.jsonl. Steady state = steps after the first `--warmup`.

    python benchmarks/run_modes.py configs/examples/arith_tiny.yaml --steps 40 --rounds 2

Prints a table (median samples/s per mode, the async/sync ratio per round, idle fractions, step
time split) and writes benchmarks/results/run_modes.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_once(config: str, mode: str, steps: int, out_dir: Path, extra: list[str]) -> list[dict]:
    name = f"bench-{mode}-{int(time.time())}"
    cmd = [
        sys.executable, "-m", "slime_rl.cli", "train", config, f"run.mode={mode}", f"run.num_steps={steps}",
        f"run.name={name}", f"run.output_dir={out_dir}", "eval.interval=0", "data.eval_path=null",
        "checkpoint.interval=0", "checkpoint.save_hf=false", "logging.save_samples=false",
        "logging.progress=false", "logging.wandb_mode=disabled", *extra,
    ]
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lines = [json.loads(x) for x in (out_dir / name / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if x.get("kind") != "eval"]


def summarise(lines: list[dict], warmup: int) -> dict[str, float]:
    steady = [x for x in lines if x["step"] > warmup]
    med = lambda key: statistics.median(x[key] for x in steady if x.get(key) is not None)  # noqa: E731
    wall = sum(x["step_time_s"] for x in steady)
    return {
        "steps": len(steady),
        "samples_per_s": sum(x["samples"] for x in steady) / wall,
        "step_time_s_median": med("step_time_s"),
        "train_step_s_median": med("train/step_seconds"),
        "trainer_idle_frac": med("trainer_idle_frac"),
        "rollout_idle_frac": med("rollout_idle_frac"),
        "weight_sync_s_median": med("weight_sync_s"),
        "staleness_mean": statistics.mean(x["staleness_mean"] for x in steady),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/run_modes.json")
    p.add_argument("overrides", nargs="*", help="extra key=value overrides for both modes")
    args = p.parse_args()
    out_dir = Path("/tmp/slime-rl-bench-runs")
    results: dict[str, list[dict]] = {"sync": [], "async": []}
    for r in range(args.rounds):
        for mode in ("sync", "async"):
            s = summarise(run_once(args.config, mode, args.steps, out_dir, args.overrides), args.warmup)
            results[mode].append(s)
            print(f"round {r + 1} {mode:5s}: {s['samples_per_s']:.1f} samples/s", flush=True)
    ratios = [a["samples_per_s"] / s["samples_per_s"] for s, a in zip(results["sync"], results["async"])]
    print()
    print(f"{'mode':6s} {'samples/s (median)':>19s} {'step s':>7s} {'train s':>8s} {'trainer idle':>13s} {'rollout idle':>13s} {'sync s':>7s} {'staleness':>10s}")
    for mode, rows in results.items():
        m = lambda k, rows=rows: statistics.median(x[k] for x in rows)  # noqa: E731
        print(f"{mode:6s} {m('samples_per_s'):19.1f} {m('step_time_s_median'):7.2f} {m('train_step_s_median'):8.2f} "
              f"{m('trainer_idle_frac'):13.2f} {m('rollout_idle_frac'):13.2f} {m('weight_sync_s_median'):7.3f} {m('staleness_mean'):10.2f}")
    print(f"\nasync / sync samples/s per round: {', '.join(f'{x:.2f}' for x in ratios)} (median {statistics.median(ratios):.2f})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"config": args.config, "steps": args.steps, "warmup": args.warmup,
                                          "overrides": args.overrides, "results": results, "ratios": ratios}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
