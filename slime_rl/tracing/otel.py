"""The run's spans to an OpenTelemetry collector (`logging.otel_endpoint`, OTLP over HTTP).

    TraceWriter.add(events) ─► OtelSink.export(events) ─► SDK spans (start/end times of the
        Chrome events) ─► BatchSpanProcessor (its own thread) ─► POST <endpoint>/v1/traces

Only the driver talks to the collector: the actors' spans reach it through the driver's drain,
so no actor needs the SDK or network access. One OTel trace per group (its `admit` is the root,
generate / score / filter are its children) and one per trainer step (the `step` span is the
root of buffer_wait / train_step / weight_sync / checkpoint, and of the puts, engine weight loads
and evals collected during that step). Attributes: the Chrome event's args, plus `slime_rl.track`. Counters stay in trace.json.
"""

from __future__ import annotations

import contextvars
import hashlib
import logging
from collections.abc import Iterable
from typing import Any

__all__ = ["OtelSink"]

logger = logging.getLogger(__name__)

_next_ids: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar("slime_rl_otel_ids", default=None)


def _hash(bits: int, *parts: object) -> int:
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=bits // 8).digest()
    return int.from_bytes(digest, "big") or 1


def _attribute(value: Any) -> Any:
    if isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, (str, bool, int, float)) for v in value):
        return list(value)
    return str(value)


class OtelSink:
    """Sends Chrome trace events as OTel spans to an OTLP/HTTP collector.

    Example:
        >>> sink = OtelSink("http://127.0.0.1:4318", run_name="demo")   # doctest: +SKIP
        >>> sink.export(tracer.drain()); sink.close()                    # doctest: +SKIP
    """

    def __init__(self, endpoint: str, *, run_name: str = "", timeout_s: float = 5.0) -> None:
        try:
            from opentelemetry import trace
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
            from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
        except ImportError as e:
            raise ImportError(
                "install slime-rl[otel] (opentelemetry-sdk, opentelemetry-exporter-otlp-proto-http) to use "
                f"logging.otel_endpoint={endpoint!r}"
            ) from e

        class _KeyedIds(RandomIdGenerator):
            """Deterministic ids for the spans other spans hang under (a group's admit, a step)."""

            def generate_span_id(self) -> int:
                ids = _next_ids.get()
                return ids[1] if ids else super().generate_span_id()

            def generate_trace_id(self) -> int:
                ids = _next_ids.get()
                return ids[0] if ids else super().generate_trace_id()

        self._trace = trace
        url = endpoint.rstrip("/")
        self.url = url if url.endswith("/v1/traces") else f"{url}/v1/traces"
        self.run_name = run_name
        self._provider = TracerProvider(
            resource=Resource.create({"service.name": "slime-rl", "slime_rl.run": run_name}),
            id_generator=_KeyedIds(),
        )
        self._provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=self.url, timeout=timeout_s)))
        self._tracer = self._provider.get_tracer("slime_rl.tracing")
        self._tracks: dict[int, str] = {}

    def export(self, events: Iterable[dict[str, Any]]) -> None:
        """Turn spans ("X") and instants ("i") into OTel spans; remember track names ("M")."""
        for e in events:
            ph = e.get("ph")
            if ph == "M":
                if e.get("name") == "process_name":
                    self._tracks[e.get("pid", 0)] = e.get("args", {}).get("name", "")
                continue
            if ph not in ("X", "i"):
                continue
            self._span(e)

    def _span(self, e: dict[str, Any]) -> None:
        from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

        args = e.get("args") or {}
        name = e.get("name", "")
        start_ns = int(e.get("ts", 0)) * 1000
        end_ns = start_ns + int(e.get("dur", 0)) * 1000
        attributes = {k: _attribute(v) for k, v in args.items() if v is not None}
        attributes["slime_rl.track"] = self._tracks.get(e.get("pid", 0), str(e.get("pid", "")))
        if "group_id" in args:
            key: tuple[object, ...] | None = ("group", args["group_id"])
            is_root = name == "admit"
        elif "step" in args:  # every other span of the step it was collected in
            key, is_root = ("step", args["step"]), name == "step"
        else:
            key, is_root = None, True
        context = None
        ids = None
        if key is not None:
            trace_id, root_id = _hash(128, self.run_name, *key), _hash(64, self.run_name, *key)
            if is_root:
                ids = (trace_id, root_id)
            else:
                parent = SpanContext(trace_id, root_id, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED))
                context = self._trace.set_span_in_context(NonRecordingSpan(parent))
        token = _next_ids.set(ids)
        try:
            span = self._tracer.start_span(name, context=context, attributes=attributes, start_time=start_ns)
        finally:
            _next_ids.reset(token)
        span.end(end_time=end_ns)

    def close(self) -> None:
        """Send what is queued and stop the exporter thread."""
        self._provider.shutdown()
