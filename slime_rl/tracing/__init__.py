"""The run's timeline: spans recorded in every actor, one Chrome trace file, optionally OpenTelemetry.

    Tracer (driver, rollout manager; bounded, in memory) ─drain() once per step─► TraceWriter
        ─► <run_dir>/trace.json (Perfetto / chrome://tracing; valid after every flush, bounded)
        └► OtelSink (logging.otel_endpoint; OTLP/HTTP, the `otel` extra)
    slime-rl trace RUN_DIR ─► analyze.summarize ─► where the time went, slowest groups

docs/run.md "Timeline" says what each track and span is; docs/design.md draws the loops the
spans belong to.
"""

from slime_rl.tracing.tracer import SPAN_NAMES, Tracer, lane_tid, track_pid
from slime_rl.tracing.writer import SUMMARY_SPANS, TRACE_FILE, TraceWriter

__all__ = ["SPAN_NAMES", "SUMMARY_SPANS", "TRACE_FILE", "Tracer", "TraceWriter", "lane_tid", "track_pid", "open_writer"]


def open_writer(run_dir, logging_cfg, *, run_name: str = "", resume_step: int | None = None) -> TraceWriter | None:
    """The driver's writer for `logging` config (None when `logging.trace` is off); with
    `logging.otel_endpoint` set its events also go to that collector."""
    if not logging_cfg.trace:
        return None
    sink = None
    if logging_cfg.otel_endpoint:
        from slime_rl.tracing.otel import OtelSink

        sink = OtelSink(logging_cfg.otel_endpoint, run_name=run_name)
    return TraceWriter(
        run_dir, head_steps=logging_cfg.trace_head_steps, tail_steps=logging_cfg.trace_tail_steps,
        flush_s=logging_cfg.trace_flush_s, resume_step=resume_step, sink=sink, run_name=run_name,
    )
