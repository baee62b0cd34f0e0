"""``/metrics``: the store's state in Prometheus' text format, for a scraper.

Every value is read when scraped (nothing is kept between scrapes), with
bounded reads only: counts of the execution tables, and finished/failed jobs
over the last minute from the ``finished_at``/``failed_at`` indexes rather than
a count of the whole history (which would scan a million rows per scrape).
"""
from __future__ import annotations

from datetime import timedelta
from typing import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ... import admin
from ...store import utcnow
from ..context import Dashboard, dashboard_of

WINDOW = 60  # seconds of "recent" finished and failed jobs


class StoreCollector:
    """One scrape's worth of metrics from ``dash``'s store."""

    def __init__(self, dash: Dashboard) -> None:
        self.dash = dash

    def collect(self) -> Iterator[Metric]:
        store = self.dash.store
        queues = admin.queues(store)
        now = utcnow()
        since = now - timedelta(seconds=WINDOW)
        finished = self.dash.reads.finished_since(since)
        failed_recent = self.dash.reads.failed_since(since)
        names = sorted({q.name for q in queues} | set(finished) | set(failed_recent))
        by_name = {q.name: q for q in queues}

        def family(name: str, doc: str, value_of) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=["queue"])
            for queue in names:
                g.add_metric([queue], float(value_of(queue, by_name.get(queue))))
            return g

        yield family("sqlq_queue_ready", "Jobs ready to be claimed.", lambda n, q: q.ready if q else 0)
        yield family("sqlq_queue_scheduled", "Jobs waiting for their ETA.", lambda n, q: q.scheduled if q else 0)
        yield family("sqlq_queue_claimed", "Jobs held by a worker process.", lambda n, q: q.claimed if q else 0)
        yield family("sqlq_queue_failed", "Failed jobs kept for retry or discard.", lambda n, q: q.failed if q else 0)
        yield family("sqlq_queue_blocked", "Jobs blocked by a concurrency limit.",
                     lambda n, q: (getattr(q, "blocked", 0) or 0) if q else 0)
        yield family("sqlq_queue_paused", "1 when the queue is paused.", lambda n, q: 1 if q and q.paused else 0)
        yield family("sqlq_queue_oldest_ready_age_seconds", "How long the oldest ready job has waited (latency).",
                     lambda n, q: q.latency if q else 0)
        yield family("sqlq_queue_finished_last_minute", f"Jobs finished in the last {WINDOW} seconds.",
                     lambda n, q: finished.get(n, 0))
        yield family("sqlq_queue_failed_last_minute", f"Jobs failed in the last {WINDOW} seconds.",
                     lambda n, q: failed_recent.get(n, 0))
        procs = admin.processes(store, held_limit=0)
        alive = GaugeMetricFamily("sqlq_processes", "Registered processes by liveness.", labels=["state"])
        alive.add_metric(["alive"], float(sum(not p.dead for p in procs)))
        alive.add_metric(["dead"], float(sum(p.dead for p in procs)))
        yield alive


def metrics_page(request: Request) -> Response:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StoreCollector(dashboard_of(request)))
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


routes = [Route("/metrics", metrics_page, name="metrics")]
