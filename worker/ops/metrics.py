"""Metrics the prometheus_client way: families declared once, each process exposing its own.

- Every metric family is declared here (DEFINITIONS), as prometheus_client Counters and
  Histograms on the process's registry. Call sites go through the `Metrics` facade
  (`metrics.inc(name, n, **labels)`, `metrics.observe(name, seconds, **labels)`), which checks
  the name and the label names against the declaration.
- Each process exposes its own series and Prometheus adds them up (docs/operations-metrics.md):
  - the web app at its `/metrics`, its gunicorn workers aggregated by prometheus_client's
    multiprocess mode (web/gunicorn_conf.py sets PROMETHEUS_MULTIPROC_DIR);
  - each Celery worker on its own port (WORKER_METRICS_PORT, `start_worker_server`). The
    threads pool runs every task in the one worker process, so that process's registry holds
    every count; a prefork pool would need the multiprocess mode as well, which the same code
    follows when PROMETHEUS_MULTIPROC_DIR is set.
- Gauges of state shared by all processes (queue depth, in-flight, dead letters, inbox) are read
  from Redis at scrape time by a custom collector (`SharedGauges`) on the web app's `/metrics`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import redis
from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    multiprocess,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, Metric

from worker.broker.celery_app import QUEUES
from worker.broker.spool import Spool
from worker.stores.dead_letters import ENTRIES_KEY
from worker.stores.inbox import INDEX as INBOX_INDEX

log = logging.getLogger("switchboard.metrics")

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# name → (type, help, label names): every metric family there is. A counter is exposed with
# `_total` appended (prometheus_client's naming).
DEFINITIONS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "switchboard_webhooks_received": ("counter", "Webhook and API requests received",
                                      ("endpoint",)),
    "switchboard_webhooks_rejected": ("counter", "Requests rejected, by reason",
                                      ("endpoint", "reason")),
    "switchboard_webhooks_enqueued": ("counter", "Requests accepted onto a queue",
                                      ("endpoint",)),
    "switchboard_tasks": ("counter", "Task runs by outcome (succeeded, retried, "
                          "dead_lettered, deferred, failed)", ("task", "outcome")),
    "switchboard_task_retries": ("counter", "Retries scheduled, by reason", ("task", "reason")),
    "switchboard_dead_letters": ("counter", "Messages dead-lettered, by reason",
                                 ("task", "reason")),
    "switchboard_quarantined": ("counter", "Messages dropped because they could be neither "
                                "processed nor dead-lettered (minimal record kept)",
                                ("task", "reason")),
    "switchboard_sends": ("counter", "Outbound sends by channel and outcome",
                          ("channel", "outcome")),
    "switchboard_email_events": ("counter", "SendGrid Event Webhook events applied, by event "
                                 "(processed, delivered, bounce, open, click, spamreport, …; "
                                 "`other` for the rest)", ("event",)),
    "switchboard_subscription_ignored": ("counter", "FHIR Subscription notifications that "
                                         "led to no send, by reason (from-patient, "
                                         "already-sent, delete, ...)", ("reason",)),
    "switchboard_reconciled": ("counter", "Stuck sends reconciled with the provider, by "
                               "outcome (completed, stopped, unchanged, errors)", ("outcome",)),
    "switchboard_messages_recovered": ("counter", "Messages a dead worker held, put back in "
                                       "their queue by a live worker's janitor", ()),
    "switchboard_inbox_republished": ("counter", "Accepted messages published again by the "
                                      "inbox sweep (lost between queue and worker)", ()),
    "switchboard_fhir_contention": ("counter", "FHIR writes meeting server contention: "
                                    "conflict (409 40001), retried, gave-up (left to the task's "
                                    "retry), throttled (429)", ("event",)),
    "switchboard_emails_oversized": ("counter", "Inbound emails over EMAIL_MAX_BYTES: they land "
                                     "with their text, their attachments left out and named",
                                     ()),
    "switchboard_email_attachments_omitted": ("counter", "Attachments left out of inbound "
                                              "emails over EMAIL_MAX_BYTES", ()),
    "switchboard_spool_appended": ("counter", "Accepted webhooks kept in the disk spool because "
                                   "Redis did not take them in time", ()),
    "switchboard_spool_refused": ("counter", "Webhooks answered 503 because neither Redis nor "
                                  "the spool took them, by reason (full, too-large, disk-full, "
                                  "disk-error, contended)", ("reason",)),
    "switchboard_spool_published": ("counter", "Spooled entries published to Redis by a "
                                    "flusher", ()),
    "switchboard_spool_kept": ("counter", "Spooled entries set aside because they could not be "
                               "opened (sealed with a key not configured)", ()),
    "switchboard_fhir_request_seconds": ("histogram", "FHIR request latency by operation",
                                         ("operation",)),
    # Set by the write controller at each change (worker/fhir/contention.py); `scope` is
    # `cluster` for the budget shared through Redis, `process` for a process's own limit.
    "switchboard_fhir_write_limit": ("gauge", "FHIR writes allowed in flight (the limit "
                                     "the controller measured as best)", ("scope",)),
    "switchboard_fhir_writes_per_second": ("gauge", "FHIR writes completed per second in the "
                                           "controller's last window", ("scope",)),
    "switchboard_fhir_conflicts_per_second": ("gauge", "Serialization conflicts (409 40001) "
                                              "per second in the controller's last window",
                                              ("scope",)),
}


class Metrics:
    """The families of DEFINITIONS on one registry, counted by name (the call sites' API)."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self._families: dict[str, Counter | Histogram | Gauge] = {}
        for name, (kind, doc, labels) in DEFINITIONS.items():
            self._families[name] = (
                Counter(name, doc, labels, registry=registry) if kind == "counter"
                # The last value any live process set: these are the cluster's, not summed.
                else Gauge(name, doc, labels, registry=registry, multiprocess_mode="livemax")
                if kind == "gauge"
                else Histogram(name, doc, labels, registry=registry, buckets=LATENCY_BUCKETS))

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        """Add to a counter (KeyError for an undeclared name, ValueError for wrong labels)."""
        counter = self._series(name, labels)
        if not isinstance(counter, Counter):
            raise TypeError(f"{name} is not a counter")
        counter.inc(amount)

    def observe(self, name: str, value: float, **labels: str) -> None:
        """Record one observation in a histogram."""
        histogram = self._series(name, labels)
        if not isinstance(histogram, Histogram):
            raise TypeError(f"{name} is not a histogram")
        histogram.observe(value)

    def set(self, name: str, value: float, **labels: str) -> None:
        """Set a gauge."""
        gauge = self._series(name, labels)
        if not isinstance(gauge, Gauge):
            raise TypeError(f"{name} is not a gauge")
        gauge.set(value)

    def _series(self, name: str, labels: dict[str, str]) -> Counter | Histogram | Gauge:
        family = self._families[name]
        # prometheus_client refuses missing or unknown label names (ValueError) either way.
        return family.labels(**labels) if labels else family


_process: Metrics | None = None
_process_lock = threading.Lock()


def process_metrics() -> Metrics:
    """This process's Metrics, on prometheus_client's default registry (declared once)."""
    global _process
    with _process_lock:
        if _process is None:
            _process = Metrics()
        return _process


def multiprocess_mode() -> bool:
    """Whether prometheus_client keeps values in files shared by this host's processes.

    prometheus_client decides this itself, from this variable, when it is imported; the
    exposition follows the same switch so the two never disagree."""
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


def process_registry() -> CollectorRegistry:
    """What this process exposes: its own registry, or in multiprocess mode the sum over every
    process of the host (gunicorn's workers, or a prefork pool's children)."""
    if not multiprocess_mode():
        return REGISTRY
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]  # untyped upstream
    return registry


class SharedGauges:
    """A collector reading the state every process shares from Redis, at scrape time."""

    def __init__(self, client: redis.Redis) -> None:
        self._r: Any = client

    def collect(self) -> Iterator[Metric]:
        """Queue depth per queue, in-flight, dead-letter and inbox sizes; Redis reachability."""
        try:
            pipe = self._r.pipeline(transaction=False)
            for queue in QUEUES:
                pipe.llen(queue)
            pipe.hlen("unacked")  # kombu's Redis transport: messages taken, not yet acked
            pipe.hlen(ENTRIES_KEY)
            pipe.zcard(INBOX_INDEX)
            *depths, unacked, dead, pending = pipe.execute()
        except redis.exceptions.RedisError as exc:
            # The scrape still answers with this process's counters (rejections pile up
            # exactly when Redis is down); the gauges are left out rather than made up.
            log.warning("metrics: Redis unreachable for the shared gauges: %s",
                        type(exc).__name__)
            yield GaugeMetricFamily("switchboard_redis_up", "Whether Redis answered this "
                                    "scrape (the shared gauges are absent when not)", value=0.0)
            return
        yield GaugeMetricFamily("switchboard_redis_up", "Whether Redis answered this scrape "
                                "(the shared gauges are absent when not)", value=1.0)
        depth = GaugeMetricFamily("switchboard_queue_depth", "Messages waiting per queue",
                                  labels=["queue"])
        for queue, n in zip(QUEUES, depths, strict=True):
            depth.add_metric([queue], float(n))
        yield depth
        yield GaugeMetricFamily("switchboard_messages_in_flight",
                                "Messages taken by a worker and not yet acknowledged",
                                value=float(unacked))
        yield GaugeMetricFamily("switchboard_dead_letter_entries",
                                "Entries in the dead-letter store", value=float(dead))
        yield GaugeMetricFamily("switchboard_inbox_pending",
                                "Accepted messages no worker has finished yet",
                                value=float(pending))


class SpoolGauges:
    """A collector reading this host's spool directory at scrape time (every web process of the
    host shares it, so no process's own gauge would be the whole)."""

    def __init__(self, spool: Spool) -> None:
        self._spool = spool

    def collect(self) -> Iterator[Metric]:
        """Entries and bytes waiting in the spool, and the oldest one's age."""
        try:
            status = self._spool.status()
        except OSError as exc:  # the scrape still answers; the gauges are left out
            log.warning("metrics: the spool directory cannot be read: %s",
                        exc.strerror or type(exc).__name__)
            return
        yield GaugeMetricFamily("switchboard_spool_entries", "Accepted webhooks waiting in "
                                "this host's disk spool for Redis", value=float(status.entries))
        yield GaugeMetricFamily("switchboard_spool_bytes", "Bytes of the entries waiting in "
                                "this host's disk spool", value=float(status.bytes))
        yield GaugeMetricFamily("switchboard_spool_oldest_age_seconds", "How long the oldest "
                                "entry of this host's spool has waited (0: none)",
                                value=status.oldest_age(time.time()))
        yield GaugeMetricFamily("switchboard_spool_kept_entries", "Spooled entries set aside "
                                "as unopenable (`switchboard spool flush --kept` retries them)",
                                value=float(status.kept))


def web_registry(client: redis.Redis, spool: Spool | None = None) -> CollectorRegistry:
    """What the web app's /metrics serves: this host's web processes, the shared gauges and
    this host's spool."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(process_registry())  # a registry is itself a collector
    registry.register(SharedGauges(client))
    if spool is not None:
        registry.register(SpoolGauges(spool))
    return registry


def start_worker_server(port: int, host: str) -> Any | None:
    """Serve this worker's metrics on host:port (prometheus_client's own HTTP server).

    A port already taken leaves the worker running without metrics, logged as an error:
    messages keep flowing, which matters more than counting them."""
    try:
        server, _thread = start_http_server(port, host, registry=process_registry())
    except OSError as exc:
        log.error("metrics: cannot serve on %s:%d (%s); set WORKER_METRICS_PORT to a free "
                  "port, or 0 for none", host, port, exc.strerror or type(exc).__name__)
        return None
    log.info("metrics: serving on %s:%d/metrics", host, port)
    return server
