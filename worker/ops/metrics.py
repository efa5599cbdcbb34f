"""Metrics shared by every process on every machine, exposed as Prometheus text by the web app.

Web and worker processes count in memory (no I/O on the hot path) and a background thread
adds the counts to Redis hashes every second; `GET /metrics` on the web app renders those,
plus gauges read at scrape time (queue depth per queue, in-flight messages, dead-letter size).
One mechanism for gunicorn's processes and Celery workers on other machines alike.
"""

from __future__ import annotations

import atexit
import bisect
import os
import threading
from collections import defaultdict
from collections.abc import Iterable, Iterator
from typing import Any

import redis
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from worker.broker.celery_app import QUEUES
from worker.stores.dead_letters import ENTRIES_KEY
from worker.stores.inbox import INDEX as INBOX_INDEX

KEY = "switchboard:metrics:"
SEP = "\x1f"  # between label values in a Redis field; never inside a label value we use
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Histogram series whose fields are kept formatted (label values come from our code: a few).
MAX_CACHED_SERIES = 256

# name → (type, help, label names). The only metrics there are; inc()/observe() check this.
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
    "switchboard_fhir_request_seconds": ("histogram", "FHIR request latency by operation",
                                         ("operation",)),
}


class Metrics:
    """In-process counters and histograms, flushed to Redis by a daemon thread."""

    def __init__(self, client: redis.Redis, interval: float = 1.0) -> None:
        self._r: Any = client
        self._interval = interval
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, str], float] = defaultdict(float)
        self._pid = 0
        self._stop = threading.Event()
        self._series: dict[tuple[Any, ...], tuple[tuple[str, str], ...]] = {}

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        """Add to a counter."""
        self._add(name, _field(name, labels), amount)

    def observe(self, name: str, value: float, **labels: str) -> None:
        """Record one observation in a histogram."""
        fields = self._histogram_fields(name, labels)
        # The buckets are cumulative: the observation counts in every bucket from the first
        # whose bound it does not exceed, through +Inf (the one before the sum).
        first = bisect.bisect_left(LATENCY_BUCKETS, value)
        with self._lock:
            self._ensure_thread()
            counts = self._counts
            for key in fields[first:-1]:
                counts[key] += 1
            counts[fields[-1]] += value

    def _histogram_fields(self, name: str, labels: dict[str, str]
                          ) -> tuple[tuple[str, str], ...]:
        """The count keys of one histogram series: a bucket per bound, +Inf, then the sum.
        Built once per series (a FHIR request observes one, and formatting a dozen fields
        cost more than the rest of the observation)."""
        cache_key = (name, *labels.items())
        fields = self._series.get(cache_key)
        if fields is None:
            base = _field(name, labels)
            fields = (*((name, f"{base}{SEP}le={le}") for le in LATENCY_BUCKETS),
                      (name, f"{base}{SEP}le=+Inf"), (name, f"{base}{SEP}sum"))
            if len(self._series) < MAX_CACHED_SERIES:
                self._series[cache_key] = fields
        return fields

    def _add(self, name: str, field: str, amount: float) -> None:
        with self._lock:
            self._ensure_thread()
            self._counts[(name, field)] += amount

    def _ensure_thread(self) -> None:
        if self._pid != os.getpid():  # first use, or we were forked
            self._pid = os.getpid()
            self._counts.clear()
            threading.Thread(target=self._run, name="metrics-flush", daemon=True).start()
            atexit.register(self._flush_quietly)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.flush()
            except redis.exceptions.RedisError:
                pass  # counts stay in memory and go with the next flush

    def _flush_quietly(self) -> None:
        try:
            self.flush()
        except redis.exceptions.RedisError:
            pass  # at exit with Redis gone, there is nobody left to tell

    def flush(self) -> None:
        """Add the counts so far to Redis (and forget them here once Redis has them)."""
        with self._lock:
            pending, self._counts = self._counts, defaultdict(float)
        if not pending:
            return
        try:
            pipe = self._r.pipeline(transaction=False)
            for (name, field), amount in pending.items():
                pipe.hincrbyfloat(KEY + name, field, amount)
            pipe.execute()
        except redis.exceptions.RedisError:
            with self._lock:  # put them back: a Redis blip must not lose counts
                for key, amount in pending.items():
                    self._counts[key] += amount
            raise


def _field(name: str, labels: dict[str, str]) -> str:
    _kind, _, names = DEFINITIONS[name]
    if set(labels) != set(names):
        raise ValueError(f"{name} takes labels {names}, got {sorted(labels)}")
    return SEP.join(str(labels[n]).replace(SEP, " ") for n in names)


class RedisCollector:
    """A prometheus_client collector reading the shared counts and the live gauges."""

    def __init__(self, client: redis.Redis) -> None:
        self._r: Any = client

    def collect(self) -> Iterator[Metric]:
        """Every defined metric, plus queue depth, in-flight and dead-letter gauges."""
        pipe = self._r.pipeline(transaction=False)
        for name in DEFINITIONS:
            pipe.hgetall(KEY + name)
        for queue in QUEUES:
            pipe.llen(queue)
        pipe.hlen("unacked")
        pipe.hlen(ENTRIES_KEY)
        pipe.zcard(INBOX_INDEX)
        results = pipe.execute()
        stored = dict(zip(DEFINITIONS, results[: len(DEFINITIONS)], strict=True))
        depths = results[len(DEFINITIONS): len(DEFINITIONS) + len(QUEUES)]
        unacked, dead, pending = results[-3], results[-2], results[-1]
        for name, (kind, doc, labels) in DEFINITIONS.items():
            raw = {k.decode(): float(v) for k, v in (stored[name] or {}).items()}
            if kind == "counter":
                yield _counter(name, doc, labels, raw)
            else:
                yield _histogram(name, doc, labels, raw)
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


def _counter(name: str, doc: str, labels: Iterable[str], raw: dict[str, float]
             ) -> CounterMetricFamily:
    names = list(labels)
    family = CounterMetricFamily(name, doc, labels=names)
    for field, value in sorted(raw.items()):
        family.add_metric(field.split(SEP) if names else [], value)
    return family


def _histogram(name: str, doc: str, labels: Iterable[str], raw: dict[str, float]
               ) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=list(labels))
    series: dict[str, dict[str, float]] = defaultdict(dict)
    for field, value in raw.items():
        base, _, part = field.rpartition(SEP)
        series[base][part] = value
    for base, parts in sorted(series.items()):
        buckets = [(str(le), parts.get(f"le={le}", 0.0)) for le in LATENCY_BUCKETS]
        buckets.append(("+Inf", parts.get("le=+Inf", 0.0)))
        family.add_metric(base.split(SEP), buckets, parts.get("sum", 0.0))
    return family


_shared: dict[str, Metrics] = {}
_shared_lock = threading.Lock()


def for_redis(url: str) -> Metrics:
    """The process-wide Metrics for this Redis URL."""
    with _shared_lock:
        if url not in _shared:
            _shared[url] = Metrics(redis.Redis.from_url(url, socket_timeout=5,
                                                        socket_connect_timeout=3))
        return _shared[url]
