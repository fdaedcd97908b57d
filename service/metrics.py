"""What the service tells Prometheus (``GET /metrics``, issue 20): one ``prometheus_client`` registry per app (not
the global one: several apps in one process keep apart), with labels of bounded cardinality (a run's name is a
label only with ``OPTIM_METRICS_PER_RUN=true``). README's "Seeing a run" lists every metric.

Counters and histograms are moved where the thing happens (the step route, the error handlers, snapshots,
recovery, the unit of work); what the registry holds now (live runs and bytes, the log not yet behind a snapshot,
snapshots in flight) is read at each scrape (``_LiveCollector``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from .runs import RunRegistry

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# a step's phases take from ~0.1 ms (decode) to seconds (a 50M step logged to PostgreSQL)
PHASE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BACKGROUND_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class Metrics:
    def __init__(self, *, per_run: bool = False) -> None:
        self.registry = CollectorRegistry()
        self.per_run = per_run
        r, run = self.registry, ["run"] if per_run else []
        self.step_phase = Histogram(
            "optim_step_phase_seconds",
            "Time of each phase of a step request (receive, wait, decode, step, log, encode, gather: Server-Timing's)",
            ["phase"],
            buckets=PHASE_BUCKETS,
            registry=r,
        )
        self.step_seconds = Histogram(
            "optim_step_seconds", "A step request's time in the service, all phases", buckets=PHASE_BUCKETS, registry=r
        )
        self.steps = Counter("optim_steps", "Steps applied (not retries answered again)", ["tenant", *run], registry=r)
        self.step_bytes = Counter("optim_step_bytes", "Bytes of step request bodies received", ["tenant", *run], registry=r)
        self.rejected = Counter(
            "optim_rejected_requests",
            "Requests answered with an error, by status and error type",
            ["status", "error"],
            registry=r,
        )
        self.snapshot_seconds = Histogram(
            "optim_snapshot_seconds", "Time to write and publish a snapshot", buckets=BACKGROUND_BUCKETS, registry=r
        )
        self.snapshot_bytes = Counter("optim_snapshot_bytes", "Bytes of snapshots written", registry=r)
        self.recovery_seconds = Histogram(
            "optim_recovery_seconds",
            "Time to recover a run into memory (snapshot + log replay)",
            buckets=BACKGROUND_BUCKETS,
            registry=r,
        )
        self.recovery_bytes = Counter(
            "optim_recovery_bytes", "Bytes read to recover runs (snapshots and logged payloads)", registry=r
        )
        self.recovered_events = Counter("optim_recovery_replayed_events", "Logged events replayed by recoveries", registry=r)
        self.storage_errors = Counter(
            "optim_storage_errors", "Database or blob store failures (each a 503 or a failed background write)", registry=r
        )

    def watch(self, registry: RunRegistry) -> None:
        """Read the run registry at each scrape."""
        self.registry.register(_LiveCollector(registry))

    def step_answered(self, laps: Mapping[str, float], *, tenant: str, run: str, body_bytes: int, applied: bool) -> None:
        for phase, ms in laps.items():
            self.step_phase.labels(phase).observe(ms / 1e3)
        self.step_seconds.observe(sum(laps.values()) / 1e3)
        labels = (tenant, run) if self.per_run else (tenant,)
        self.step_bytes.labels(*labels).inc(body_bytes)
        if applied:
            self.steps.labels(*labels).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _LiveCollector(Collector):
    def __init__(self, registry: RunRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        runs = self._registry.live_runs()
        gauges: list[tuple[str, str, Callable[[], Any]]] = [
            ("optim_live_runs", "Runs whose state is in this server's memory", lambda: len(runs)),
            (
                "optim_live_bytes",
                "Bytes of the live runs' state (parameters, optimizer state, averages)",
                lambda: sum(r.state_bytes for r in runs),
            ),
            ("optim_live_budget_bytes", "The memory budget of live runs (OPTIM_MAX_LIVE_BYTES)", lambda: self._registry.budget),
            (
                "optim_log_backlog_events",
                "Logged events of live runs not yet behind a snapshot (what a recovery would replay)",
                lambda: sum(r.seq - r.last_snapshot_seq for r in runs if r.durability == "log"),
            ),
            (
                "optim_unsnapshotted_steps",
                "Events of live snapshot-only runs since their last snapshot (what a crash would lose)",
                lambda: sum(r.seq - r.last_snapshot_seq for r in runs if r.durability == "snapshot"),
            ),
            ("optim_snapshots_in_flight", "Snapshots being written now", lambda: self._registry.snapshots.in_flight_count()),
        ]
        for name, doc, value in gauges:
            yield GaugeMetricFamily(name, doc, value=value())
