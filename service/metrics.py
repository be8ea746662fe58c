"""Prometheus metrics of the server and the engine, served over HTTP on their own port."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    """All series live in one registry owned by this object (tests make their own)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        # `tenant` is a name from the token file, `default` without tenants, or `other` (a
        # certificate-named tenant the file does not know): its values stay bounded
        self.requests = Counter("eagle_requests", "RPCs by method, final status code and "
                                "tenant", ["method", "code", "tenant"], registry=r)
        self.ttft = Histogram("eagle_time_to_first_token_seconds",
                              "Time from request to first text delta", ["tenant"],
                              buckets=_LATENCY, registry=r)
        self.latency = Histogram("eagle_request_seconds", "End-to-end RPC time", ["method"],
                                 buckets=_LATENCY, registry=r)
        self.queue = Histogram("eagle_queue_seconds", "Time a request waited for a running "
                               "slot", ["tenant"], buckets=_LATENCY, registry=r)
        self.prompt_tokens = Counter("eagle_prompt_tokens", "Prompt tokens processed",
                                     ["tenant"], registry=r)
        self.completion_tokens = Counter("eagle_completion_tokens", "Tokens generated",
                                         ["tenant"], registry=r)
        self.refusals = Counter("eagle_refusals", "Calls refused before any work, by tenant "
                                "and the limit they met (capacity: the tenant's running slots "
                                "and queue; max_in_flight, tokens_per_minute: its quotas)",
                                ["tenant", "limit"], registry=r)
        self.vision_tiles = Counter("eagle_vision_tiles", "Image tiles and video frames encoded",
                                    registry=r)
        self.active = Gauge("eagle_rpcs_active", "Chat RPCs in progress", registry=r)

    def bind_engine(self, engine) -> None:
        """Expose the engine's own counts, read from `engine.stats()` at scrape time."""
        self.registry.register(_EngineCollector(engine))

    def serve(self, host: str, port: int):
        """Start the /metrics HTTP server; returns (server, thread)."""
        return start_http_server(port, addr=host, registry=self.registry)


class _EngineCollector:
    """Gauges and counters the engine keeps itself (queue, batch, vision cache, steps)."""

    _GAUGES = {"waiting": ("eagle_queue_depth", "Jobs waiting for the running batch"),
               "running": ("eagle_running_batch_size", "Jobs in the running batch"),
               "in_flight": ("eagle_jobs_in_flight", "Jobs accepted and not yet finished"),
               "kv_blocks_used": ("eagle_kv_blocks_used", "KV cache blocks held by requests"),
               "kv_blocks_cached": ("eagle_kv_blocks_cached",
                                    "KV cache blocks held by none, kept for prefix hits"),
               "kv_blocks_free": ("eagle_kv_blocks_free", "KV cache blocks neither used nor "
                                                          "cached")}
    _COUNTERS = {"steps": ("eagle_decode_steps", "Decode steps of the running batch"),
                 "vision_cache_hits": ("eagle_vision_cache_hits",
                                       "Images and videos whose embeddings came from the cache"),
                 "vision_cache_misses": ("eagle_vision_cache_misses",
                                         "Images and videos encoded by the vision tower"),
                 "grammar_crashes": ("eagle_grammar_compile_crashes",
                                     "Response formats that crashed a grammar compiler process"),
                 "grammar_timeouts": ("eagle_grammar_compile_timeouts",
                                      "Response formats killed at the compile time limit"),
                 "kv_blocks_evicted": ("eagle_kv_blocks_evicted",
                                       "Cached KV blocks whose space was taken for new tokens"),
                 "prefix_prompt_tokens": ("eagle_prefix_cache_queried_tokens",
                                          "Prompt tokens looked up in the prefix cache"),
                 "prefix_hit_tokens": ("eagle_prefix_cache_hit_tokens",
                                       "Prompt tokens found in the prefix cache (not computed)"),
                 "kv_preemptions": ("eagle_kv_preemptions",
                                    "Jobs preempted when the KV pool ran out, computed again"),
                 "engine_restarts": ("eagle_engine_restarts",
                                     "Engine processes started again after one died")}

    def __init__(self, engine) -> None:
        self.engine = engine

    def collect(self):
        stats = self.engine.stats()
        for key, (name, doc) in self._GAUGES.items():
            yield GaugeMetricFamily(name, doc, value=stats.get(key, 0))
        for key, (name, doc) in self._COUNTERS.items():
            yield CounterMetricFamily(name, doc, value=stats.get(key, 0))
