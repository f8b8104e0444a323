"""Where a step's seconds go: a finished run's wall time split per side, against this machine's limits.

    RUN_DIR/trace.json ─► slime_rl.tracing.analyze (window of steady steps ─► summarize) ─┐
    RUN_DIR/metrics.jsonl (perf/train_<phase>_s, train/tokens, rollout/gen_tokens_per_s) ─┼─► table
    a one-core fp32 matmul (GFLOP/s) + benchmarks/results/rollout.json (engine tokens/s) ─┘   + PNG + JSON

Sides (each a share of the same wall time: the steps whose every event the trace kept):
- trainer (the driver): buffer wait, train step (split by the trainer's own clock into prepare,
  forward, backward, optimizer; train/rest: the rest of the span, the call around it), weight sync,
  checkpoint, eval, other;
- engines (per engine, averaged): generation, loading weights, eval, idle;
- rollout manager: reward scoring, filter, buffer put (wall time with any of it running), the rest.
Limits: training FLOPs per step (6 x parameters x trained positions) against a measured one-core
matmul rate; generated tokens/s against the engine benchmark at the same concurrency.

Usage:
    python -m benchmarks.e2e RUN_DIR [--steps 6:] [--json PATH] [--png PATH]
    python -m benchmarks.e2e --quick --json /tmp/e2e.json   # a 6-step run on a random tiny model
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import json_path

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("prepare", "forward", "backward", "optimizer")
TRAINER_ROWS = ("buffer_wait", *(f"train/{p}" for p in PHASES), "train/rest", "weight_sync", "checkpoint", "eval", "other")
ENGINE_ROWS = ("generate", "update_weights", "eval", "idle")
MANAGER_ROWS = ("score", "filter", "put", "rest")


def split(run_dir: Path, steps: str | None) -> dict[str, Any]:
    """The split of `run_dir`'s steady steps, in seconds and fractions of the wall time."""
    from slime_rl.tracing import analyze

    events, info = analyze.load_trace(run_dir)
    first, last = analyze.parse_steps(steps) if steps else (None, None)
    rep = analyze.summarize(analyze.window(events, first, last), info)
    if rep.wall_s <= 0:
        raise SystemExit(f"{run_dir}: no step in {steps or 'the trace'} has its events in trace.json")
    metrics = {r["step"]: r for r in _metric_lines(run_dir)}
    detailed = [metrics[s] for s in rep.detailed_steps if s in metrics]
    phases = {p: sum(m.get(f"perf/train_{p}_s", 0.0) for m in detailed) for p in PHASES}
    trainer = {"buffer_wait": rep.trainer["buffer_wait"]}
    train = rep.trainer["train_step"]
    scale = min(1.0, train / sum(phases.values())) if sum(phases.values()) > 0 else 0.0
    trainer |= {f"train/{p}": s * scale for p, s in phases.items()}  # the worker's clock, inside the span
    trainer["train/rest"] = max(0.0, train - sum(phases.values()) * scale)  # all of it without perf/train_*_s
    trainer |= {k: rep.trainer[k] for k in ("weight_sync", "checkpoint", "eval", "other")}
    n_eng = max(1, len(rep.engines))
    engine = {k: rep.engine[k] / n_eng for k in ENGINE_ROWS}
    manager = {k: rep.manager[k] for k in ("score", "filter", "put")}
    manager["rest"] = max(0.0, rep.wall_s - sum(manager.values()))
    n_steps = len(rep.detailed_steps)
    return {
        "run_dir": str(run_dir), "steps": [rep.detailed_steps[0], rep.detailed_steps[-1]] if n_steps else [],
        "n_steps": n_steps, "wall_s": rep.wall_s, "step_s_median": statistics.median(rep.step_s) if rep.step_s else None,
        "engines": rep.engines, "trainer_s": trainer, "engine_s": engine, "manager_s": manager,
        "group_life_s": rep.life, "per_step": _per_step(detailed),
    }


def _metric_lines(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        raise SystemExit(f"{path} does not exist (not a run directory?)")
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [r for r in rows if r.get("kind") != "eval" and isinstance(r.get("step"), int)]


def _per_step(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Medians over the window of the metrics the limits need."""
    keys = ("samples", "step_time_s", "samples_per_s", "train/step_seconds", "train/tokens", "perf/train_positions",
            "rollout/gen_tokens_per_s", "rollout/response_len_mean", "rollout/samples_per_s", "weight_sync/seconds",
            *(f"perf/train_{p}_s" for p in PHASES))
    return {k: statistics.median(r[k] for r in rows if k in r) for k in keys if any(k in r for r in rows)}


# ---- the machine's limits -----------------------------------------------------------------------
def matmul_gflops(n: int = 1024, seconds: float = 1.0) -> float:
    """Best fp32 GFLOP/s of an n x n matmul on one torch thread."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        best, end = float("inf"), time.perf_counter() + seconds
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
        return 2 * n**3 / best / 1e9
    finally:
        torch.set_num_threads(old)


def limits(run_dir: Path, per_step: dict[str, float]) -> dict[str, Any]:
    """Training FLOPs per step against the one-core matmul rate; generation against the engine benchmark."""
    out: dict[str, Any] = {"matmul_gflops_1t": matmul_gflops()}
    params = _params(run_dir)
    positions = per_step.get("perf/train_positions") or per_step.get("train/tokens")
    if params and positions and per_step.get("train/step_seconds"):
        flops = 6 * params * positions
        out |= {"params": params, "train_positions": positions, "train_gflop_per_step": flops / 1e9,
                "train_gflops": flops / 1e9 / per_step["train/step_seconds"]}
        out["train_frac_of_1t_matmul"] = out["train_gflops"] / out["matmul_gflops_1t"]
    bench = ROOT / "benchmarks/results/rollout.json"
    if bench.exists() and per_step.get("rollout/gen_tokens_per_s"):
        out["engine_bench"] = str(bench.relative_to(ROOT))
        out["gen_tokens_per_s"] = per_step["rollout/gen_tokens_per_s"]
        out["engine"] = _config(run_dir).get("rollout", {}).get("engine", "vllm")
        out["engine_bench_tokens_per_s"] = _bench_tokens_per_s(json.loads(bench.read_text()), out["engine"])
    return out


def _config(run_dir: Path) -> dict[str, Any]:
    import yaml

    cfg = run_dir / "config.yaml"
    return (yaml.safe_load(cfg.read_text()) or {}) if cfg.exists() else {}


def _params(run_dir: Path) -> int | None:
    try:
        from safetensors import safe_open

        model = Path(_config(run_dir)["model"]["path"])
        model = model if model.is_absolute() else ROOT / model
        total = 0
        for f in model.glob("*.safetensors"):
            with safe_open(str(f), framework="pt") as sf:
                for k in sf.keys():
                    shape = sf.get_slice(k).get_shape()
                    total += int(math.prod(shape))
        return total or None
    except Exception:  # a run of a model no longer on disk: no FLOP count
        return None


def _bench_tokens_per_s(data: dict[str, Any], engine: str) -> dict[str, float]:
    """The engine benchmark's generated tokens/s of `engine` per concurrent requests."""
    rows = (data.get("results") or {}).get(engine) or {}
    return {bs: float(r["tokens_per_s"]) for bs, r in rows.items() if isinstance(r, dict) and "tokens_per_s" in r}


# ---- output ------------------------------------------------------------------------------------
def table(r: dict[str, Any]) -> str:
    wall = r["wall_s"]
    lines = [f"{r['run_dir']}: steps {r['steps'][0]}-{r['steps'][1]} ({r['n_steps']} steps, {wall:.2f} s wall, step median "
             f"{r['step_s_median']:.3f} s), {len(r['engines'])} engine(s)",
             f"{'side':<16}{'part':<18}{'s per step':>11}{'share':>8}"]
    for side, key, rows in (("trainer", "trainer_s", TRAINER_ROWS), ("engine (mean)", "engine_s", ENGINE_ROWS),
                            ("rollout manager", "manager_s", MANAGER_ROWS)):
        for i, k in enumerate(rows):
            s = r[key][k]
            lines.append(f"{side if i == 0 else '':<16}{k:<18}{s / r['n_steps']:>11.4f}{100 * s / wall:>7.1f}%")
    if not any(r["trainer_s"][f"train/{p}"] for p in PHASES):
        lines.append("(no perf/train_<phase>_s in metrics.jsonl: the whole train step is under train/rest)")
    lim = r.get("limits") or {}
    if "train_gflops" in lim:
        lines.append(f"train step: {lim['train_gflop_per_step']:.1f} GFLOP ({lim['params'] / 1e6:.2f}M params x "
                     f"{lim['train_positions']:.0f} positions x 6) at {lim['train_gflops']:.1f} GFLOP/s = "
                     f"{100 * lim['train_frac_of_1t_matmul']:.0f} % of a one-core fp32 matmul ({lim['matmul_gflops_1t']:.0f} GFLOP/s)")
    if "gen_tokens_per_s" in lim:
        bench = ", ".join(f"{v:.0f} at {k}" for k, v in lim["engine_bench_tokens_per_s"].items())
        lines.append(f"generation: {lim['gen_tokens_per_s']:.0f} tokens/s in the run; {lim['engine']} in "
                     f"{lim['engine_bench']}: {bench} concurrent requests")
    return "\n".join(lines)


def plot(r: dict[str, Any], path: Path) -> Path:
    """A stacked bar per side, each part a share of the wall time."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 3.2))
    ax = fig.add_subplot(111)
    sides = (("trainer", "trainer_s", TRAINER_ROWS), ("engine", "engine_s", ENGINE_ROWS),
             ("manager", "manager_s", MANAGER_ROWS))
    colors = {"buffer_wait": "#bbbbbb", "train/prepare": "#9ecae1", "train/forward": "#4292c6",
              "train/backward": "#08519c", "train/optimizer": "#08306b", "train/rest": "#c6dbef",
              "weight_sync": "#e6550d", "update_weights": "#e6550d", "checkpoint": "#756bb1", "eval": "#31a354",
              "other": "#eeeeee", "idle": "#eeeeee", "rest": "#eeeeee", "generate": "#fd8d3c", "score": "#d62728",
              "filter": "#9467bd", "put": "#8c564b"}
    for y, (_label, key, rows) in enumerate(sides):
        left = 0.0
        for k in rows:
            share = 100 * r[key][k] / r["wall_s"]
            if share <= 0:
                continue
            ax.barh(y, share, left=left, color=colors.get(k, "#999999"), edgecolor="white",
                    label=k if k not in ("idle", "rest") else None)
            if share > 6:
                ax.text(left + share / 2, y, k.replace("train/", ""), ha="center", va="center", fontsize=7)
            left += share
    ax.set_yticks(range(len(sides)), [s[0] for s in sides])
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel(f"% of wall time (steps {r['steps'][0]}-{r['steps'][1]}, step median {r['step_s_median']:.2f} s)")
    handles, labels = ax.get_legend_handles_labels()
    uniq = dict(zip(labels, handles))
    ax.legend(uniq.values(), uniq.keys(), fontsize=6, ncol=6, loc="upper center", bbox_to_anchor=(0.5, -0.28))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    return path


def quick_run(out: Path) -> Path:
    """A 6-step run on a random tiny model (hf engine, short responses): a run directory to split."""
    from slime_rl.tiny import make_dataset, random_tiny_model

    model = random_tiny_model(out / "model", seed=0)
    rows = make_dataset(seed=0, n_train=200, n_eval=8)["train"]
    (out / "train.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
    cmd = [sys.executable, "-m", "slime_rl.cli", "train", "configs/examples/arith_tiny.yaml", f"model.path={model}",
           f"data.train_path={out / 'train.jsonl'}", "data.eval_path=null", "run.num_steps=6", "run.name=quick",
           f"run.output_dir={out}", "rollout.engine=hf", "rollout.max_new_tokens=8", "trainer.global_batch_groups=2",
           "eval.interval=0", "checkpoint.interval=0", "checkpoint.save_hf=false", "logging.save_samples=false",
           "logging.progress=false", "logging.wandb_mode=disabled"]
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return out / "quick"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", nargs="?", help="a finished run's directory (trace.json + metrics.jsonl)")
    p.add_argument("--steps", default="6:", help="steps to split, A:B (inclusive; default 6: skips the warm-up)")
    p.add_argument("--json", default=None, help="results JSON (default benchmarks/results/e2e.json; --quick: a temporary folder)")
    p.add_argument("--png", default=None, help="the stacked bars (default: next to --json, .png)")
    p.add_argument("--no-limits", action="store_true", help="skip the matmul measurement")
    p.add_argument("--quick", action="store_true", help="split a fresh 6-step run on a random tiny model (CI smoke)")
    args = p.parse_args(argv)
    args.json = json_path(args.json, "e2e.json", args.quick)
    if args.quick:
        run_dir, args.steps = quick_run(Path(tempfile.mkdtemp(prefix="e2e-quick-"))), "2:"
    elif args.run_dir:
        run_dir = Path(args.run_dir)
    else:
        p.error("give a RUN_DIR or --quick")
    from slime_rl.tracing.analyze import TraceError

    try:
        r = split(run_dir, args.steps)
    except TraceError as e:
        raise SystemExit(f"{run_dir}: {e}") from None
    if not args.no_limits:
        r["limits"] = limits(run_dir, r["per_step"])
    print(table(r))
    png = Path(args.png) if args.png else Path(args.json).with_suffix(".png")
    r["png"] = str(plot(r, png))
    r["when"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(r, indent=1))
    print(f"wrote {args.json} and {png}")
    return r


if __name__ == "__main__":
    main()
