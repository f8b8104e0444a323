"""Rollout capacity on a simulated multi-node cluster: samples/s with 1, 2 and 4 engines, and a run
whose rollout nodes come and go.

    python -m benchmarks.scaling [--model artifacts/tiny] [--steps 40] [--quick] [--json PATH]

Part 1: for n in (1, 2, 4) a cluster of a head (`trainer`) and n rollout nodes (`rollout`, one
engine each) runs the demo config asynchronously for --steps steps; reported per n: median
samples/s (train side), rollout samples/s, engine idle fraction, trainer idle fraction, staleness.
Part 2 (elastic): two rollout nodes, `rollout.elastic=true`; at a third of the run one rollout
node is SIGKILLed, at two thirds a new one joins; samples/s and `rollout/num_engines` per step are
plotted (benchmarks/results/scaling_elastic.png). Every node of the simulated cluster is a
process on this machine: the engines share its cores, which bounds what more engines can give.
Writes benchmarks/results/scaling.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import json_path

RESULTS = Path(__file__).resolve().parent / "results"
SLIME_RL = str(Path(sys.executable).with_name("slime-rl"))


def _lines(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if row.get("kind") != "eval":
            out.append(row)
    return out


def _overrides(model: Path, out: Path, name: str, steps: int, address: str, *extra: str) -> list[str]:
    return [f"model.path={model}", f"data.train_path={model / 'data' / 'train.jsonl'}", f"run.output_dir={out}",
            f"run.name={name}", f"run.num_steps={steps}", f"ray.address={address}", "ray.placement=disaggregate",
            "ray.engine_resources={rollout: 1}", "ray.trainer_resources={trainer: 1}", "data.eval_path=null",
            "logging.progress=false", "logging.wandb_mode=disabled", "checkpoint.save_hf=false", "checkpoint.interval=0",
            *extra]


def _median(rows: list[dict[str, Any]], key: str, skip: int) -> float:
    vals = [r[key] for r in rows[skip:] if isinstance(r.get(key), (int, float))]
    return statistics.median(vals) if vals else float("nan")


def run_fixed(model: Path, out: Path, engines: int, steps: int) -> dict[str, float]:
    from slime_rl.local_cluster import RayCluster, cluster_env

    cluster = RayCluster(num_cpus=1, resources={"trainer": 1})
    try:
        for _ in range(engines):  # one at a time: raylets starting together time out on 2 cores
            cluster.add_node(num_cpus=1, resources={"rollout": 1})
        name = f"scale{engines}"
        cmd = [SLIME_RL, "train", "configs/examples/arith_tiny.yaml",
               *_overrides(model, out, name, steps, cluster.address, f"rollout.num_engines={engines}")]
        t0 = time.monotonic()
        proc = subprocess.run(cmd, env=cluster_env(), capture_output=True, text=True, timeout=1800)
        wall = time.monotonic() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"{engines} engines: rc {proc.returncode}\n{proc.stderr[-3000:]}")
        rows = _lines(out / name)
        skip = min(5, len(rows) // 4)  # warm-up
        return {
            "engines": engines, "wall_s": wall,
            "samples_per_s": _median(rows, "perf/samples_per_s", skip),
            "rollout_samples_per_s": _median(rows, "rollout/samples_per_s", skip),
            "engine_idle_frac": _median(rows, "rollout/engine_idle_frac", skip),
            "trainer_idle_frac": _median(rows, "perf/trainer_idle_frac", skip),
            "staleness_mean": _median(rows, "buffer/batch_staleness_mean", skip),
        }
    finally:
        cluster.stop()


def run_elastic(model: Path, out: Path, steps: int) -> dict[str, Any]:
    from slime_rl.local_cluster import RayCluster, cluster_env

    cluster = RayCluster(num_cpus=1, resources={"trainer": 1})
    try:
        cluster.add_node(num_cpus=1, resources={"rollout": 1})
        doomed = cluster.add_node(num_cpus=1, resources={"rollout": 1})
        name = "elastic"
        cmd = [SLIME_RL, "train", "configs/examples/arith_tiny.yaml",
               *_overrides(model, out, name, steps, cluster.address, "rollout.elastic=true", "rollout.num_engines=0")]
        log = (out / "elastic.log").open("w")
        proc = subprocess.Popen(cmd, env=cluster_env(), stdout=subprocess.DEVNULL, stderr=log)
        events: list[tuple[int, str]] = []

        def wait_step(n: int) -> int:
            while len(_lines(out / name)) < n:
                if proc.poll() is not None:
                    raise RuntimeError(f"elastic run ended early (rc {proc.returncode}); see {out / 'elastic.log'}")
                time.sleep(0.2)
            return len(_lines(out / name))

        events.append((wait_step(steps // 3), "node killed"))
        cluster.kill_node(doomed)
        events.append((wait_step(2 * steps // 3), "node added"))
        cluster.add_node(num_cpus=1, resources={"rollout": 1}, wait=False)
        if proc.wait(timeout=1800) != 0:
            raise RuntimeError(f"elastic run failed (rc {proc.returncode}); see {out / 'elastic.log'}")
        rows = _lines(out / name)
        return {"steps": [r["step"] for r in rows], "samples_per_s": [r.get("perf/samples_per_s") for r in rows],
                "num_engines": [r.get("rollout/num_engines") for r in rows], "events": events}
    finally:
        cluster.stop()


def plot_elastic(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.step(data["steps"], data["num_engines"], where="post", color="tab:purple", label="engines serving")
    ax.set_ylabel("engines")
    ax.set_xlabel("step")
    top = ax.twinx()
    top.plot(data["steps"], data["samples_per_s"], color="tab:blue", lw=1, label="samples/s")
    top.set_ylabel("samples/s")
    for step, what in data["events"]:
        ax.axvline(step, color="gray", ls="--", lw=1)
        ax.text(step, ax.get_ylim()[1] * 0.95, f" {what}", fontsize=8, va="top")
    ax.set_title("elastic rollout capacity on a simulated 4-node cluster (2 cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=Path("artifacts/tiny"), help="tiny model folder (make-tiny-model)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--engines", default="1,2,4")
    p.add_argument("--quick", action="store_true", help="1 engine, a few steps, no elastic part, a random tiny model "
                                                         "when --model does not exist (CI smoke test)")
    p.add_argument("--json", dest="out", type=Path, default=None, help="results JSON (default benchmarks/results/scaling.json; --quick: a temporary folder)")
    args = p.parse_args(argv)
    args.out = json_path(args.out, "scaling.json", args.quick)
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="slr-scaling-"))
    if not (args.model / "config.json").exists():
        if not args.quick:
            raise SystemExit(f"{args.model} holds no model: build it with `slime-rl make-tiny-model {args.model}`")
        args.model = _random_model(work / "model")
    counts = [1] if args.quick else [int(x) for x in args.engines.split(",")]
    steps = 4 if args.quick else args.steps
    fixed = [run_fixed(args.model.resolve(), work, n, steps) for n in counts]
    print(f"{'engines':>7} {'samples/s':>10} {'rollout s/s':>11} {'engine idle':>11} {'trainer idle':>12} {'staleness':>9}")
    for r in fixed:
        print(f"{r['engines']:>7} {r['samples_per_s']:>10.1f} {r['rollout_samples_per_s']:>11.1f} "
              f"{r['engine_idle_frac']:>11.2f} {r['trainer_idle_frac']:>12.2f} {r['staleness_mean']:>9.2f}")
    result: dict[str, Any] = {"fixed": fixed, "steps": steps, "machine": _machine()}
    if not args.quick:
        elastic = run_elastic(args.model.resolve(), work, 3 * args.steps)
        plot_elastic(elastic, args.out.with_name("scaling_elastic.png"))
        result["elastic"] = elastic
        print(f"elastic: engines per step {elastic['num_engines']}; events {elastic['events']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0


def _random_model(folder: Path) -> Path:
    """A random tiny model with a few arith prompts (the smoke run measures nothing)."""
    from slime_rl.tiny import random_tiny_model

    random_tiny_model(folder, seed=0)
    (folder / "data").mkdir(parents=True, exist_ok=True)
    rows = [{"prompt": f"What is {i} + 1?", "label": str(i + 1)} for i in range(64)]
    (folder / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def _machine() -> dict[str, Any]:
    import os
    import platform

    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}


if __name__ == "__main__":
    sys.exit(main())
