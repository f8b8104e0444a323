"""Sync vs async RL side by side: throughput, idle time, engine occupancy, learning per trained sample.

    for seed in --seeds:                    (interleaved: every variant sees the same machine load)
        for variant in --variants:          sync | async-s1 | async-s1-abort | async-s2-wait | ...
            slime-rl train CONFIG run.mode=... buffer.max_staleness=S rollout.weight_update_mode=M run.seed=seed
              ├─ metrics.jsonl ─► steady state (steps after --warmup): samples/s, idle fractions, reward
              └─ poller process ─► every engine's health() every --poll-s: sequences running / waiting
                                   ─► engine occupancy (time average while the engines hold versions >= warmup)
    ─► table of medians over seeds, each variant / sync per seed, JSON (+ PNG)

Variants: `sync` (run.mode=sync: staleness 0, generation and training alternate) and
`async-s<S>[-<mode>]` (run.mode=async, buffer.max_staleness=S, rollout.weight_update_mode=<mode>,
default keep). The weight-update mode is what "partial rollouts" means here: `keep` and `abort`
let a long response straddle weight updates (keep: the engine pauses, loads and continues it with
the new weights; abort: it returns partial and the manager continues it as a new piece), `wait`
drains every request in flight before the load (no partial rollouts: the update waits for the
slowest response). A `-kv` suffix (`async-s2-kv`) keeps the KV cache of the requests in flight
across each update instead of recomputing it (rollout.recompute_kv_on_update=false).

    python -m benchmarks.run_modes configs/examples/longtail_tiny.yaml --steps 60 --seeds 0 1 2 \\
        --variants sync,async-s1,async-s2,async-s1-wait,async-s2-abort --json benchmarks/results/run_modes_longtail.json
    python benchmarks/run_modes.py configs/examples/arith_tiny.yaml --steps 40 --rounds 2 --no-eval   # the demo
    python -m benchmarks run_modes --quick --json /tmp/run_modes.json                         # CI smoke

`--quick` builds a random tiny model with a few `longtail` rows and runs sync and async-s1-kv for 3
steps on the hf engine: it checks the benchmark runs and writes its JSON, nothing more.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file (python benchmarks/run_modes.py): make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import json_path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_VARIANTS = "sync,async-s1"
_VARIANT = re.compile(r"^async-s(\d+)(?:-(keep|abort|wait))?(-kv)?$")


def variant_overrides(name: str) -> list[str]:
    """The config overrides of a variant name (see the module docstring)."""
    if name == "sync":
        return ["run.mode=sync"]
    m = _VARIANT.match(name)
    if not m:
        raise SystemExit(f"variant {name!r} is not known; use sync or async-s<S>[-keep|-abort|-wait][-kv], e.g. async-s2-abort")
    out = ["run.mode=async", f"buffer.max_staleness={m.group(1)}", f"rollout.weight_update_mode={m.group(2) or 'keep'}"]
    return out + ["rollout.recompute_kv_on_update=false"] * bool(m.group(3))


# ---- one run -----------------------------------------------------------------------------------
def run_once(config: str, variant: str, seed: int | None, steps: int, out_dir: Path, extra: list[str],
             poll_s: float, timeout_s: float) -> tuple[list[dict], list[dict], list[dict]]:
    """Train one variant; returns (train lines, eval lines, engine polls)."""
    name = f"bench-{variant}-s{seed if seed is not None else 'cfg'}-{int(time.time())}"
    run_dir = out_dir / name
    cmd = [
        sys.executable, "-m", "slime_rl.cli", "train", config, *variant_overrides(variant), f"run.num_steps={steps}",
        f"run.name={name}", f"run.output_dir={out_dir}", "checkpoint.interval=0", "checkpoint.save_hf=false",
        "logging.save_samples=false", "logging.progress=false", "logging.wandb_mode=disabled",
        *([f"run.seed={seed}"] if seed is not None else []), *extra,
    ]
    out_dir.mkdir(parents=True, exist_ok=True)
    polls_path = out_dir / f"{name}.polls.jsonl"
    log_path = out_dir / f"{name}.log"
    with log_path.open("w") as log:
        train = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        poller = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.run_modes", "--poll", str(run_dir), str(polls_path), str(poll_s)],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT) if poll_s > 0 else None
        try:
            rc = train.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            train.kill()
            rc = -9
        finally:
            if poller is not None:
                poller.terminate()
                poller.wait(timeout=30)
    if rc != 0:
        tail = log_path.read_text()[-3000:]
        raise SystemExit(f"{variant} (seed {seed}) failed with exit code {rc}; log {log_path}:\n{tail}")
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    polls = [json.loads(x) for x in polls_path.read_text().splitlines()] if polls_path.exists() else []
    return [x for x in lines if x.get("kind") != "eval"], [x for x in lines if x.get("kind") == "eval"], polls


def poll_engines(run_dir: str, out_path: str, interval_s: float) -> None:
    """(Runs as its own process.) Wait for the run's actors.json, then record every engine's
    `health()` (sequences running and waiting, weight version) every `interval_s` until killed."""
    import ray

    from slime_rl.cluster import NAMESPACE, use_token_if_available

    path = Path(run_dir) / "actors.json"
    while not path.exists() or not any(a.get("role") == "engine" for a in json.loads(path.read_text() or "{}").get("actors", [])):
        time.sleep(0.5)
    info = json.loads(path.read_text())
    namespace = info.get("namespace") or NAMESPACE
    use_token_if_available()
    ray.init(address=info["ray_address"], namespace=namespace, log_to_driver=False, logging_level="ERROR")
    engines = {a["name"]: ray.get_actor(a["name"], namespace=namespace) for a in info["actors"] if a.get("role") == "engine"}
    with open(out_path, "w") as out:
        while True:
            t = time.monotonic()
            for name, handle in engines.items():
                try:
                    h = ray.get(handle.health.remote(), timeout=5)
                except Exception:  # the run is ending
                    return
                out.write(json.dumps({"t": t, "engine": name, "version": h.version, "running": h.num_running,
                                      "waiting": h.num_waiting, "paused": h.paused}) + "\n")
            out.flush()
            time.sleep(max(0.0, interval_s - (time.monotonic() - t)))


# ---- summaries ---------------------------------------------------------------------------------
def summarise(lines: list[dict], evals: list[dict], polls: list[dict], warmup: int, max_batch: int) -> dict[str, Any]:
    steady = [x for x in lines if x["step"] > warmup]
    wall = sum(x["step_time_s"] for x in steady)

    def med(key: str) -> float:
        vals = [x[key] for x in steady if isinstance(x.get(key), (int, float))]
        return statistics.median(vals) if vals else float("nan")

    def weighted(key: str) -> float:  # share of the steady wall time (per-step fractions weighted by step time)
        vals = [(x[key], x["step_time_s"]) for x in steady if isinstance(x.get(key), (int, float))]
        return sum(v * w for v, w in vals) / max(1e-9, sum(w for _, w in vals)) if vals else float("nan")

    def counter(key: str) -> float:  # growth of a cumulative counter over the steady window
        vals = [x[key] for x in lines if isinstance(x.get(key), (int, float))]
        before = [x[key] for x in lines if x["step"] <= warmup and isinstance(x.get(key), (int, float))]
        return (vals[-1] - (before[-1] if before else 0.0)) if vals else float("nan")

    window = [p for p in polls if p["version"] >= warmup]
    running = [p["running"] for p in window]
    out: dict[str, Any] = {
        "steps": len(steady),
        "samples_per_s": sum(x["samples"] for x in steady) / max(wall, 1e-9),
        "step_time_s_median": med("step_time_s"),
        "train_step_s_median": med("train/step_seconds"),
        "trainer_idle_frac": weighted("trainer_idle_frac"),
        "engine_idle_frac": weighted("rollout_idle_frac"),
        "weight_sync_s_median": med("weight_sync_s"),
        "staleness_mean": statistics.mean(x["staleness_mean"] for x in steady) if steady else float("nan"),
        "dropped_stale_groups": counter("buffer/dropped_stale"),
        "response_len_mean": med("train/response_len"),
        "gen_tokens_per_s_median": med("rollout/gen_tokens_per_s"),
        "reward_steady": statistics.mean(x["reward_mean"] for x in steady) if steady else float("nan"),
        "reward_by_step": [x.get("reward_mean") for x in lines],
        "samples_by_step": [x.get("samples") for x in lines],
        "polls": len(window),
        "running_mean": statistics.mean(running) if running else float("nan"),
        "occupancy": statistics.mean(running) / max_batch if running else float("nan"),
        "time_frac_1_to_4_running": sum(1 <= r <= 4 for r in running) / len(running) if running else float("nan"),
        "time_frac_0_running": sum(r == 0 for r in running) / len(running) if running else float("nan"),
    }
    for key in ("rollout/reward_mean/think", "rollout/reward_mean/non_think", "rollout/response_len_mean/think",
                "rollout/response_len_mean/non_think", "rollout/aborted_frac", "rollout/continuations"):
        out[key] = med(key)
    if evals:
        out["eval_accuracy_first"] = evals[0].get("eval/accuracy")
        out["eval_accuracy_last"] = evals[-1].get("eval/accuracy")
        out["eval_step_last"] = evals[-1].get("step")
        for mode in ("think", "non_think"):
            out[f"eval_accuracy_last/{mode}"] = evals[-1].get(f"eval/accuracy/{mode}")
    return out


def _m(rows: list[dict], key: str) -> float:
    vals = [r[key] for r in rows if isinstance(r.get(key), (int, float)) and r[key] == r[key]]
    return statistics.median(vals) if vals else float("nan")


def report(results: dict[str, list[dict]], seeds: list[Any]) -> dict[str, list[float]]:
    """Print the table (medians over seeds) and return each variant's samples/s ratio to sync per seed."""
    base = results.get("sync")
    ratios = {v: [r["samples_per_s"] / b["samples_per_s"] for r, b in zip(rows, base)]
              for v, rows in results.items() if base and v != "sync"}
    cols = [("samples/s", "samples_per_s", "{:.1f}"), ("x sync", None, "{:.2f}"), ("step s", "step_time_s_median", "{:.2f}"),
            ("train s", "train_step_s_median", "{:.2f}"), ("trainer idle", "trainer_idle_frac", "{:.2f}"),
            ("engine idle", "engine_idle_frac", "{:.2f}"), ("running", "running_mean", "{:.1f}"),
            ("1-4 running", "time_frac_1_to_4_running", "{:.2f}"), ("staleness", "staleness_mean", "{:.2f}"),
            ("dropped", "dropped_stale_groups", "{:.0f}"), ("resp len", "response_len_mean", "{:.0f}"),
            ("reward", "reward_steady", "{:.3f}"), ("eval last", "eval_accuracy_last", "{:.3f}")]
    print(f"\nmedians over {len(seeds)} seed(s) {seeds}")
    print(f"{'variant':16s}" + "".join(f"{c:>13s}" for c, _, _ in cols))
    for v, rows in results.items():
        cells = []
        for _, key, fmt in cols:
            val = statistics.median(ratios[v]) if key is None and v in ratios else (1.0 if key is None else _m(rows, key))
            cells.append(fmt.format(val) if val == val else "-")
        print(f"{v:16s}" + "".join(f"{c:>13s}" for c in cells))
    for v, r in ratios.items():
        print(f"{v} / sync samples/s per seed: {', '.join(f'{x:.2f}' for x in r)} (median {statistics.median(r):.2f})")
    return ratios


def plot(results: dict[str, list[dict]], path: Path) -> None:
    """samples/s per variant (median bar, a dot per seed) and train reward against samples trained."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    names = list(results)
    for i, v in enumerate(names):
        vals = [r["samples_per_s"] for r in results[v]]
        ax1.bar(i, statistics.median(vals), color="#9ecae1" if v == "sync" else "#fdae6b")
        ax1.scatter([i] * len(vals), vals, color="k", s=10, zorder=3)
        rewards = [r["reward_by_step"] for r in results[v]]
        n = min(len(x) for x in rewards)
        per_step = [statistics.median(x[k] for x in rewards if x[k] is not None) for k in range(n)]
        smooth = [statistics.mean(per_step[max(0, k - 4): k + 1]) for k in range(n)]
        samples = results[v][0]["samples_by_step"][:n]
        ax2.plot([sum(samples[: k + 1]) for k in range(n)], smooth, label=v)
    ax1.set_xticks(range(len(names)), names, rotation=20)
    ax1.set_ylabel("trained samples / s (steady state)")
    ax2.set_xlabel("samples trained")
    ax2.set_ylabel("train reward (median over seeds, 5-step mean)")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- main --------------------------------------------------------------------------------------
def quick_setup(work: Path) -> tuple[str, list[str]]:
    """A random tiny model with a few `longtail` rows, and overrides for a 3-step hf run."""
    from slime_rl.tiny import random_tiny_model
    from slime_rl.tiny.longtail import LongtailSpec, make_longtail_dataset
    from slime_rl.tiny.task import write_jsonl

    model = random_tiny_model(work / "model")
    write_jsonl(make_longtail_dataset(n_train=32, n_eval=4, spec=LongtailSpec(min_days=2, max_days=3))["train"],
                work / "model" / "data" / "train.jsonl")
    return "configs/examples/longtail_tiny.yaml", [
        f"model.path={model}", f"data.train_path={model / 'data' / 'train.jsonl'}", "data.eval_path=null",
        "rollout.engine=hf", "rollout.n_samples_per_prompt=2", "trainer.global_batch_groups=2",
        "rollout.max_new_tokens=8", "rollout.max_new_tokens_by_mode={think: 8, non_think: 8}", "eval.interval=0"]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--poll"]:
        poll_engines(argv[1], argv[2], float(argv[3]))
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", default="configs/examples/longtail_tiny.yaml")
    p.add_argument("overrides", nargs="*", help="extra key=value overrides for every variant")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5, help="steps left out of the steady state")
    p.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma-separated (default {DEFAULT_VARIANTS})")
    p.add_argument("--seeds", type=int, nargs="*", default=None, help="run.seed of each round (default: the config's, --rounds times)")
    p.add_argument("--rounds", type=int, default=1, help="rounds with the config's seed when --seeds is not given")
    p.add_argument("--poll-s", type=float, default=0.1, help="engine occupancy poll interval (0 = off)")
    p.add_argument("--max-batch", type=int, default=64, help="rollout.max_batch_size, the occupancy denominator")
    p.add_argument("--no-eval", action="store_true", help="no evaluation (eval.interval=0 data.eval_path=null)")
    p.add_argument("--timeout-s", type=float, default=1800.0, help="longest one run may take")
    p.add_argument("--json", "--out", dest="out", default=None, help="results JSON (default benchmarks/results/run_modes.json; --quick: a temporary folder)")
    p.add_argument("--quick", action="store_true", help="smoke run: random tiny model, hf engine, 3 steps, sync and async-s1-kv")
    args = p.parse_args(argv)
    args.out = json_path(args.out, "run_modes.json", args.quick)
    extra = list(args.overrides) + (["eval.interval=0", "data.eval_path=null"] if args.no_eval else [])
    work = Path(tempfile.mkdtemp(prefix="slr-run-modes-"))
    if args.quick:
        args.config, quick = quick_setup(work)
        extra = quick + extra
        args.steps, args.warmup, args.variants, args.seeds, args.poll_s = 3, 0, "sync,async-s1-kv", [0], 0.2
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        variant_overrides(v)  # fail on a bad name before anything runs
    seeds: list[Any] = args.seeds if args.seeds else [None] * args.rounds
    results: dict[str, list[dict]] = {v: [] for v in variants}
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    for seed in seeds:
        for v in variants:
            t0 = time.monotonic()
            lines, evals, polls = run_once(args.config, v, seed, args.steps, work / "runs", extra, args.poll_s, args.timeout_s)
            s = summarise(lines, evals, polls, args.warmup, args.max_batch)
            s["seed"], s["wall_s"] = seed, time.monotonic() - t0
            results[v].append(s)
            print(f"seed {seed} {v:16s}: {s['samples_per_s']:.1f} samples/s, trainer idle {s['trainer_idle_frac']:.2f}, "
                  f"engine running {s['running_mean']:.1f}, reward {s['reward_steady']:.3f}, "
                  f"eval {s.get('eval_accuracy_last', float('nan')) or float('nan'):.3f} ({s['wall_s']:.0f} s)", flush=True)
    ratios = report(results, seeds)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "config": args.config, "steps": args.steps, "warmup": args.warmup, "overrides": extra, "seeds": seeds,
        "variants": variants, "started": started, "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg": os.getloadavg()},
        "results": results, "ratios": ratios}, indent=1))
    if not args.quick:
        plot(results, out.with_suffix(".png"))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
