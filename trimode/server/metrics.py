"""Prometheus metrics of the server: requests, tokens, latency, failures by reason, queue and KV use."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from trimode.outputs import RequestOutput

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# HTTP status of a refused or failed request -> the `reason` label of trimode_request_failures.
FAILURE_REASONS = {
    400: "invalid_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    408: "read_timeout",
    413: "body_too_large",
    429: "queue_full",
    500: "internal_error",
    503: "shutting_down",
}


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("trimode_requests", "Finished requests", ["mode", "status"], registry=r)
        self.failures = Counter(
            "trimode_request_failures", "Requests refused or failed, by reason", ["reason"], registry=r
        )
        self.tokens = Counter("trimode_generated_tokens", "Generated tokens", ["mode"], registry=r)
        self.forwards = Counter("trimode_forwards", "Forwards taken part in", ["mode"], registry=r)
        self.cycles = Counter(
            "trimode_auto_cycles",
            "Cycles of mode auto's requests, by the decoding that ran them",
            ["decoding"],
            registry=r,
        )
        self.tpf = Gauge("trimode_tokens_per_forward", "Generated tokens / forwards since start", ["mode"], registry=r)
        self.queue = Gauge("trimode_queue_depth", "Requests waiting", registry=r)
        self.running = Gauge("trimode_running_batch", "Requests running", registry=r)
        self.kv_allocated = Gauge(
            "trimode_kv_slots_allocated", "KV slots in pages the running requests hold (shared pages once)", registry=r
        )
        self.kv_budget = Gauge("trimode_kv_slots_budget", "KV slots in the pool (--kv-cache-tokens)", registry=r)
        self.kv_bytes = Gauge("trimode_kv_cache_bytes", "Bytes of the KV pool, allocated at start", registry=r)
        self.prefix_queried = Gauge(
            "trimode_prefix_cache_queried_tokens", "Prompt tokens looked up in the prefix cache since start", registry=r
        )
        self.prefix_hits = Gauge(
            "trimode_prefix_cache_hit_tokens", "Prompt tokens found in the prefix cache since start", registry=r
        )
        self.preemptions = Gauge(
            "trimode_preemptions", "Running requests preempted (KV pool full) since start", registry=r
        )
        self.heartbeat = Gauge(
            "trimode_engine_heartbeat_age_seconds",
            "Seconds since the engine thread last completed a loop iteration (grows while a step runs)",
            registry=r,
        )
        self.ttft = Histogram(
            "trimode_time_to_first_token_seconds", "TTFT", ["mode"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.itl = Histogram(
            "trimode_inter_token_latency_seconds",
            "Mean time per output token after the first",
            ["mode"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self._totals: dict[str, list[int]] = {}

    def failed(self, reason: str) -> None:
        self.failures.labels(reason).inc()

    def failed_status(self, status: int) -> None:
        self.failed(FAILURE_REASONS.get(status, f"http_{status}"))

    def finished(self, out: RequestOutput) -> None:
        res = out.output
        if res is None:
            return
        self.requests.labels(res.mode, res.finish_reason).inc()
        self.tokens.labels(res.mode).inc(res.num_generated_tokens)
        self.forwards.labels(res.mode).inc(res.num_forwards)
        for name, cycles in (res.decodings or {}).items():
            self.cycles.labels(name).inc(cycles)
        totals = self._totals.setdefault(res.mode, [0, 0])
        totals[0] += res.num_generated_tokens
        totals[1] += res.num_forwards
        self.tpf.labels(res.mode).set(totals[0] / max(totals[1], 1))
        self.ttft.labels(res.mode).observe(res.time_to_first_token)
        if res.num_generated_tokens > 1:
            self.itl.labels(res.mode).observe(res.inter_token_latency)
