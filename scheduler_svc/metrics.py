"""Prometheus metrics of the serving engine, on a registry the app owns, served on their own port.

The engine observes them where it already keeps time (a request's arrival, first scheduled step,
each token, finish); the gRPC service counts each request's outcome by status code. The registry
is per app, never prometheus-client's global one, so two servers in one process (tests) stay apart.
"""

from __future__ import annotations

import logging
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from scheduler_svc.block_manager import PrefixCacheStats
from scheduler_svc.step_record import StepRecord

logger = logging.getLogger(__name__)

# Latencies of a small CPU model and of a busy GPU server both land inside these.
_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                    10.0, 20.0, 40.0, 80.0, 160.0)
_TOKEN_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
                          0.75, 1.0, 2.5, 5.0, 10.0)


class ServingMetrics:
    """Every metric Omnibus exports; names follow Prometheus conventions (`omnibus_*`, seconds)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.time_to_first_token = Histogram(
            "omnibus_time_to_first_token_seconds", "From arrival to the first generated token.",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.inter_token_latency = Histogram(
            "omnibus_inter_token_latency_seconds", "Between two consecutive tokens of one request.",
            buckets=_TOKEN_LATENCY_BUCKETS, registry=r)
        self.e2e_latency = Histogram(
            "omnibus_e2e_request_latency_seconds",
            "From arrival to the last token, for requests that finished (stop or length).",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram(
            "omnibus_request_queue_time_seconds", "From arrival to the first step that computes it.",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.num_running = Gauge("omnibus_num_requests_running", "Requests holding KV blocks.", registry=r)
        self.num_waiting = Gauge(
            "omnibus_num_requests_waiting", "Requests queued, preempted ones included.", registry=r)
        self.num_swapped = Gauge(
            "omnibus_num_requests_swapped",
            "Requests whose KV blocks are swapped out to the worker's CPU memory.",
            registry=r)
        self.kv_cache_usage = Gauge(
            "omnibus_kv_cache_usage_ratio", "Fraction of KV cache blocks in use (0 to 1).", registry=r)
        self.prefix_cache_hit_rate = Gauge(
            "omnibus_prefix_cache_hit_rate",
            "Since start: fraction of the tokens looked up at admission (prompts, and the context of "
            "preempted requests resuming) that the prefix cache held.",
            registry=r)
        self.prefix_cache_queried_tokens = Counter(
            "omnibus_prefix_cache_queried_tokens", "Tokens looked up in the prefix cache at admission.", registry=r)
        self.prefix_cache_hit_tokens = Counter(
            "omnibus_prefix_cache_hit_tokens", "Tokens found in the prefix cache at admission.", registry=r)
        self.preemptions = Counter(
            "omnibus_preemptions", "Requests preempted (by recompute or swap) to free KV blocks.", registry=r)
        self.preemptions_by_cause = Counter(
            "omnibus_preemptions_by_cause",
            "Preemptions by cause: memory (the KV pool ran out) or priority (room for a request that "
            "outranks the victim).", labelnames=["cause"], registry=r)
        self.class_queue_time = Histogram(
            "omnibus_request_queue_time_by_class_seconds",
            "Queue time per priority and tenant; tenants outside --tenant-weights count as \"other\", "
            "requests without one as \"default\", so the label set stays bounded.",
            labelnames=["priority", "tenant"], buckets=_LATENCY_BUCKETS, registry=r)
        self.known_tenants: frozenset[str] = frozenset()  # the tenants with their own label
        self.admission_forecast_ratio = Histogram(
            "omnibus_admission_forecast_ratio",
            "Per finished request (not aborted): its actual length (prompt + output tokens) over the "
            "length forecast at its first admission (1: exact; above 1: the forecast fell short).",
            buckets=(0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 4.0), registry=r)
        self.admission_forecast_tokens = Counter(
            "omnibus_admission_forecast_tokens", "Forecast lengths of finished requests, summed.", registry=r)
        self.admission_actual_tokens = Counter(
            "omnibus_admission_actual_tokens", "Actual lengths of the same requests, summed.", registry=r)
        self._seen_preemptions = {"memory": 0, "priority": 0}
        self.swap_outs = Counter(
            "omnibus_swap_outs", "Preemptions that swapped the victim's KV blocks to CPU memory.", registry=r)
        self.prompt_tokens = Counter(
            "omnibus_prompt_tokens", "Prompt tokens of requests, counted when first scheduled.", registry=r)
        self.generation_tokens = Counter(
            "omnibus_generation_tokens", "Tokens generated and streamed to clients.", registry=r)
        self.worker_restarts = Counter(
            "omnibus_worker_restarts", "Worker processes `omnibus serve` started again after one died.", registry=r)
        self.resumed_requests = Counter(
            "omnibus_resumed_requests",
            "Requests whose K/V was lost with a worker (or a failed step) and that resume by recompute.",
            registry=r)
        self.quarantined_requests = Counter(
            "omnibus_quarantined_requests",
            "Requests failed alone (INTERNAL) for being in the batch of two consecutive failed steps.",
            registry=r)
        self.request_outcomes = Counter(
            "omnibus_requests", "Generate calls by the gRPC status code they ended with.",
            labelnames=["code"], registry=r)
        self._http: WSGIServer | None = None
        self._seen_queried_tokens = self._seen_hit_tokens = 0

    @property
    def port(self) -> int | None:
        """The port /metrics is served on, or None when not serving."""
        return None if self._http is None else self._http.server_port

    def serve(self, host: str, port: int) -> None:
        """Serve /metrics on host:port in a daemon thread (port 0: any free port)."""
        self._http, _ = start_http_server(port, host, registry=self.registry)
        logger.info("metrics on http://%s:%d/metrics", host, self.port)

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

    def observe_step(self, record: StepRecord) -> None:
        """A step was scheduled: count its preemptions."""
        if record.preempted_req_ids:
            self.preemptions.inc(len(record.preempted_req_ids))
        if record.swapped_out_req_ids:
            self.swap_outs.inc(len(record.swapped_out_req_ids))

    def observe_first_scheduled(self, queue_time_s: float, num_prompt_tokens: int,
                                priority: int | None = None, tenant: str | None = None) -> None:
        self.queue_time.observe(queue_time_s)
        self.prompt_tokens.inc(num_prompt_tokens)
        if priority is not None and tenant is not None:
            self.class_queue_time.labels(priority=str(priority), tenant=self._tenant_label(tenant)).observe(queue_time_s)

    def observe_preemption_causes(self, counts: dict[str, int]) -> None:
        """The scheduler's cumulative `num_preemptions_by_cause`; counters advance by what is new."""
        for cause, count in counts.items():
            self.preemptions_by_cause.labels(cause=cause).inc(count - self._seen_preemptions.get(cause, 0))
            self._seen_preemptions[cause] = count

    def observe_admission_forecast(self, forecast_tokens: int, actual_tokens: int) -> None:
        """A request finished `actual_tokens` long; admission had forecast `forecast_tokens`."""
        self.admission_forecast_ratio.observe(actual_tokens / forecast_tokens)
        self.admission_forecast_tokens.inc(forecast_tokens)
        self.admission_actual_tokens.inc(actual_tokens)

    def _tenant_label(self, tenant: str) -> str:
        if not tenant:
            return "default"
        return tenant if tenant in self.known_tenants else "other"

    def observe_tokens(self, num_tokens: int, ttft_s: float | None, itl_s: float | None) -> None:
        """`num_tokens` new tokens of one request; ttft_s for its first, itl_s since its last."""
        self.generation_tokens.inc(num_tokens)
        if ttft_s is not None:
            self.time_to_first_token.observe(ttft_s)
        if itl_s is not None:
            self.inter_token_latency.observe(itl_s)

    def observe_finished(self, e2e_s: float) -> None:
        """A request finished normally (stop or length) this long after it arrived."""
        self.e2e_latency.observe(e2e_s)

    def observe_queues(self, num_running: int, num_waiting: int, kv_cache_usage: float, num_swapped: int = 0) -> None:
        self.num_running.set(num_running)
        self.num_swapped.set(num_swapped)
        self.num_waiting.set(num_waiting)
        self.kv_cache_usage.set(kv_cache_usage)

    def observe_prefix_cache(self, stats: PrefixCacheStats) -> None:
        """The block manager's cumulative counts; counters advance by what is new since last time."""
        self.prefix_cache_hit_rate.set(stats.hit_rate)
        self.prefix_cache_queried_tokens.inc(stats.num_queried_tokens - self._seen_queried_tokens)
        self.prefix_cache_hit_tokens.inc(stats.num_hit_tokens - self._seen_hit_tokens)
        self._seen_queried_tokens, self._seen_hit_tokens = stats.num_queried_tokens, stats.num_hit_tokens

    def count_worker_restart(self) -> None:
        self.worker_restarts.inc()

    def count_resumed(self, num_requests: int) -> None:
        self.resumed_requests.inc(num_requests)

    def count_quarantined(self) -> None:
        self.quarantined_requests.inc()

    def count_outcome(self, code_name: str) -> None:
        """One Generate call ended with this gRPC status code name ("OK", "UNAVAILABLE", ...)."""
        self.request_outcomes.labels(code=code_name).inc()
