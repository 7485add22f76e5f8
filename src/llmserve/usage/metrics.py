"""Per-key metrics, in their own registry: /metrics shows them to the admin key only."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from llmserve.usage.records import UsageRecord

MAX_KEY_LABELS = 100  # beyond this many key names, the rest count as "other"
OTHER = "other"


class KeyMetrics:
    """Requests and tokens per key name (names only, never key values), bounded."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "llmserve_key_requests",
            "Metered requests by key name and status class",
            ["key", "status"],
            registry=self.registry,
        )
        self.tokens = Counter(
            "llmserve_key_tokens",
            "Tokens by key name and kind (prompt, cached, completion)",
            ["key", "kind"],
            registry=self.registry,
        )
        self._names: set[str] = set()

    def label(self, name: str) -> str:
        """`name`, or `other` once MAX_KEY_LABELS names are in use."""
        if name in self._names:
            return name
        if len(self._names) >= MAX_KEY_LABELS:
            return OTHER
        self._names.add(name)
        return name

    def observe(self, record: UsageRecord) -> None:
        """Count one finished request."""
        key = self.label(record.key_name)
        self.requests.labels(key, f"{record.status // 100}xx").inc()
        for kind, count in (
            ("prompt", record.prompt_tokens),
            ("cached", record.cached_tokens),
            ("completion", record.completion_tokens),
        ):
            if count:
                self.tokens.labels(key, kind).inc(count)


class WrittenRecords(Collector):
    """`llmserve_usage_records_written_total`: records this process has committed."""

    def __init__(self, read: Callable[[], int]):
        self._read = read

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(
            "llmserve_usage_records_written", "Usage records committed to the database"
        )
        family.add_metric([], float(self._read()))
        yield family
