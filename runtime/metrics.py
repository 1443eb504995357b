"""Prometheus metrics for the server (prometheus-client, the ``serve`` extra).

Gauges and counters are read from the engine when /metrics is scraped (a collector), so the
engine thread keeps plain integers; latency histograms are observed by the engine thread as
tokens come out (``EngineMetrics`` hooks). Every server has its own registry.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .engine import EngineMetrics

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)


class _EngineCollector:
    def __init__(self, async_engine):
        self.async_engine = async_engine

    def collect(self):
        engine = self.async_engine.engine
        blocks = engine.blocks
        g = GaugeMetricFamily
        yield g("llmc_requests_running", "Requests in the running batch", value=engine.num_running)
        yield g("llmc_requests_waiting", "Requests waiting to be scheduled", value=engine.num_waiting)
        yield g("llmc_kv_blocks_used", "KV cache blocks held by requests", value=blocks.num_used)
        yield g("llmc_kv_blocks_total", "KV cache blocks in the pool", value=blocks.num_blocks)
        yield g("llmc_kv_blocks_cached", "KV cache blocks registered in the prefix cache", value=blocks.num_cached)
        queries, hits = blocks.prefix_queries, blocks.prefix_hits
        yield g("llmc_prefix_cache_hit_rate", "Prefix cache hits / full prompt blocks looked up",
                value=hits / queries if queries else 0.0)
        c = CounterMetricFamily
        yield c("llmc_prefix_cache_queries", "Full prompt blocks looked up in the prefix cache", value=queries)
        yield c("llmc_prefix_cache_hits", "Full prompt blocks found in the prefix cache", value=hits)
        yield c("llmc_prefix_cache_partial_hits", "Prompts that also reused a partly filled block (copied)",
                value=blocks.partial_hits)
        yield c("llmc_preemptions", "Requests preempted (recomputed later) for lack of KV blocks",
                value=engine.scheduler.num_preemptions)
        yield c("llmc_generation_tokens", "Tokens generated", value=engine.generation_tokens)
        yield c("llmc_prompt_tokens", "Prompt tokens of requests that produced a token", value=engine.prompt_tokens)
        yield c("llmc_engine_steps", "Steps the engine ran", value=engine.steps)
        yield c("llmc_speculative_draft_tokens", "Guessed tokens checked (speculative decoding)",
                value=engine.draft_tokens)
        yield c("llmc_speculative_accepted_tokens", "Guessed tokens that greedy decoding produced",
                value=engine.accepted_tokens)


class ServerMetrics(EngineMetrics):
    def __init__(self, async_engine):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(async_engine))
        self.ttft = Histogram("llmc_time_to_first_token_seconds", "Arrival to first token", registry=self.registry,
                              buckets=LATENCY_BUCKETS)
        self.itl = Histogram("llmc_inter_token_latency_seconds", "Time between a request's tokens",
                             registry=self.registry, buckets=LATENCY_BUCKETS)
        self.e2e = Histogram("llmc_request_latency_seconds", "Arrival to finish", registry=self.registry,
                             buckets=LATENCY_BUCKETS)
        self.finished_requests = Counter("llmc_requests_finished", "Requests finished, by reason", ["reason"],
                                         registry=self.registry)
        self.rejected_requests = Counter("llmc_requests_rejected", "Requests refused with HTTP 429 (at the "
                                         "concurrency limit)", registry=self.registry)
        async_engine.engine.metrics = self

    def rejected(self) -> None:
        self.rejected_requests.inc()

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def inter_token(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def finished(self, request) -> None:
        import time

        self.e2e.observe(time.monotonic() - request.arrival)
        self.finished_requests.labels(request.finish_reason or "unknown").inc()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
