"""The run's timeline: Chrome trace events, trace.json (valid when killed, bounded), `slime-rl trace`, OTLP."""

from __future__ import annotations

import gzip
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from slime_rl import cli
from slime_rl.config import LoggingConfig
from slime_rl.tracing import Tracer, TraceWriter, open_writer
from slime_rl.tracing.analyze import load_trace, summarize, window

pytestmark = [pytest.mark.timeout(120)]


def fake_run(writer: TraceWriter, steps: int, *, groups: int = 8, engines: int = 2, start: float | None = None,
             first_step: int = 1) -> float:
    """A synthetic run with known timings: per 1 s step, groups generate 0.3 s (+10 ms per group
    index) on alternating engines, score 20 ms, filter 1 ms, one put at 0.4 s; the trainer waits
    0.42 s, trains 0.48 s, syncs 0.05 s. Returns the clock after the last step."""
    drv, mgr = Tracer("driver"), Tracer("rollout-manager")
    t = time.monotonic() if start is None else start
    for step in range(first_step, first_step + steps):
        for g in range(groups):
            gid, eng = f"s{step}-g{g}", f"engine-{g % engines}"
            mgr.instant("admit", t, group_id=gid, prompt=g)
            mgr.complete("generate", t + 0.01, t + 0.3 + g * 0.01, track=eng, group_id=gid, engine=eng, tokens=100 + g)
            mgr.complete("score", t + 0.3 + g * 0.01, t + 0.32 + g * 0.01, group_id=gid, samples=8)
            mgr.complete("filter", t + 0.32 + g * 0.01, t + 0.321 + g * 0.01, group_id=gid, kept=True)
        mgr.complete("put", t + 0.4, t + 0.41, track="buffer", group_ids=[f"s{step}-g{g}" for g in range(groups)])
        mgr.counter("groups_in_flight", groups, t)
        drv.complete("buffer_wait", t, t + 0.42)
        drv.complete("train_step", t + 0.42, t + 0.9, track="trainer-rank0", version=step)
        drv.complete("weight_sync", t + 0.9, t + 0.95, version=step)
        for e in range(engines):
            mgr.complete("update_weights", t + 0.91, t + 0.95, track=f"engine-{e}", version=step)
        drv.complete("step", t, t + 1.0, step=step, version=step)
        t += 1.0
        writer.add(drv.drain() + mgr.drain(), step=step)
        writer.flush()
    return t


def check_chrome_events(events: list[dict[str, Any]]) -> None:
    """Every event has the fields its phase needs, and spans on one thread nest properly."""
    by_thread: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for e in events:
        assert e["ph"] in ("X", "i", "C", "M"), e
        assert isinstance(e["pid"], int) and isinstance(e["name"], str)
        if e["ph"] != "M":
            assert isinstance(e["ts"], int) and e["ts"] > 1e15, e  # wall-clock microseconds
        if e["ph"] in ("X", "i", "M"):
            assert isinstance(e["tid"], int)
        if e["ph"] == "X":
            assert isinstance(e["dur"], int) and e["dur"] >= 0
            by_thread.setdefault((e["pid"], e["tid"]), []).append((e["ts"], e["ts"] + e["dur"]))
    for spans in by_thread.values():
        stack: list[int] = []
        for s, end in sorted(spans, key=lambda se: (se[0], -se[1])):
            while stack and stack[-1] <= s:
                stack.pop()
            assert not stack or end <= stack[-1], f"spans overlap without nesting on one thread: {spans}"
            stack.append(end)


def test_tracer_events_are_valid_chrome_trace_with_named_tracks(tmp_path: Path) -> None:
    tracer = Tracer("rollout-manager")
    with tracer.span("eval", version=3) as s:
        with tracer.span("score", group_id="g1"):
            pass
        s.args["accuracy"] = 0.5
    t0 = tracer.now()
    tracer.complete("generate", t0, t0 + 0.25, track="engine-1", group_id="g1", engine="engine-1", tokens=42)
    tracer.instant("admit", group_id="g2")
    tracer.counter("engines_serving", 2)
    events = tracer.drain()
    check_chrome_events(events)
    names = {(e["name"], e["args"]["name"]) for e in events if e["ph"] == "M" and "name" in e["args"]}
    assert {("process_name", "rollout-manager"), ("thread_name", "rollout-manager"),
            ("process_name", "engine-1"), ("thread_name", "engine-1")} <= names
    spans = {e["name"]: e for e in events if e["ph"] == "X"}
    assert spans["generate"]["dur"] == 250_000 and spans["generate"]["args"]["tokens"] == 42
    assert spans["eval"]["args"] == {"version": 3, "accuracy": 0.5}
    assert spans["eval"]["tid"] == spans["score"]["tid"]  # nested: one lane
    assert spans["generate"]["pid"] != spans["eval"]["pid"]  # one track per actor
    assert tracer.drain() == []

    writer = TraceWriter(tmp_path, flush_s=0)
    writer.add(events, step=1)
    writer.close()
    data = json.loads((tmp_path / "trace.json").read_text())
    check_chrome_events(data["traceEvents"])
    assert all(e["args"]["step"] == 1 for e in data["traceEvents"] if e["ph"] in ("X", "i"))


def test_overlapping_spans_take_lanes_and_stay_nested() -> None:
    tracer = Tracer("rollout-manager")
    t = tracer.now()
    for g in range(8):  # eight groups scoring at once, each with a nested filter span
        tracer.complete("filter", t + g * 0.01 + 0.05, t + g * 0.01 + 0.06, group_id=g)
        tracer.complete("score", t + g * 0.01, t + g * 0.01 + 0.1, group_id=g)
    events = tracer.drain()
    check_chrome_events(events)
    lanes = {e["tid"] for e in events if e["ph"] == "X"}
    assert 2 <= len(lanes) <= 8
    threads = [e for e in events if e["ph"] == "M" and e["name"] == "thread_name"]
    assert len(threads) == len(lanes) and any(e["args"]["name"] == "rollout-manager #2" for e in threads)


def test_disabled_and_bounded_tracer() -> None:
    off = Tracer("driver", enabled=False)
    with off.span("step", step=1) as s:
        s.args["x"] = 1
    off.complete("train_step", 0.0, 1.0)
    off.counter("c", 1)
    assert off.drain() == []

    small = Tracer("driver", max_events=10)
    for i in range(25):
        small.instant("admit", group_id=i)
    events = small.drain()
    assert [e["args"]["group_id"] for e in events if e["ph"] == "i"] == list(range(15, 25))
    assert small.dropped == 15
    assert [e["args"]["value"] for e in events if e["name"] == "trace/dropped_events"] == [15]


_KILLED_WRITER = """
import sys, time
from slime_rl.tracing import Tracer, TraceWriter
w = TraceWriter(sys.argv[1], head_steps=3, tail_steps=5, flush_s=0)
t = Tracer("driver")
step = 0
while True:
    step += 1
    for g in range(200):
        t.complete("generate", 0.0, 0.1, track="engine-0", group_id=f"{step}-{g}", payload="x" * 200)
    t.complete("step", 0.0, 1.0, step=step)
    w.add(t.drain(), step=step)
    w.flush()
    print(step, flush=True)
"""


def test_trace_file_stays_valid_when_the_writer_is_killed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(8):  # several flushes of ~100 KB each, then SIGKILL at a random point of one
            assert proc.stdout.readline()
        time.sleep(0.013)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    events, info = load_trace(tmp_path)
    check_chrome_events(events)
    assert info["last_step"] >= 8 and any(e["name"] == "step" for e in events)

    # A flush that dies half-way (disk full, killed inside write) leaves the previous file whole.
    writer = TraceWriter(tmp_path / "b", flush_s=0)
    fake_run(writer, 2)
    before = (tmp_path / "b" / "trace.json").read_text()
    writer.add([{"name": "step", "ph": "X", "ts": 2 * 10**15, "dur": 1, "pid": 1, "tid": 1, "args": {}}], step=3)

    def boom(*a: Any, **k: Any) -> None:
        raise OSError("simulated crash inside the flush")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        writer.flush(force=True)
    assert (tmp_path / "b" / "trace.json").read_text() == before
    json.loads(before)


def test_size_bound_holds_on_a_long_run(tmp_path: Path) -> None:
    writer = TraceWriter(tmp_path, head_steps=5, tail_steps=20, flush_s=3600)
    fake_run(writer, 600)
    path = writer.close()
    events, info = load_trace(path)
    steps = {e["args"]["step"] for e in events if e["ph"] == "X" and e["name"] == "step"}
    detailed = {e["args"]["step"] for e in events if e["ph"] == "X" and e["name"] != "step"}
    assert steps == set(range(1, 601))  # every step's summary span
    assert detailed == set(range(1, 6)) | set(range(581, 601))  # head and tail in full
    per_step = path.stat().st_size / 600
    assert path.stat().st_size < 25 * 60 * 250 + 600 * 300, per_step  # 25 full steps + one summary span per step
    assert info["summary_only_steps"] == 575


def test_resumed_run_continues_the_trace(tmp_path: Path) -> None:
    writer = TraceWriter(tmp_path, head_steps=3, tail_steps=4, flush_s=0)
    t = fake_run(writer, 10)
    writer.close()
    resumed = TraceWriter(tmp_path, head_steps=3, tail_steps=4, flush_s=0, resume_step=6)
    fake_run(resumed, 2, start=t + 5, first_step=7)
    events, info = load_trace(resumed.close())
    steps = sorted(e["args"]["step"] for e in events if e["ph"] == "X" and e["name"] == "step")
    assert steps == list(range(1, 9)) and info["last_step"] == 8
    check_chrome_events(events)


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    writer = TraceWriter(tmp_path, head_steps=3, tail_steps=3, flush_s=0, run_name="fake")
    fake_run(writer, 8)
    writer.close()
    return tmp_path


def test_cli_trace_prints_the_split_and_the_slowest_groups(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["trace", str(run_dir), "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "every event kept for steps 1-3, 6-8" in out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("    ")}
    # 6 full steps of 1 s: the trainer waits 0.42 s, trains 0.48 s, syncs 0.05 s per step
    assert "2.52 s" in lines["buffer_wait"] and "42.0 %" in lines["buffer_wait"]
    assert "2.88 s" in lines["train_step"] and "48.0 %" in lines["train_step"]
    assert "0.30 s" in lines["weight_sync"] and "5.0 %" in lines["other"]
    # engine-0 generates groups 0,2,4,6 (0.01 .. 0.36 s), engine-1 groups 1,3,5,7 (0.01 .. 0.37 s)
    assert "4.26 s" in lines["generation"] and "35.5 %" in lines["generation"]
    assert "0.48 s" in lines["weight"]  # 2 engines x 0.04 s x 6 steps
    # the slowest group: the last index (0.37 s of generation on engine-1, 107 tokens); all end at the put
    slow = [line for line in out.splitlines() if line.strip().startswith("s") and "engine-" in line]
    assert len(slow) == 3 and all("0.410" in line for line in slow)
    assert "a group's life (mean of 48 groups" in out and "queue 0.010 s" in out


def test_cli_trace_exports_a_window_of_steps(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_file = tmp_path / "win" / "steps.json"
    assert cli.main(["trace", str(run_dir), "--steps", "2:3", "--export", str(out_file), "--top", "0"]) == 0
    events, _ = load_trace(out_file)
    check_chrome_events(events)
    assert {e["args"]["step"] for e in events if e["ph"] in ("X", "i")} == {2, 3}
    assert any(e["ph"] == "M" for e in events) and any(e["ph"] == "C" for e in events)
    report = summarize(events)
    assert report.steps == [2, 3] and len(report.groups) == 16
    assert "steps 2-3 (2 steps" in capsys.readouterr().out
    assert window(events, None, None) == events


def test_cli_trace_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["trace", str(tmp_path)]) == 2
    assert "trace.json does not exist" in capsys.readouterr().err
    (tmp_path / "trace.json").write_text('{"traceEvents": [')
    assert cli.main(["trace", str(tmp_path)]) == 2
    assert "is not a Chrome trace" in capsys.readouterr().err
    assert cli.main(["trace", str(tmp_path), "--steps", "5"]) == 2
    assert "--steps must be A:B" in capsys.readouterr().err


class _OtlpReceiver(http.server.BaseHTTPRequestHandler):
    """Accepts POST /v1/traces and decodes the protobuf like a collector would."""

    received: list[tuple[str, Any]] = []

    def do_POST(self) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )

        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        self.received.append((self.path, request))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def otlp_receiver() -> Iterator[tuple[str, list[tuple[str, Any]]]]:
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http.trace_exporter")
    handler = type("Receiver", (_OtlpReceiver,), {"received": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", handler.received
    server.shutdown()
    server.server_close()


def test_otlp_export_reaches_a_local_receiver(tmp_path: Path, otlp_receiver: tuple[str, list[Any]]) -> None:
    url, received = otlp_receiver
    cfg = LoggingConfig(otel_endpoint=url, trace_head_steps=1, trace_tail_steps=1)
    writer = open_writer(tmp_path, cfg, run_name="otel-run")
    fake_run(writer, 2, groups=2)
    writer.close()
    assert {path for path, _ in received} == {"/v1/traces"}
    spans, resources = [], []
    for _, request in received:
        for rs in request.resource_spans:
            resources.append({a.key: a.value.string_value for a in rs.resource.attributes})
            spans += [sp for ss in rs.scope_spans for sp in ss.spans]
    assert resources[0]["service.name"] == "slime-rl" and resources[0]["slime_rl.run"] == "otel-run"
    by_name: dict[str, list[Any]] = {}
    for sp in spans:
        by_name.setdefault(sp.name, []).append(sp)
    assert {n: len(v) for n, v in by_name.items()} == {
        "admit": 4, "generate": 4, "score": 4, "filter": 4, "put": 2, "buffer_wait": 2, "train_step": 2,
        "weight_sync": 2, "update_weights": 4, "step": 2}
    gen = next(sp for sp in by_name["generate"] if _attrs(sp)["group_id"] == "s1-g1")
    expected = {"engine": "engine-1", "tokens": 101, "step": 1, "slime_rl.track": "engine-1"}
    assert _attrs(gen).items() >= expected.items()
    assert abs((gen.end_time_unix_nano - gen.start_time_unix_nano) / 1e9 - 0.30) < 1e-5
    admit = next(sp for sp in by_name["admit"] if _attrs(sp)["group_id"] == "s1-g1")
    assert gen.trace_id == admit.trace_id and gen.parent_span_id == admit.span_id  # one trace per group
    step = next(sp for sp in by_name["step"] if _attrs(sp)["step"] == 2)
    train = next(sp for sp in by_name["train_step"] if _attrs(sp)["step"] == 2)
    assert train.parent_span_id == step.span_id and train.trace_id == step.trace_id  # one trace per step
    assert (tmp_path / "trace.json").exists()


def _attrs(span: Any) -> dict[str, Any]:
    out = {}
    for a in span.attributes:
        v = a.value
        out[a.key] = getattr(v, v.WhichOneof("value"))
    return out


def test_otel_config_checks_and_missing_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="must be an http"):
        LoggingConfig(otel_endpoint="127.0.0.1:4318").validate()
    with pytest.raises(ValueError, match="trace is false"):
        LoggingConfig(otel_endpoint="http://127.0.0.1:4318", trace=False).validate()
    assert open_writer("/nonexistent", LoggingConfig(trace=False)) is None
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.http.trace_exporter", None)
    from slime_rl.tracing.otel import OtelSink

    with pytest.raises(ImportError, match=r"slime-rl\[otel\]"):
        OtelSink("http://127.0.0.1:4318")
