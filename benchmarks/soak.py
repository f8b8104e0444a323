"""Soak: does anything grow? Every process's memory, the object store and the disk, per step.

    slime-rl train CONFIG run.num_steps=<large> ...  (subprocess; SIGINT after --minutes: it
        │                                              checkpoints and exits 130)
        ├─ every --interval-s ─► the run's process tree (psutil): RSS + USS per process, labelled
        │                        by its title (driver, ray::EngineActor, ray::TrainerWorker,
        │                        ray::BufferActor, ray::RolloutManagerActor, raylet, gcs_server,
        │                        vLLM's EngineCore, ...)
        │                     ─► object store: the raylet's store stats (what `ray memory
        │                        --stats-only` prints: bytes used, objects, spilled), read over
        │                        gRPC from the address in actors.json (no second Ray driver)
        │                     ─► disk: the run directory by entry (checkpoints/, samples/, wandb/,
        │                        trace.json, ...) and the Ray session's logs
        │                     ─► step: the last train line of metrics.jsonl (sample -> step)
        └─ after the run ─► per series: least-squares slope in MB/step over the steps after the
                            warm-up (--warmup-frac of the steps) ─► table, JSON, PNG

Goal: < 1 MB/step for every process and an object store that stays flat; disk grows by design
(samples/ with logging.save_samples; checkpoints are rotated by checkpoint.keep_last).

    python -m benchmarks.soak --minutes 20                    # the demo (artifacts/tiny), ~25 min
    python -m benchmarks soak --quick --json /tmp/soak.json   # CI smoke: ~1 minute, hf engine

`--quick` uses artifacts/tiny when it exists (else a random tiny model with generated `arith`
rows) on the hf engine for about a minute; it checks that the sampler and the analysis run and
write their JSON, nothing about the numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from benchmarks import json_path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DEMO = "configs/examples/arith_tiny.yaml"
DEMO_OVERRIDES = ["model.path=artifacts/tiny", "data.train_path=artifacts/tiny/data/train.jsonl",
                  "data.eval_path=artifacts/tiny/data/eval.jsonl"]
GOAL_MB_PER_STEP = 1.0
MB = 2**20
_SYSTEM = (("gcs_server", "gcs_server"), ("raylet", "raylet"), ("dashboard/agent.py", "dashboard_agent"),
           ("runtime_env/agent", "runtime_env_agent"), ("log_monitor.py", "log_monitor"),
           ("dashboard/dashboard.py", "dashboard"), ("resource_tracker", "mp_resource_tracker"),
           ("forkserver", "mp_forkserver"), ("SLIME_RL_CLUSTER", "cluster_reaper"))


# ---- sampling ----------------------------------------------------------------------------------
def label(cmdline: list[str]) -> str:
    """A process's role from its title: `ray::EngineActor.generate_group` -> `EngineActor`."""
    title = " ".join(cmdline)
    head = cmdline[0] if cmdline else ""
    if head.startswith("ray::"):
        return head[5:].split(".")[0].split(" ")[0] or "ray::?"
    if "EngineCore" in title or head.startswith("VLLM::"):
        return "vllm::EngineCore"
    for needle, name in _SYSTEM:
        if needle in title:
            return name
    if "-c" in cmdline and any("_REAPER" in c or "/proc" in c for c in cmdline):
        return "cluster_reaper"
    return Path(head).name or "?"


class Sampler:
    """One row per process and one for the store and the disk, every call of `sample()`."""

    def __init__(self, driver_pid: int, run_dir: Path) -> None:
        self.driver = psutil.Process(driver_pid)
        self.run_dir = run_dir
        self._procs: dict[int, psutil.Process] = {}
        self._metrics_pos = 0
        self.step = 0
        self._state: Any = None
        self._store_error: str | None = None
        self.session_dir: Path | None = None

    def processes(self) -> list[dict[str, Any]]:
        try:
            tree = [self.driver, *self.driver.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []
        rows = []
        for p in tree:
            p = self._procs.setdefault(p.pid, p)
            try:
                with p.oneshot():
                    cmd = p.cmdline()
                    rss = p.memory_info().rss
                    try:
                        uss = p.memory_full_info().uss
                    except (psutil.AccessDenied, OSError):
                        uss = None
            except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
                continue
            name = "driver" if p.pid == self.driver.pid else label(cmd)
            if name == "raylet" and self.session_dir is None:
                self.session_dir = next((Path(c.split("=", 1)[1]) for c in cmd if c.startswith("--session_dir=")), None)
            rows.append({"pid": p.pid, "label": name, "rss": rss, "uss": uss})
        return rows

    def store(self) -> dict[str, float] | None:
        """Plasma store stats of the run's node (None until actors.json names the cluster)."""
        try:
            if self._state is None:
                info = json.loads((self.run_dir / "actors.json").read_text())
                from ray._private.internal_api import get_state_from_address

                from slime_rl.cluster import use_token_if_available

                use_token_if_available()  # a cluster with token auth refuses a client without it
                self._state = get_state_from_address(info["ray_address"])
            from ray._private.internal_api import get_memory_info_reply

            s = get_memory_info_reply(self._state, timeout_seconds=10).store_stats
        except Exception as e:  # not up yet, or going down
            self._store_error = str(e)[:200]
            return None
        return {"used": s.object_store_bytes_used, "objects": s.num_local_objects, "capacity": s.object_store_bytes_avail,
                "primary": s.object_store_bytes_primary_copy, "spilled_total": s.spilled_bytes_total,
                "fallback": s.object_store_bytes_fallback}

    def disk(self) -> dict[str, int]:
        out: dict[str, int] = {}
        if self.run_dir.exists():
            for entry in os.scandir(self.run_dir):
                out[entry.name] = _size(Path(entry.path))
        if self.session_dir is not None:
            out["<ray session logs>"] = _size(self.session_dir / "logs")
        return out

    def advance_step(self) -> int:
        """The last train step in metrics.jsonl (read incrementally)."""
        path = self.run_dir / "metrics.jsonl"
        try:
            with path.open(encoding="utf-8") as f:
                if path.stat().st_size < self._metrics_pos:  # rewritten
                    self._metrics_pos = 0
                f.seek(self._metrics_pos)
                for line in f:
                    if not line.endswith("\n"):
                        break
                    self._metrics_pos += len(line.encode())
                    rec = json.loads(line)
                    if rec.get("kind") != "eval":
                        self.step = max(self.step, int(rec["step"]))
        except (OSError, ValueError):
            pass
        return self.step

    def sample(self, t0: float) -> dict[str, Any]:
        t = time.monotonic()
        row = {"t": round(t - t0, 2), "step": self.advance_step(), "procs": self.processes(), "store": self.store(),
               "disk": self.disk()}
        row["sample_s"] = round(time.monotonic() - t, 3)
        return row


def _size(path: Path) -> int:
    try:
        if path.is_file():
            return path.stat().st_size
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    except OSError:
        return 0


# ---- running -----------------------------------------------------------------------------------
def run(config: str, overrides: list[str], minutes: float, interval_s: float, out_dir: Path,
        stop_timeout_s: float) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Train for `minutes` of wall clock while sampling; returns (samples, run info)."""
    name = f"soak-{int(time.time())}"
    run_dir = out_dir / name
    cmd = [sys.executable, "-m", "slime_rl.cli", "train", config, *overrides, "run.num_steps=1000000", "run.max_minutes=null",
           f"run.name={name}", f"run.output_dir={out_dir}", "logging.progress=false"]
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / f"{name}.log"
    samples: list[dict[str, Any]] = []
    with log_path.open("w") as log:
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        sampler = Sampler(proc.pid, run_dir)
        stop_at = t0 + minutes * 60
        try:
            while proc.poll() is None and time.monotonic() < stop_at:
                samples.append(sampler.sample(t0))
                time.sleep(max(0.0, interval_s - samples[-1]["sample_s"]))
        except KeyboardInterrupt:
            print("soak: Ctrl-C, stopping the run", file=sys.stderr)
        stopped = time.monotonic()
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # graceful: finish the step, checkpoint, exit 130
        try:
            rc = proc.wait(timeout=stop_timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait()
    info = {"command": " ".join(cmd), "run_dir": str(run_dir), "log": str(log_path), "exit_code": rc,
            "stop_s": round(time.monotonic() - stopped, 1), "wall_s": round(stopped - t0, 1),
            "last_step": sampler.advance_step(), "session_dir": str(sampler.session_dir),
            "store_error": sampler._store_error}
    if rc not in (0, 130):
        tail = log_path.read_text(errors="replace")[-3000:]
        raise SystemExit(f"the run failed with exit code {rc}; log {log_path}:\n{tail}")
    return samples, info


# ---- analysis ----------------------------------------------------------------------------------
def series(samples: list[dict[str, Any]]) -> dict[str, list[tuple[int, float, float]]]:
    """name -> [(step, t, MB)]: one per process (its last non-idle label, with the pid when the
    label repeats), plus sums, the object store and the disk entries."""
    labels: dict[int, str] = {}
    for s in samples:
        for p in s["procs"]:
            if p["label"] != "IDLE" or p["pid"] not in labels:
                labels[p["pid"]] = p["label"]
    counts: dict[str, int] = {}
    for lab in labels.values():
        counts[lab] = counts.get(lab, 0) + 1
    out: dict[str, list[tuple[int, float, float]]] = {}

    def add(key: str, s: dict[str, Any], value: float) -> None:
        out.setdefault(key, []).append((s["step"], s["t"], value / MB))

    for s in samples:
        total_rss = total_uss = 0.0
        for p in s["procs"]:
            lab = labels[p["pid"]]
            key = lab if counts[lab] == 1 else f"{lab}[{p['pid']}]"
            add(f"rss/{key}", s, p["rss"])
            if p["uss"] is not None:
                add(f"uss/{key}", s, p["uss"])
                total_uss += p["uss"]
            total_rss += p["rss"]
        if s["procs"]:
            add("rss/<all processes>", s, total_rss)
            add("uss/<all processes>", s, total_uss)
        if s["store"]:
            add("store/used", s, s["store"]["used"])
            out.setdefault("store/objects", []).append((s["step"], s["t"], float(s["store"]["objects"])))
        for k, v in s["disk"].items():
            add(f"disk/{k}", s, v)
        if s["disk"]:
            add("disk/<run dir>", s, sum(v for k, v in s["disk"].items() if not k.startswith("<")))
    return out


def fit(points: list[tuple[int, float, float]], warmup_step: int) -> dict[str, Any]:
    """Least-squares slope (per step and per minute) over the points after the warm-up."""
    pts = [p for p in points if p[0] > warmup_step]
    res: dict[str, Any] = {"n": len(pts), "first": points[0][2] if points else None, "last": points[-1][2] if points else None}
    if len(pts) < 3 or len({p[0] for p in pts}) < 2:
        return {**res, "slope_per_step": None, "slope_per_min": None}

    def slope(xs: list[float], ys: list[float]) -> float:
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        den = sum((x - mx) ** 2 for x in xs)
        return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else float("nan")

    ys = [p[2] for p in pts]
    return {**res, "slope_per_step": slope([float(p[0]) for p in pts], ys), "slope_per_min": 60 * slope([p[1] for p in pts], ys),
            "after_warmup_min": min(ys), "after_warmup_max": max(ys), "steps": [pts[0][0], pts[-1][0]]}


def analyse(samples: list[dict[str, Any]], warmup_frac: float) -> dict[str, Any]:
    last = max((s["step"] for s in samples), default=0)
    warmup = max(1, math.ceil(warmup_frac * last))
    fits = {k: fit(v, warmup) for k, v in series(samples).items()}
    procs = {k: v for k, v in fits.items() if k.startswith("rss/") and not k.endswith(">")}
    ok_procs = all((v["slope_per_step"] or 0.0) < GOAL_MB_PER_STEP for v in procs.values())
    store = fits.get("store/used", {})
    flat = store.get("slope_per_step") is not None and abs(store["slope_per_step"]) < 0.05
    return {"last_step": last, "warmup_step": warmup, "fits": fits,
            "goal": {"mb_per_step": GOAL_MB_PER_STEP, "every_process_below": ok_procs, "store_flat": flat}}


def table(result: dict[str, Any]) -> str:
    fits = result["fits"]
    lines = [f"after warm-up (steps {result['warmup_step'] + 1}..{result['last_step']}); MB unless noted",
             f"{'series':<44}{'first':>9}{'last':>9}{'MB/step':>10}{'MB/min':>9}"]
    for k in sorted(fits, key=lambda k: (k.split("/")[0] != "rss", k.split("/")[0], k)):
        v = fits[k]
        sps, spm = v.get("slope_per_step"), v.get("slope_per_min")
        flag = " !" if k.startswith("rss/") and not k.endswith(">") and (sps or 0) >= GOAL_MB_PER_STEP else ""
        lines.append(f"{k:<44}{v['first'] or 0:>9.1f}{v['last'] or 0:>9.1f}"
                     f"{(f'{sps:+.4f}' if sps is not None else '-'):>10}{(f'{spm:+.2f}' if spm is not None else '-'):>9}{flag}")
    g = result["goal"]
    lines.append(f"goal < {g['mb_per_step']} MB/step for every process: {'met' if g['every_process_below'] else 'NOT met'}; "
                 f"object store flat: {'yes' if g['store_flat'] else 'no'}")
    return "\n".join(lines)


def plot(samples: list[dict[str, Any]], result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ser = series(samples)
    fig, axes = plt.subplots(3, 1, figsize=(10, 11), sharex=True)
    for k, pts in sorted(ser.items()):
        if k.startswith("rss/") and not k.endswith(">") and max(p[2] for p in pts) > 20:
            axes[0].plot([p[0] for p in pts], [p[2] for p in pts], label=k[4:], lw=1)
    axes[0].set_ylabel("RSS (MB)")
    axes[0].legend(fontsize=7, ncol=2)
    if "store/used" in ser:
        pts = ser["store/used"]
        axes[1].plot([p[0] for p in pts], [p[2] for p in pts], label="object store used (MB)", color="C0")
        ax2 = axes[1].twinx()
        objs = ser["store/objects"]
        ax2.plot([p[0] for p in objs], [p[2] for p in objs], label="objects", color="C1", lw=0.8)
        ax2.set_ylabel("objects")
    axes[1].set_ylabel("object store (MB)")
    for k, pts in sorted(ser.items()):
        if k.startswith("disk/") and max(p[2] for p in pts) > 0.05:
            axes[2].plot([p[0] for p in pts], [p[2] for p in pts], label=k[5:], lw=1)
    axes[2].set_ylabel("disk (MB)")
    axes[2].set_xlabel("train step")
    axes[2].legend(fontsize=7, ncol=2)
    for ax in axes:
        ax.axvline(result["warmup_step"], color="grey", ls=":", lw=0.8)
    fig.suptitle(f"soak: {result['last_step']} steps (dotted: end of warm-up)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---- main --------------------------------------------------------------------------------------
def quick_setup(work: Path) -> tuple[str, list[str]]:
    """The demo's model when built, else a random tiny one with generated rows; hf engine."""
    if (ROOT / "artifacts/tiny/config.json").exists():
        over = list(DEMO_OVERRIDES)
    else:
        from slime_rl.tiny import make_dataset, random_tiny_model
        from slime_rl.tiny.task import write_jsonl

        model = random_tiny_model(work / "model")
        data = make_dataset(n_train=64, n_eval=8)
        write_jsonl(data["train"], model / "data" / "train.jsonl")
        write_jsonl(data["eval"], model / "data" / "eval.jsonl")
        over = [f"model.path={model}", f"data.train_path={model / 'data/train.jsonl'}",
                f"data.eval_path={model / 'data/eval.jsonl'}"]
    return DEMO, over + ["rollout.engine=hf", "rollout.n_samples_per_prompt=4", "trainer.global_batch_groups=2",
                         "rollout.max_new_tokens=8", "eval.interval=5", "eval.max_new_tokens=8", "checkpoint.interval=10",
                         "checkpoint.save_hf=false"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", default=DEMO)
    p.add_argument("overrides", nargs="*", help="key=value overrides (default: the demo's model and data)")
    p.add_argument("--minutes", type=float, default=20.0, help="wall clock of the run before SIGINT")
    p.add_argument("--interval-s", type=float, default=5.0, help="seconds between samples")
    p.add_argument("--warmup-frac", type=float, default=0.1, help="share of the steps left out of the slopes")
    p.add_argument("--out-dir", default=None, help="where the run goes (default: a temporary folder)")
    p.add_argument("--stop-timeout-s", type=float, default=300.0, help="longest wait for the run to exit after SIGINT")
    p.add_argument("--json", "--out", dest="out", default=None, help="results JSON (default benchmarks/results/soak.json; --quick: a temporary folder)")
    p.add_argument("--plot", default=None, help="PNG path (default: next to the JSON, soak.png)")
    p.add_argument("--quick", action="store_true", help="smoke run: ~1 minute on the hf engine")
    args = p.parse_args(argv)
    args.out = json_path(args.out, "soak.json", args.quick)
    work = Path(args.out_dir or tempfile.mkdtemp(prefix="slr-soak-"))
    overrides = list(args.overrides) or list(DEMO_OVERRIDES)
    if args.quick:
        args.config, quick = quick_setup(work)
        overrides, args.minutes, args.interval_s = quick + list(args.overrides), min(args.minutes, 1.0), min(args.interval_s, 2.0)
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    samples, info = run(args.config, overrides, args.minutes, args.interval_s, work, args.stop_timeout_s)
    result = analyse(samples, args.warmup_frac)
    print(table(result))
    print(f"run: {info['last_step']} steps in {info['wall_s']:.0f} s, exit {info['exit_code']} ({info['stop_s']:.0f} s to stop); "
          f"sampling took {sum(s['sample_s'] for s in samples) / max(1, len(samples)):.2f} s per sample")
    out = Path(args.out)
    png = Path(args.plot) if args.plot else out.with_suffix(".png")
    try:
        plot(samples, result, png)
    except Exception as e:  # noqa: BLE001 - the JSON is what must be written
        print(f"soak: could not draw {png}: {e}", file=sys.stderr)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "config": args.config, "overrides": overrides, "minutes": args.minutes, "interval_s": args.interval_s,
        "warmup_frac": args.warmup_frac, "quick": args.quick, "started": started, "run": info,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg": os.getloadavg(),
                    "memory_gb": round(psutil.virtual_memory().total / 2**30, 1)},
        **result, "samples": samples,
    }, indent=1, default=str))
    print(f"JSON {out}, plot {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
