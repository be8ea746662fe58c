"""OpenTelemetry tracing: the RPC span from opentelemetry-instrumentation-grpc, and a child
span for each stage of the request (preprocess with media decode and tiling, queue, vision,
prefill, decode).

Off unless the standard variables ask for it: OTEL_TRACES_EXPORTER (`otlp`, `console`, a
comma list; `none` is off) or an OTLP endpoint (OTEL_EXPORTER_OTLP_ENDPOINT,
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT); OTEL_SDK_DISABLED=true wins. The SDK reads the rest
itself: OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES, OTEL_TRACES_SAMPLER (parent-based
by default, so a caller's sampling decision in its W3C `traceparent` is followed),
OTEL_EXPORTER_OTLP_* and OTEL_BSP_*. OpenTelemetry is imported only when tracing is on.

The stages run in the engine process, which has no exporter of its own: it times them
(wall clock, which both processes share) and sends them back with the job's last event;
here they become spans under the RPC span, so one trace holds the whole request.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from service import __version__
from service.engine.job import Stage

log = logging.getLogger(__name__)
_OFF = {"", "none"}


def wanted(env: Mapping[str, str]) -> bool:
    """Whether the OTEL_* variables in `env` switch tracing on."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporters:
        return exporters not in _OFF
    return bool(env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or
                env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


class Tracing:
    """A tracer provider, the server interceptor made from it, and the stage spans."""

    def __init__(self, provider: Any) -> None:
        from opentelemetry import trace

        self.provider = provider
        self.tracer = provider.get_tracer("eagle-grpc", __version__)
        self._trace = trace

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Tracing | None:
        """The tracing the environment asks for, or None when it is off."""
        if not wanted(env):
            return None
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        resource = Resource.create()
        if resource.attributes.get("service.name", "").startswith("unknown_service"):
            resource = resource.merge(Resource({"service.name": "eagle-grpc"}))
        provider = TracerProvider(resource=resource)
        names = env.get("OTEL_TRACES_EXPORTER", "").strip().lower() or "otlp"
        for name in (n.strip() for n in names.split(",")):
            if name not in _OFF:
                provider.add_span_processor(BatchSpanProcessor(_exporter(name, env)))
        log.info("tracing on", extra={"exporters": names,
                                      "service_name": resource.attributes["service.name"]})
        return cls(provider)

    def interceptor(self) -> Any:
        """The RPC span for every call but health checks and reflection (a Kubernetes probe
        every few seconds would bury the traces that matter)."""
        from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters

        quiet = filters.any_of(filters.health_check(), filters.service_prefix("grpc.reflection"))
        return aio_server_interceptor(self.provider, filter_=filters.negate(quiet))

    def asgi(self, app: Any) -> Any:
        """The HTTP port's application with a server span per request (the caller's
        traceparent continued), health checks left out as on the gRPC port."""
        from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

        return OpenTelemetryMiddleware(app, tracer_provider=self.provider,
                                       excluded_urls="/healthz,/readyz",
                                       exclude_spans=["receive", "send"])

    def current_span(self) -> Any:
        return self._trace.get_current_span()

    def record(self, parent: Any, stages: Sequence[Stage]) -> None:
        """The engine's stages as spans under `parent` (the RPC span), nested by `parent`."""
        if not parent.is_recording():
            return
        context = self._trace.set_span_in_context(parent)
        made: dict[str, Any] = {}
        # a stage's parent ends after its children, so it comes later in the list
        for stage in sorted(stages, key=lambda s: (bool(s.parent), s.start_ns)):
            ctx = self._trace.set_span_in_context(made[stage.parent]) \
                if stage.parent in made else context
            span = self.tracer.start_span(stage.name, context=ctx, start_time=stage.start_ns,
                                          attributes=dict(stage.attributes))
            if stage.error:
                span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, stage.error))
            span.end(end_time=max(stage.end_ns, stage.start_ns))
            made.setdefault(stage.name, span)

    def failed(self, span: Any, code: Any, message: str) -> None:
        """Mark the RPC span as failed with the gRPC status the call ends with."""
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        span.set_status(self._trace.Status(self._trace.StatusCode.ERROR,
                                           f"{code.name}: {message}"))

    def shutdown(self) -> None:
        self.provider.shutdown()


def _exporter(name: str, env: Mapping[str, str]) -> Any:
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if name != "otlp":
        raise ValueError(f"OTEL_TRACES_EXPORTER={name!r} is not supported: use otlp, console "
                         f"or none")
    protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
                       env.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")).strip().lower()
    try:
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError:
        raise ValueError("the OTLP exporter is not installed: pip install "
                         "'eagle-grpc[otlp]' (or set OTEL_TRACES_EXPORTER=console)") from None
    return OTLPSpanExporter()


__all__ = ["Tracing", "wanted"]
