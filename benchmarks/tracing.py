"""What the run's timeline costs: the tracer's spans/s and the per-step cost of the demo's events.

    Tracer.complete / span / instant / counter ──► spans per second (one thread, tight loop)
    one demo step: 8 groups x (admit, generate, score, filter) + put + counters on the rollout
        manager, step / buffer_wait / train_step / weight_sync + update_weights on the driver
        ──► record ─► drain ─► pickle round trip (what Ray does to the drained list)
        ─► TraceWriter.add ─► flush (every step, and amortised at logging.trace_flush_s)
    --ray: the same drain as one real Ray call to an actor that recorded the events
    --otel: OtelSink.export of one step's events (spans built by the SDK; sent by its thread)

    python benchmarks/tracing.py --out benchmarks/results/tracing.json
    python -m benchmarks.tracing --quick --json /tmp/tracing.json   # CI smoke: seconds
"""

from __future__ import annotations

import argparse
import http.server
import json
import pickle
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from slime_rl.tracing import Tracer, TraceWriter

DEMO_STEP_S = 1.03
"""The demo's async step time (docs/BENCHMARKS.md, "The RL run: async vs sync")."""
STEADY_AFTER = 230
"""Steps after which the trace file holds 20 head + 200 tail steps in full (its steady size)."""


def rate(fn: Any, n: int) -> float:
    """Calls per second of fn(i) over n calls (best of 3)."""
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for i in range(n):
            fn(i)
        best = min(best, time.perf_counter() - t0)
    return n / best


def record_step(mgr: Tracer, drv: Tracer, step: int, t: float, groups: int = 8) -> None:
    """The events one demo step produces (times laid out as in a real step: groups overlap)."""
    for g in range(groups):
        gid = f"s{step}-g{g}"
        mgr.instant("admit", t, group_id=gid, prompt=g, engine="engine-0")
        mgr.complete("generate", t + 0.01, t + 0.3 + g * 0.01, track="engine-0", group_id=gid, engine="engine-0",
                     tokens=120, version=step)
        mgr.complete("score", t + 0.3 + g * 0.01, t + 0.32 + g * 0.01, group_id=gid, samples=8)
        mgr.complete("filter", t + 0.32 + g * 0.01, t + 0.321 + g * 0.01, group_id=gid, kept=True, reason="kept")
    mgr.complete("put", t + 0.4, t + 0.41, track="buffer", group_ids=[f"s{step}-g{g}" for g in range(groups)], samples=64)
    mgr.counter("groups_in_flight", groups, t)
    mgr.counter("engines_serving", 1, t)
    mgr.complete("update_weights", t + 0.91, t + 0.95, track="engine-0", version=step)
    drv.complete("buffer_wait", t, t + 0.42, step=step)
    drv.complete("train_step", t + 0.42, t + 0.9, track="trainer-rank0", step=step, version=step, samples=64)
    drv.complete("weight_sync", t + 0.9, t + 0.95, step=step, version=step)
    drv.complete("step", t, t + 1.0, step=step, version=step)


def per_step_costs(steps: int) -> dict[str, float]:
    """Median microseconds per demo step of each stage, with the writer at its steady size."""
    mgr, drv = Tracer("rollout-manager"), Tracer("driver")
    folder = tempfile.mkdtemp(prefix="trace-bench-")
    writer = TraceWriter(folder, head_steps=20, tail_steps=200, flush_s=0)
    stages: dict[str, list[float]] = {k: [] for k in ("record", "drain", "pickle", "add", "flush")}
    t = time.monotonic()
    events_per_step = 0
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        record_step(mgr, drv, step, t)
        t1 = time.perf_counter()
        events = mgr.drain()
        t2 = time.perf_counter()
        events = pickle.loads(pickle.dumps(events, protocol=5))
        t3 = time.perf_counter()
        events += drv.drain()
        writer.add(events, step=step)
        t4 = time.perf_counter()
        writer.flush()
        t5 = time.perf_counter()
        t += 1.0
        events_per_step = len(events)
        if step > STEADY_AFTER:  # the file is at its steady size: 20 head + 200 tail steps in full
            for k, v in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
                v and stages[k].append(v * 1e6)
    size = writer.path.stat().st_size
    out = {f"{k}_us": statistics.median(v) for k, v in stages.items()}
    out["events_per_step"] = float(events_per_step)
    out["file_bytes"] = float(size)
    return out


def ray_drain_us(steps: int) -> float:
    """Median microseconds of one Ray call that drains a step's events from an actor."""
    import ray

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)

    @ray.remote(num_cpus=0)
    class Recorder:
        def __init__(self) -> None:
            self.mgr, self.drv, self.step = Tracer("rollout-manager"), Tracer("driver"), 0

        def record(self) -> None:
            self.step += 1
            record_step(self.mgr, self.drv, self.step, time.monotonic())

        def drain(self) -> list[dict[str, Any]]:
            return self.mgr.drain() + self.drv.drain()

    actor = Recorder.remote()
    times = []
    try:
        for _ in range(steps):
            ray.get(actor.record.remote())
            t0 = time.perf_counter()
            ray.get(actor.drain.remote())
            times.append((time.perf_counter() - t0) * 1e6)
    finally:
        ray.shutdown()
    return statistics.median(times[5:])


def otel_export_us(steps: int) -> float:
    """Median microseconds of OtelSink.export of one step's events (to a local receiver)."""
    from slime_rl.tracing.otel import OtelSink

    class Sink(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    sink = OtelSink(f"http://127.0.0.1:{server.server_address[1]}", run_name="bench")
    mgr, drv = Tracer("rollout-manager"), Tracer("driver")
    times, t = [], time.monotonic()
    for step in range(1, steps + 1):
        record_step(mgr, drv, step, t)
        events = mgr.drain() + drv.drain()
        t0 = time.perf_counter()
        sink.export(events)
        times.append((time.perf_counter() - t0) * 1e6)
        t += 1.0
    sink.close()
    server.shutdown()
    return statistics.median(times[5:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200_000, help="calls per micro-benchmark")
    ap.add_argument("--steps", type=int, default=400, help="demo steps to write (>= 230: the file reaches its steady size)")
    ap.add_argument("--flush-s", type=float, default=5.0, help="logging.trace_flush_s for the amortised cost")
    ap.add_argument("--ray", action="store_true", help="also time the drain as a real Ray call")
    ap.add_argument("--otel", action="store_true", help="also time OtelSink.export")
    ap.add_argument("--json", "--out", dest="out", default=None, help="write the results as JSON here")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2,000 calls per micro-benchmark, 240 steps")
    args = ap.parse_args()
    if args.quick:
        args.n, args.steps = 2000, 240
    if args.n < 1 or args.steps <= STEADY_AFTER:
        raise SystemExit(f"--n must be at least 1 and --steps above {STEADY_AFTER} (the trace file's steady size)")

    tracer = Tracer("rollout-manager", max_events=10**7)
    off = Tracer("rollout-manager", enabled=False)
    t = time.monotonic()

    def drained(fn: Any) -> Any:
        def run(i: int) -> None:
            fn(i)
            if i % 1000 == 999:
                tracer.drain()
        return run

    def span_block(i: int) -> None:
        with tracer.span("score", group_id=i):
            pass

    def off_block(i: int) -> None:
        with off.span("score", group_id=i):
            pass

    rates = {
        "complete (one lane)": rate(drained(lambda i: tracer.complete("generate", t + i, t + i + 0.5, group_id=i, tokens=9)), args.n),
        "complete (8 overlapping lanes)": rate(drained(lambda i: tracer.complete("score", t + i * 0.125, t + i * 0.125 + 1, group_id=i)), args.n),
        "with span()": rate(drained(span_block), args.n),
        "instant": rate(drained(lambda i: tracer.instant("admit", t + i, group_id=i)), args.n),
        "counter": rate(drained(lambda i: tracer.counter("groups_in_flight", i, t + i)), args.n),
        "with span(), tracing off": rate(off_block, args.n),
    }
    step = per_step_costs(args.steps)
    total_every = step["record_us"] + step["drain_us"] + step["pickle_us"] + step["add_us"] + step["flush_us"]
    total_amortised = total_every - step["flush_us"] + step["flush_us"] * min(1.0, DEMO_STEP_S / max(args.flush_s, 1e-9))
    extra: dict[str, float] = {}
    if args.ray:
        extra["ray_drain_call_us"] = ray_drain_us(60)
    if args.otel:
        extra["otel_export_us"] = otel_export_us(60)

    print(f"{'tracer call':<34}{'per second':>14}{'us per call':>13}")
    for name, r in rates.items():
        print(f"{name:<34}{r:>14,.0f}{1e6 / r:>13.2f}")
    print(f"\none demo step: {step['events_per_step']:.0f} events; trace.json at steady size {step['file_bytes'] / 1e6:.2f} MB")
    print(f"{'stage':<44}{'us per step':>12}")
    for k in ("record", "drain", "pickle", "add", "flush"):
        print(f"{k + (' (every step)' if k == 'flush' else ''):<44}{step[k + '_us']:>12.0f}")
    for k, v in extra.items():
        print(f"{k:<44}{v:>12.0f}")
    print(f"{'total, flush every step':<44}{total_every:>12.0f}  = {100 * total_every / 1e6 / DEMO_STEP_S:.3f} % of a {DEMO_STEP_S} s step")
    print(f"{'total, flush every ' + str(args.flush_s) + ' s':<44}{total_amortised:>12.0f}  = "
          f"{100 * total_amortised / 1e6 / DEMO_STEP_S:.3f} % of a {DEMO_STEP_S} s step")
    if args.out:
        result = {
            "machine": platform.platform(), "python": platform.python_version(),
            "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "calls_per_s": rates, "per_step_us": step, "extra_us": extra,
            "total_us_flush_every_step": total_every, "total_us_amortised": total_amortised,
            "demo_step_s": DEMO_STEP_S, "flush_s": args.flush_s,
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
