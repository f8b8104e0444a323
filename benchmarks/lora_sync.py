"""Weight-sync bytes and seconds of a LoRA run against full fine-tuning, on real short runs.

    for engine in --engines, for rank in (0, --rank):
        slime_rl.train(tiny model, async, --steps steps, rollout.engine=engine, trainer.lora.rank=rank)
        ─► metrics.jsonl ─► median weight_sync/bytes, weight_sync/seconds, train/logprob_mismatch_fresh
    table: bytes per sync, LoRA / full, seconds per sync, step time; JSON to benchmarks/results/lora_sync.json

Usage:
    python -m benchmarks.lora_sync                              # tiny model, hf and vllm, rank 8
    python -m benchmarks.lora_sync --model artifacts/tiny --engines vllm --steps 6
    python -m benchmarks.lora_sync --quick --json /tmp/lora_sync.json   # CI smoke: hf, 2 steps
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
from pathlib import Path
from typing import Any

REWARD = "def parity(sample, **kwargs):\n    return float(sum(sample.response_ids) % 2)\n"


def _run(out: Path, model: str, engine: str, rank: int, steps: int) -> dict[str, float]:
    from slime_rl.config import load_config
    from slime_rl.driver import Driver

    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    rows = [{"prompt": f"What is {i} + {i % 5}?", "label": str(i + i % 5)} for i in range(200)]
    (data / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (data / "reward.py").write_text(REWARD)
    name = f"{engine}-r{rank}"
    cfg = load_config(None, [
        f"model.path={model}", f"data.train_path={data / 'train.jsonl'}", f"reward.fn={data / 'reward.py'}:parity",
        f"run.output_dir={out}", f"run.name={name}", f"run.num_steps={steps}", "run.mode=async",
        f"rollout.engine={engine}", "rollout.n_samples_per_prompt=4", "rollout.max_new_tokens=8", "rollout.cpu_threads=1",
        "rollout.kv_cache_gb=0.125", "trainer.global_batch_groups=2", "trainer.lr=1e-3", f"trainer.lora.rank={rank}",
        "eval.interval=0", "logging.progress=false", "logging.wandb_mode=disabled", "checkpoint.save_hf=false",
    ])
    Driver(cfg).run()
    lines = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines()]
    lines = [r for r in lines if r.get("kind") != "eval" and r.get("weight_sync/bytes") == r.get("weight_sync/bytes")]

    def med(key: str) -> float:
        vals = [float(r[key]) for r in lines if r.get(key) is not None and r[key] == r[key]]
        return statistics.median(vals) if vals else float("nan")

    return {
        "bytes": med("weight_sync/bytes"), "seconds": med("weight_sync/seconds"), "step_s": med("step_time_s"),
        "adapter_only": med("weight_sync/lora_adapter_only"), "mismatch_fresh": med("train/logprob_mismatch_fresh"),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF model folder (default: a fresh random tiny model)")
    ap.add_argument("--engines", nargs="+", default=["hf", "vllm"])
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--json", "--out", default=None,
                    help="results JSON (default benchmarks/results/lora_sync.json; with --quick none)")
    ap.add_argument("--quick", action="store_true", help="smoke run: hf engine, 2 steps per rank")
    args = ap.parse_args(argv)
    if args.quick:
        args.engines, args.steps = ["hf"], 2
    elif args.json is None:
        args.json = "benchmarks/results/lora_sync.json"
    if args.rank < 1 or args.steps < 1:
        raise SystemExit("--rank and --steps must be at least 1")
    with tempfile.TemporaryDirectory(prefix="lora_sync_") as tmp:
        out = Path(tmp)
        model = args.model
        if model is None:
            from slime_rl.tiny import random_tiny_model

            model = str(random_tiny_model(out / "tiny", seed=0))
        results = {}
        for engine in args.engines:
            for rank in (0, args.rank):
                results[f"{engine}/r{rank}"] = _run(out, model, engine, rank, args.steps)
    print(f"{'engine':8s} {'rank':>4s} {'bytes/sync':>12s} {'vs full':>8s} {'sync s':>8s} {'step s':>7s} "
          f"{'adapter':>7s} {'|dlogp| fresh':>13s}")
    for engine in args.engines:
        full = results[f"{engine}/r0"]["bytes"]
        for rank in (0, args.rank):
            r = results[f"{engine}/r{rank}"]
            print(f"{engine:8s} {rank:4d} {r['bytes']:12.0f} {r['bytes'] / full:8.2%} {r['seconds']:8.3f} "
                  f"{r['step_s']:7.2f} {r['adapter_only']:7.0f} {r['mismatch_fresh']:13.2e}")
    report = {"model": args.model or "random tiny (slime_rl.tiny.random_tiny_model)", "rank": args.rank,
              "steps": args.steps, "machine": platform.platform(), "results": results}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
