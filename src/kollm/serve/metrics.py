"""Prometheus metrics of the serving layer, in the process-wide registry, labelled by model version.

Several apps in one process (the canary gateway's stable and canary arms) share these families and are told
apart by the `model_version` label. Names:

    kollm_requests_total{model_version,endpoint,status_code}         counter
    kollm_request_latency_seconds{model_version,endpoint}            histogram, arrival to last byte
    kollm_time_to_first_token_seconds{model_version,endpoint}        histogram
    kollm_output_tokens_total{model_version}                          counter
    kollm_prompt_tokens_total{model_version}                          counter
    kollm_request_tokens_per_second{model_version}                    histogram, output tokens / generation time per request
    kollm_requests_in_flight{model_version}                           gauge (/v1 requests being handled)
    kollm_queue_depth{model_version}                                  gauge (requests waiting for a batch slot)
    kollm_running_sequences{model_version}                            gauge (sequences in the running batch)
    kollm_prefix_cache_hit_tokens_total{model_version}                counter (native engine: prompt tokens whose
                                                                      keys and values came from the prefix cache)

Server-wide output tokens/s is `rate(kollm_output_tokens_total[1m])`.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, float("inf"))
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, float("inf"))
RATE_BUCKETS = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, float("inf"))

REQUESTS = Counter(
    "kollm_requests", "HTTP requests served", ["model_version", "endpoint", "status_code"], registry=REGISTRY
)
LATENCY = Histogram(
    "kollm_request_latency_seconds",
    "Request latency, arrival to last byte",
    ["model_version", "endpoint"],
    buckets=LATENCY_BUCKETS,
)
TTFT = Histogram(
    "kollm_time_to_first_token_seconds",
    "Time from arrival to the first generated token",
    ["model_version", "endpoint"],
    buckets=TTFT_BUCKETS,
)
OUTPUT_TOKENS = Counter("kollm_output_tokens", "Generated tokens", ["model_version"])
PROMPT_TOKENS = Counter("kollm_prompt_tokens", "Prompt tokens processed", ["model_version"])
TOKENS_PER_SECOND = Histogram(
    "kollm_request_tokens_per_second",
    "Output tokens per second of generation, per request",
    ["model_version"],
    buckets=RATE_BUCKETS,
)
OUTPUT_PERPLEXITY = Histogram(
    "kollm_output_perplexity",
    "Perplexity of each request's generated tokens under the served model (native engine)",
    ["model_version"],
    buckets=(1.5, 2, 3, 5, 10, 20, 50, 100, 300, 1000, 10000),
)
IN_FLIGHT = Gauge("kollm_requests_in_flight", "/v1 requests being handled", ["model_version"])
QUEUE_DEPTH = Gauge("kollm_queue_depth", "Requests waiting for a batch slot", ["model_version"])
RUNNING = Gauge("kollm_running_sequences", "Sequences in the running batch", ["model_version"])
# with `kollm serve --adapters`: per adapter (its served model name)
ADAPTER_REQUESTS = Counter(
    "kollm_adapter_requests", "Completed requests per LoRA adapter", ["model_version", "adapter"]
)
ADAPTER_OUTPUT_TOKENS = Counter(
    "kollm_adapter_output_tokens", "Generated tokens per LoRA adapter", ["model_version", "adapter"]
)


def track_engine(model_version: str, queue_depth: Callable[[], int], running: Callable[[], int]) -> None:
    """Make the queue-depth and running gauges of this version read the engine at scrape time."""
    QUEUE_DEPTH.labels(model_version).set_function(queue_depth)
    RUNNING.labels(model_version).set_function(running)


class _EngineCounters(Collector):
    """Counters an engine keeps itself (read at scrape time), one series per model version."""

    def __init__(self) -> None:
        self.prefix_hits: dict[str, Callable[[], int]] = {}

    def collect(self):
        family = CounterMetricFamily(
            "kollm_prefix_cache_hit_tokens",
            "Prompt tokens whose keys and values came from the prefix cache instead of a prefill",
            labels=["model_version"],
        )
        for version, read in list(self.prefix_hits.items()):
            family.add_metric([version], float(read()))
        yield family


ENGINE_COUNTERS = _EngineCounters()
REGISTRY.register(ENGINE_COUNTERS)


def track_prefix_cache(model_version: str, hit_tokens: Callable[[], int]) -> None:
    """Make kollm_prefix_cache_hit_tokens_total of this version read the engine's count at scrape time."""
    ENGINE_COUNTERS.prefix_hits[model_version] = hit_tokens
