"""The trainer step alone: seconds per step of `TrainerCore.train_step` under each batching and
precision setting, on batches shaped like the demo's and the long-tail config's, against a
one-core matmul.

    for shape in --shapes (demo | longtail):      synthetic groups, lengths drawn like the real runs'
        for variant in --variants:                 TrainerConfig overrides (below)
            TrainerCore(model) ─► behaviour log-probs = its own (on-policy batch)
            ─► --warmup steps, then --steps timed steps ─► median s/step, forward / backward /
               optimizer split (perf/train_<phase>_s), input positions, GFLOP/s
    ─► table + JSON (each variant's median and its ratio to `fp32`)

Variants (trainer.* settings; `fp32` is the default configuration on CPU):
    fp32        batching.precision=fp32, share_prompt auto (on for CPU), padded rows, 1 thread
    bf16        batching.precision=bf16 (CPU autocast: oneDNN bf16 kernels, AMX where the CPU has it)
    no-share    batching.share_prompt=false (one padded row per sample)
    pack        batching.pack=true (one sequence per micro-batch)
    threads2    num_threads=2

Shapes (groups x samples, prompt and response tokens): `demo` 8 x 8, prompts 14-22, responses
5-25 (the demo's think / non-think mix); `longtail` 8 x 8, a quarter of the groups chain problems
with 280-570-token responses, the rest 7-12 tokens (configs/examples/longtail_tiny.yaml). Token
ids are random: the cost of a step does not depend on them.

    python -m benchmarks.train_step                                  # artifacts/tiny, both shapes, all variants
    python -m benchmarks.train_step --quick --json /tmp/train_step.json   # CI smoke: random model, 2 steps
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import json_path
from benchmarks.e2e import matmul_gflops

ROOT = Path(__file__).resolve().parents[1]
VARIANTS: dict[str, dict[str, Any]] = {
    "fp32": {"batching": {"precision": "fp32"}},
    "bf16": {"batching": {"precision": "bf16"}},
    "no-share": {"batching": {"precision": "fp32", "share_prompt": False}},
    "pack": {"batching": {"precision": "fp32", "pack": True}},
    "threads2": {"batching": {"precision": "fp32"}, "num_threads": 2},
}
SHAPES: dict[str, dict[str, Any]] = {
    "demo": {"groups": 8, "group_size": 8, "prompt": (14, 22), "short": (5, 25), "long": None, "long_frac": 0.0},
    "longtail": {"groups": 8, "group_size": 8, "prompt": (14, 30), "short": (7, 12), "long": (280, 570), "long_frac": 0.25},
}


def batch(shape: str, vocab_size: int, seed: int = 0):
    """A pa.Table of SAMPLE_SCHEMA shaped like `shape` (rewards alternate within a group)."""
    import pyarrow as pa
    from slime_rl.buffers.schema import Sample, samples_to_batch

    s, rng = SHAPES[shape], random.Random(seed)
    n_long = round(s["groups"] * s["long_frac"])
    samples = []
    for g in range(s["groups"]):
        prompt = [rng.randrange(3, vocab_size) for _ in range(rng.randint(*s["prompt"]))]
        lo, hi = s["long"] if g < n_long else s["short"]
        for k in range(s["group_size"]):
            n = rng.randint(lo, hi)
            samples.append(Sample(sample_id=f"g{g}-{k}", group_id=f"g{g}", prompt_ids=list(prompt),
                                  response_ids=[rng.randrange(3, vocab_size) for _ in range(n)],
                                  response_logprobs=[-3.0] * n, reward=float(k % 2 == 0), policy_version=0))
    return pa.Table.from_batches([samples_to_batch(samples)])


def measure(model: Path, shape: str, variant: str, steps: int, warmup: int) -> dict[str, Any]:
    """Median seconds of `steps` train steps (after `warmup`) of one variant on one shape."""
    from omegaconf import OmegaConf
    from slime_rl.trainer.config import TrainerConfig
    from slime_rl.trainer.core import TrainerCore
    from slime_rl.trainer.testing import on_policy

    base = OmegaConf.structured(TrainerConfig(global_batch_groups=SHAPES[shape]["groups"], lr=5e-5))
    cfg = OmegaConf.to_object(OmegaConf.merge(base, VARIANTS[variant]))
    core = TrainerCore(cfg, model)
    table = on_policy(core, batch(shape, core.policy.config.vocab_size))
    params = sum(p.numel() for p in core.policy.parameters())
    rows: list[dict[str, float]] = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        m = core.train_step(table)
        m["wall_s"] = time.perf_counter() - t0
        if i >= warmup:
            rows.append(m)

    def med(key: str) -> float:
        return statistics.median(r.get(key, float("nan")) for r in rows)

    step_s, positions = med("wall_s"), med("perf/train_positions")
    return {
        "shape": shape, "variant": variant, "step_s": step_s, "step_s_all": [r["wall_s"] for r in rows],
        "forward_s": med("perf/train_forward_s"), "backward_s": med("perf/train_backward_s"),
        "optimizer_s": med("perf/train_optimizer_s"), "prepare_s": med("perf/train_prepare_s"),
        "tokens": med("train/tokens"), "positions": positions, "params": params,
        "gflops": 6 * params * positions / step_s / 1e9, "loss_tokens": med("train/loss_tokens"),
    }


def report(results: list[dict[str, Any]], mm: float) -> str:
    lines = [f"{'shape':<10}{'variant':<10}{'s/step':>8}{'x fp32':>8}{'fwd s':>7}{'bwd s':>7}{'opt s':>7}"
             f"{'tokens':>8}{'positions':>10}{'GFLOP/s':>9}{'% mm':>6}"]
    base = {r["shape"]: r["step_s"] for r in results if r["variant"] == "fp32"}
    for r in results:
        ratio = base.get(r["shape"], float("nan")) / r["step_s"]
        lines.append(f"{r['shape']:<10}{r['variant']:<10}{r['step_s']:>8.3f}{ratio:>8.2f}{r['forward_s']:>7.3f}"
                     f"{r['backward_s']:>7.3f}{r['optimizer_s']:>7.3f}{r['tokens']:>8.0f}{r['positions']:>10.0f}"
                     f"{r['gflops']:>9.1f}{100 * r['gflops'] / mm:>6.0f}")
    lines.append(f"x fp32: the fp32 step / this step (>1 = faster); % mm: of a one-core fp32 matmul ({mm:.0f} GFLOP/s); "
                 "GFLOP = 6 x parameters x input positions")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="artifacts/tiny", help="an HF model folder (default: the demo's tiny model)")
    p.add_argument("--shapes", default="demo,longtail")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", default=None, help="results JSON (default benchmarks/results/train_step.json; --quick: a temporary folder)")
    p.add_argument("--quick", action="store_true", help="random tiny model, demo shape, fp32 and bf16, 2 steps (CI smoke)")
    args = p.parse_args(argv)
    args.json = json_path(args.json, "train_step.json", args.quick)
    model = Path(args.model)
    if args.quick:
        from slime_rl.tiny import random_tiny_model

        model = random_tiny_model(Path(tempfile.mkdtemp(prefix="train-step-")) / "model", seed=0)
        args.shapes, args.variants, args.steps, args.warmup = "demo", "fp32,bf16", 2, 1
    elif not (model / "config.json").exists():
        raise SystemExit(f"{model}: no model there; build it with `slime-rl make-tiny-model {model}` or pass --model")
    shapes = [s for s in args.shapes.split(",") if s]
    variants = [v for v in args.variants.split(",") if v]
    for name, known in ((shapes, SHAPES), (variants, VARIANTS)):
        bad = [x for x in name if x not in known]
        if bad:
            raise SystemExit(f"unknown {bad}; choose from {sorted(known)}")
    mm = matmul_gflops()
    results = []
    for shape in shapes:
        for variant in variants:
            r = measure(model, shape, variant, args.steps, args.warmup)
            results.append(r)
            print(f"{shape} {variant}: {r['step_s']:.3f} s/step", flush=True)
    print(report(results, mm))
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "model": str(model), "steps": args.steps, "warmup": args.warmup, "matmul_gflops_1t": mm, "results": results,
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg": os.getloadavg()},
    }, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
