"""GET /metrics: the server's counters in Prometheus' text format (prometheus_client).

Each app has its own CollectorRegistry (never the process-wide one), so several servers in one
process keep their own counts. Request counts, tokens and latencies are recorded as requests end;
queue depth, the running batch and the adapter cache are read from the batcher and the registry
when Prometheus scrapes.
"""
from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from lorakit.serve.batcher import Batcher, Job
from lorakit.serve.generate import GenerationResult

CONTENT_TYPE = CONTENT_TYPE_LATEST
UNKNOWN_MODEL = ""  # the model label of requests refused before their model was known
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
PER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class Metrics:
    """The counters and histograms of one server."""

    def __init__(self, batcher: Batcher):
        self.registry = CollectorRegistry()
        self.requests = Counter("lorakit_requests", "Requests answered, by model and HTTP status",
                                ["model", "status"], registry=self.registry)
        self.prompt_tokens = Counter("lorakit_prompt_tokens", "Prompt tokens of finished requests", ["model"],
                                     registry=self.registry)
        self.generation_tokens = Counter("lorakit_generation_tokens", "Tokens generated for finished requests",
                                         ["model"], registry=self.registry)
        self.time_to_first_token = Histogram("lorakit_time_to_first_token_seconds",
                                             "From a request's arrival to its first generated token",
                                             buckets=TTFT_BUCKETS, registry=self.registry)
        self.time_per_output_token = Histogram("lorakit_time_per_output_token_seconds",
                                               "Mean time per generated token after the first, per request",
                                               buckets=PER_TOKEN_BUCKETS, registry=self.registry)
        self.registry.register(_LiveState(batcher))

    def request(self, model: str, status: int) -> None:
        self.requests.labels(model=model, status=str(status)).inc()

    def finished(self, model: str, job: Job, result: GenerationResult) -> None:
        """Tokens and latencies of a request that ran to its end."""
        self.prompt_tokens.labels(model=model).inc(result.prompt_tokens)
        self.generation_tokens.labels(model=model).inc(len(result.token_ids))
        if job.first_token is not None:
            self.time_to_first_token.observe(job.first_token - job.submitted)
            if job.finished is not None and len(result.token_ids) > 1:
                self.time_per_output_token.observe((job.finished - job.first_token) / (len(result.token_ids) - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _LiveState:
    """A collector that reads the batcher's queue and batch, and the adapter cache, at scrape time."""

    def __init__(self, batcher: Batcher):
        self.batcher = batcher

    def collect(self):
        registry = self.batcher.registry
        yield GaugeMetricFamily("lorakit_queue_depth", "Requests waiting to join the running batch",
                                value=self.batcher.waiting)
        yield GaugeMetricFamily("lorakit_running_batch_size", "Rows (requests) in the running batch",
                                value=self.batcher.running)
        yield GaugeMetricFamily("lorakit_loaded_adapters", "Adapters loaded in the bank", value=len(registry.loaded))
        for kind, text in (("hits", "Batches that found an adapter loaded already"),
                           ("loads", "Adapters loaded into the bank"),
                           ("evictions", "Adapters unloaded to make room for others")):
            yield CounterMetricFamily(f"lorakit_adapter_cache_{kind}", text, value=registry.stats[kind])
