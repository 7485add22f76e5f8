"""vLLM's scheduler statistics, kept as counters an EngineStats snapshot can be made from.

vLLM hands every stat logger a SchedulerStats after each engine step (on the event loop);
its fields are not a stable interface, so each is read with a default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class SchedulerCounters:
    """The latest scheduler state and running totals, updated by `recorder_factory`'s logger."""

    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0  # share of the KV cache's blocks in use
    prefix_queries_total: int = 0  # prompt tokens looked up in the prefix cache
    prefix_hits_total: int = 0  # of them, found there
    steps_total: int = 0

    def record(self, scheduler_stats: Any) -> None:
        """Take one SchedulerStats (None when vLLM had none this step)."""
        if scheduler_stats is None:
            return
        self.running = int(getattr(scheduler_stats, "num_running_reqs", 0))
        self.waiting = int(getattr(scheduler_stats, "num_waiting_reqs", 0))
        self.kv_usage = float(getattr(scheduler_stats, "kv_cache_usage", 0.0))
        self.steps_total += 1
        prefix = getattr(scheduler_stats, "prefix_cache_stats", None)
        if prefix is not None:
            self.prefix_queries_total += int(getattr(prefix, "queries", 0))
            self.prefix_hits_total += int(getattr(prefix, "hits", 0))


def recorder_factory(counters: SchedulerCounters) -> Any:
    """A vLLM StatLoggerFactory whose loggers feed `counters`."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class CounterLogger(StatLoggerBase):  # type: ignore[misc]
        """Feeds SchedulerCounters; logs nothing."""

        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            self.counters = counters

        def record(
            self,
            scheduler_stats: Any,
            iteration_stats: Any,
            mm_cache_stats: Any = None,
            engine_idx: int = 0,
        ) -> None:
            self.counters.record(scheduler_stats)

        def log_engine_initialized(self) -> None:
            pass

    return CounterLogger
