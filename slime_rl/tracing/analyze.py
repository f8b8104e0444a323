"""`slime-rl trace RUN_DIR`: where the time went, from the spans of `trace.json`.

    trace.json ─► load_trace ─► window(steps A:B) ─► summarize ─► format_report (the CLI prints it)
                                              └──► export_trace (a window as its own trace file)

The split is measured only over steps whose every event is in the file (the writer keeps the
first and last steps in full and only the step spans of the others, slime_rl/tracing/writer.py):
- trainer side: the driver's wall time in those steps, split by its spans (buffer_wait,
  train_step, weight_sync, checkpoint; the rest is `other`);
- rollout side: each engine's time, classed in this order: loading weights (update_weights),
  generating (generate), serving an eval (eval), else idle; plus the manager's own work
  (score, filter, put) as wall time with something of that kind running;
- a group's life: admit -> first generate (queue), generate, score, filter, then the wait for
  its buffer put; and the slowest groups with their engine and tokens.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from slime_rl.tracing.writer import TRACE_FILE, encode_event

__all__ = ["TraceError", "load_trace", "parse_steps", "window", "summarize", "format_report", "export_trace"]

Interval = tuple[float, float]
TRAINER_SPANS = ("buffer_wait", "train_step", "weight_sync", "checkpoint")
ENGINE_CLASSES = ("update_weights", "generate", "eval")


class TraceError(ValueError):
    """A trace file that is missing or unreadable, or a bad `--steps`; the message says which."""


def load_trace(path: str | Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Events and `otherData.slime_rl` of a run directory's trace.json (or of a trace file)."""
    p = Path(path)
    if p.is_dir():
        p = p / TRACE_FILE
    if not p.exists():
        raise TraceError(f"{p} does not exist (the run had logging.trace: false, or wrote no step yet)")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
        events = data["traceEvents"] if isinstance(data, dict) else data
    except (ValueError, KeyError) as e:
        raise TraceError(f"{p} is not a Chrome trace (JSON with traceEvents): {e}") from e
    info = data.get("otherData", {}).get("slime_rl", {}) if isinstance(data, dict) else {}
    return [e for e in events if isinstance(e, dict)], info


def parse_steps(text: str) -> tuple[int | None, int | None]:
    """`A:B`, `A:` or `:B` (inclusive) -> (A, B)."""
    a, sep, b = text.partition(":")
    try:
        if not sep:
            raise ValueError
        first, last = (int(a) if a.strip() else None), (int(b) if b.strip() else None)
    except ValueError:
        raise TraceError(f"--steps must be A:B, A: or :B with whole step numbers (e.g. 10:20), got {text!r}") from None
    if first is not None and last is not None and first > last:
        raise TraceError(f"--steps {text}: the first step is after the last")
    return first, last


def _step(e: dict[str, Any]) -> int | None:
    s = (e.get("args") or {}).get("step")
    return s if isinstance(s, int) else None


def _end(e: dict[str, Any]) -> float:
    return e.get("ts", 0) + e.get("dur", 0)


def window(events: Sequence[dict[str, Any]], first: int | None, last: int | None) -> list[dict[str, Any]]:
    """The events of steps first..last: metadata, events tagged with those steps, and counters
    inside the time those steps took."""
    if first is None and last is None:
        return list(events)
    lo, hi = first if first is not None else -(10**18), last if last is not None else 10**18
    steps = [e for e in events if e.get("ph") == "X" and e.get("name") == "step" and lo <= (_step(e) or 0) <= hi]
    t0 = min((e["ts"] for e in steps), default=None)
    t1 = max((_end(e) for e in steps), default=None)
    out = []
    for e in events:
        ph = e.get("ph")
        if ph == "M":
            out.append(e)
        elif ph == "C":
            if t0 is not None and t0 <= e.get("ts", 0) <= t1:
                out.append(e)
        elif _step(e) is not None and lo <= _step(e) <= hi:
            out.append(e)
    return out


def export_trace(events: Iterable[dict[str, Any]], path: str | Path, info: dict[str, Any] | None = None) -> Path:
    """Write events as a Chrome trace file (opens in Perfetto)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    body = ",\n".join(encode_event(e) for e in events)
    p.write_text(f'{{"traceEvents":[\n{body}\n],"displayTimeUnit":"ms","otherData":{json.dumps({"slime_rl": info or {}})}}}\n',
                 encoding="utf-8")
    return p


# ---- interval arithmetic -----------------------------------------------------------------------
def _union(intervals: Iterable[Interval]) -> list[Interval]:
    out: list[list[float]] = []
    for s, e in sorted(intervals):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


def _covered(intervals: Iterable[Interval], within: list[Interval]) -> float:
    """Length of the union of `intervals` inside the (merged) `within`."""
    a, total, j = _union(intervals), 0.0, 0
    for s, e in a:
        while j < len(within) and within[j][1] <= s:
            j += 1
        k = j
        while k < len(within) and within[k][0] < e:
            total += max(0.0, min(e, within[k][1]) - max(s, within[k][0]))
            k += 1
    return total


# ---- the report ----------------------------------------------------------------------------------
@dataclasses.dataclass
class GroupLife:
    group_id: str
    step: int | None = None
    engine: str = ""
    tokens: int = 0
    admit: float | None = None
    start: float = float("inf")
    end: float = float("-inf")
    generate_s: float = 0.0
    first_generate: float | None = None
    score_s: float = 0.0
    filter_s: float = 0.0
    filter_end: float | None = None
    put_end: float | None = None
    kept: Any = None

    @property
    def e2e_s(self) -> float:
        begin = self.admit if self.admit is not None else self.start
        return (self.put_end if self.put_end is not None else self.end) - begin


@dataclasses.dataclass
class TraceReport:
    steps: list[int]
    detailed_steps: list[int]
    step_s: list[float]
    wall_s: float
    trainer: dict[str, float]
    engines: list[str]
    engine: dict[str, float]
    manager: dict[str, float]
    groups: list[GroupLife]
    life: dict[str, float]
    info: dict[str, Any]


def summarize(events: Sequence[dict[str, Any]], info: dict[str, Any] | None = None) -> TraceReport:
    """Measure the split and every group's life from the events of a trace (or a window)."""
    tracks = {e.get("pid"): (e.get("args") or {}).get("name", "") for e in events
              if e.get("ph") == "M" and e.get("name") == "process_name"}
    spans = [e for e in events if e.get("ph") == "X"]
    step_spans = {(_step(e) or 0): e for e in spans if e.get("name") == "step"}
    detailed = sorted({_step(e) for e in spans if e.get("name") != "step" and _step(e) in step_spans})
    within = _union((step_spans[s]["ts"] / 1e6, _end(step_spans[s]) / 1e6) for s in detailed)
    if not step_spans:  # no trainer (rollout-only trace, or a window without steps): all of it
        within = _union((e["ts"] / 1e6, _end(e) / 1e6) for e in spans)
        within = [(within[0][0], within[-1][1])] if within else []
    wall = sum(e - s for s, e in within)

    def iv(es: Iterable[dict[str, Any]]) -> list[Interval]:
        return [(e["ts"] / 1e6, _end(e) / 1e6) for e in es]

    by_name: dict[str, list[dict[str, Any]]] = {}
    for e in spans:
        by_name.setdefault(e.get("name", ""), []).append(e)
    trainer = {n: _covered(iv(by_name.get(n, [])), within) for n in TRAINER_SPANS}
    trainer["eval"] = _covered(iv(e for e in by_name.get("eval", []) if tracks.get(e.get("pid")) == "driver"), within)
    trainer["other"] = max(0.0, wall - sum(trainer.values()))

    engines = sorted({tracks.get(e.get("pid"), "") for e in spans if e.get("name") in ("generate", "update_weights")} - {""},
                     key=lambda t: (len(t), t))
    eval_iv = iv(by_name.get("eval", []))
    engine = dict.fromkeys((*ENGINE_CLASSES, "idle"), 0.0)
    for name in engines:
        mine = {c: iv(e for e in by_name.get(c, []) if tracks.get(e.get("pid")) == name) for c in ENGINE_CLASSES[:2]}
        upto = 0.0
        acc: list[Interval] = []
        for c, extra in (("update_weights", mine["update_weights"]), ("generate", mine["generate"]), ("eval", eval_iv)):
            acc = acc + extra
            covered = _covered(acc, within)
            engine[c] += covered - upto
            upto = covered
        engine["idle"] += wall - upto
    manager = {n: _covered(iv(by_name.get(n, [])), within) for n in ("score", "filter", "put")}

    groups = _groups(events, tracks)
    done = [g for g in groups.values() if g.admit is not None and g.put_end is not None and g.first_generate is not None]
    life = {}
    if done:
        life = {
            "queue": statistics.fmean(g.first_generate - g.admit for g in done),
            "generate": statistics.fmean(g.generate_s for g in done),
            "score": statistics.fmean(g.score_s for g in done),
            "filter": statistics.fmean(g.filter_s for g in done),
            "wait_put": statistics.fmean(g.put_end - (g.filter_end or g.put_end) for g in done),
            "e2e": statistics.fmean(g.e2e_s for g in done),
            "groups": float(len(done)),
        }
    ordered = sorted(step_spans)
    return TraceReport(
        steps=ordered, detailed_steps=detailed, step_s=[step_spans[s].get("dur", 0) / 1e6 for s in ordered],
        wall_s=wall, trainer=trainer, engines=engines, engine=engine, manager=manager,
        groups=sorted(groups.values(), key=lambda g: (-g.e2e_s, -g.generate_s)), life=life, info=info or {},
    )


def _groups(events: Sequence[dict[str, Any]], tracks: dict[Any, str]) -> dict[str, GroupLife]:
    groups: dict[str, GroupLife] = {}
    for e in events:
        args = e.get("args") or {}
        ph, name = e.get("ph"), e.get("name")
        ids = [args["group_id"]] if "group_id" in args else list(args.get("group_ids") or []) if name == "put" else []
        for gid in ids:
            g = groups.get(str(gid))
            if g is None:
                g = groups[str(gid)] = GroupLife(str(gid))
            ts, end = e.get("ts", 0) / 1e6, _end(e) / 1e6
            g.start, g.end = min(g.start, ts), max(g.end, end)
            if g.step is None or name == "put":
                g.step = _step(e)
            if name == "admit":
                g.admit = ts
            elif name == "generate" and ph == "X":
                g.generate_s += end - ts
                g.first_generate = ts if g.first_generate is None else min(g.first_generate, ts)
                g.engine = str(args.get("engine") or tracks.get(e.get("pid"), ""))
                g.tokens += int(args.get("tokens") or 0)
            elif name == "score":
                g.score_s += end - ts
            elif name == "filter":
                g.filter_s += end - ts
                g.filter_end = end
                g.kept = args.get("kept", g.kept)
            elif name == "put":
                g.put_end = end
    return groups


def _pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:5.1f} %" if whole > 0 else "    - "


def _ranges(steps: Sequence[int]) -> str:
    out, run = [], []
    for s in steps:
        if run and s != run[-1] + 1:
            out.append(run)
            run = []
        run.append(s)
    if run:
        out.append(run)
    return ", ".join(f"{r[0]}" if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in out) or "none"


def format_report(r: TraceReport, top: int = 10) -> str:
    """The text `slime-rl trace` prints."""
    lines = []
    if r.steps:
        med = statistics.median(r.step_s)
        lines.append(f"steps {r.steps[0]}-{r.steps[-1]} ({len(r.steps)} steps; step time median {med:.3f} s, "
                     f"max {max(r.step_s):.3f} s); every event kept for steps {_ranges(r.detailed_steps)}")
    lines.append(f"where the time went (over {r.wall_s:.2f} s of wall time with every event):")
    lines.append("  trainer side (the driver's wall time)")
    for name in (*TRAINER_SPANS, "eval", "other"):
        lines.append(f"    {name:<16}{r.trainer[name]:9.2f} s  {_pct(r.trainer[name], r.wall_s)}")
    cap = r.wall_s * len(r.engines)
    lines.append(f"  rollout side ({len(r.engines)} engine(s) x {r.wall_s:.2f} s = {cap:.2f} engine-s)")
    for name, label in (("generate", "generation"), ("update_weights", "weight sync"), ("eval", "eval"), ("idle", "idle")):
        lines.append(f"    {label:<16}{r.engine[name]:9.2f} s  {_pct(r.engine[name], cap)}")
    lines.append("  rollout manager (wall time with any of it running)")
    for name, label in (("score", "scoring"), ("filter", "filter"), ("put", "buffer put")):
        lines.append(f"    {label:<16}{r.manager[name]:9.2f} s  {_pct(r.manager[name], r.wall_s)}")
    if r.life:
        lf = r.life
        lines.append(f"  a group's life (mean of {int(lf['groups'])} groups, admit -> buffer put: {lf['e2e']:.3f} s): "
                     f"queue {lf['queue']:.3f} s, generate {lf['generate']:.3f} s, score {lf['score']:.3f} s, "
                     f"filter {lf['filter']:.3f} s, wait for the put {lf['wait_put']:.3f} s")
    if r.groups and top > 0:
        lines.append(f"slowest groups (top {min(top, len(r.groups))} of {len(r.groups)}, admit -> put):")
        lines.append(f"    {'group_id':<24}{'step':>6}  {'engine':<10}{'tokens':>8}{'e2e s':>9}{'generate s':>12}"
                     f"{'score s':>9}  kept")
        for g in r.groups[:top]:
            kept = "" if g.kept is None else ("yes" if g.kept else "no")
            lines.append(f"    {g.group_id:<24}{g.step if g.step is not None else '-':>6}  {g.engine or '-':<10}"
                         f"{g.tokens:>8}{g.e2e_s:>9.3f}{g.generate_s:>12.3f}{g.score_s:>9.3f}  {kept}")
    if r.info.get("dropped_events"):
        lines.append(f"note: {r.info['dropped_events']} events were dropped (more than the writer keeps per step)")
    return "\n".join(lines) + "\n"
