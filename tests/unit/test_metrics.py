"""Metrics: the declared families behind the facade, and the gauges read from Redis."""

from __future__ import annotations

import fakeredis
import pytest
import redis
from prometheus_client import CollectorRegistry, generate_latest

from worker.ops import devstack
from worker.ops.metrics import (
    DEFINITIONS,
    LATENCY_BUCKETS,
    Metrics,
    SharedGauges,
    process_metrics,
    web_registry,
)
from worker.stores.dead_letters import ENTRIES_KEY


def text(registry: CollectorRegistry) -> str:
    return generate_latest(registry).decode()


def test_the_facade_counts_on_prometheus_client_families() -> None:
    registry = CollectorRegistry()
    m = Metrics(registry)
    m.inc("switchboard_sends", channel="sms", outcome="sent")
    m.inc("switchboard_sends", 2, channel="sms", outcome="sent")
    m.inc("switchboard_sends", channel="email", outcome="throttled")
    m.inc("switchboard_messages_recovered", 3)
    m.observe("switchboard_fhir_request_seconds", 0.02, operation="create")
    m.observe("switchboard_fhir_request_seconds", 3.0, operation="create")
    out = text(registry)
    assert 'switchboard_sends_total{channel="sms",outcome="sent"} 3.0' in out
    assert 'switchboard_sends_total{channel="email",outcome="throttled"} 1.0' in out
    assert "switchboard_messages_recovered_total 3.0" in out
    assert 'switchboard_fhir_request_seconds_bucket{le="0.025",operation="create"} 1.0' in out
    assert 'switchboard_fhir_request_seconds_bucket{le="+Inf",operation="create"} 2.0' in out
    assert 'switchboard_fhir_request_seconds_count{operation="create"} 2.0' in out
    assert 'switchboard_fhir_request_seconds_sum{operation="create"} 3.02' in out
    buckets = [le for le in LATENCY_BUCKETS
               if f'switchboard_fhir_request_seconds_bucket{{le="{le}",' in out]
    assert buckets == list(LATENCY_BUCKETS)
    # Every declared family is exposed, once, as the kind declared.
    for name, (kind, _, _) in DEFINITIONS.items():
        exposed = f"{name}_total" if kind == "counter" else name
        assert out.count(f"# TYPE {exposed} {kind}\n") == 1, name


def test_undeclared_names_and_wrong_labels_are_refused() -> None:
    m = Metrics(CollectorRegistry())
    with pytest.raises(ValueError):
        m.inc("switchboard_sends", channel="sms")  # a label missing
    with pytest.raises(ValueError):
        m.inc("switchboard_sends")
    with pytest.raises(ValueError):
        m.observe("switchboard_fhir_request_seconds", 0.1, op="read")
    with pytest.raises(KeyError):
        m.inc("no_such_metric")
    with pytest.raises(TypeError):
        m.inc("switchboard_fhir_request_seconds", operation="read")
    with pytest.raises(TypeError):
        m.observe("switchboard_sends", 1.0, channel="sms", outcome="sent")


def test_the_process_metrics_are_declared_once_however_often_they_are_asked_for() -> None:
    # The web app is built per test and the worker's runtime per process: a second declaration
    # on prometheus_client's default registry would raise (duplicated timeseries).
    assert process_metrics() is process_metrics()


def test_the_shared_gauges_are_read_from_redis_at_scrape_time() -> None:
    client = fakeredis.FakeRedis()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SharedGauges(client))
    assert 'switchboard_queue_depth{queue="inbound"} 0.0' in text(registry)
    client.rpush("inbound", "m1", "m2")
    client.hset("unacked", "tag", "m")
    client.hset(ENTRIES_KEY, "e1", "x")
    out = text(registry)
    assert 'switchboard_queue_depth{queue="inbound"} 2.0' in out
    assert "switchboard_messages_in_flight 1.0" in out
    assert "switchboard_dead_letter_entries 1.0" in out
    assert "switchboard_inbox_pending 0.0" in out
    assert "switchboard_redis_up 1.0" in out


def test_the_web_page_keeps_its_counters_when_redis_is_down() -> None:
    # Rejections pile up exactly while Redis is down: the page must still answer with them.
    dead = redis.Redis(port=devstack.free_port(), socket_connect_timeout=0.5)
    process_metrics().inc("switchboard_webhooks_rejected", endpoint="twilio-sms",
                          reason="unavailable")
    out = text(web_registry(dead))
    assert "switchboard_redis_up 0.0" in out
    assert "switchboard_queue_depth" not in out
    assert 'switchboard_webhooks_rejected_total{endpoint="twilio-sms",reason="unavailable"}' in out


def test_a_worker_serves_its_metrics_and_a_taken_port_leaves_it_running(
        caplog: pytest.LogCaptureFixture) -> None:
    import socket

    import httpx

    from worker.ops.metrics import start_worker_server

    port = devstack.free_port()
    server = start_worker_server(port, "127.0.0.1")
    assert server is not None
    try:
        process_metrics().inc("switchboard_inbox_republished")
        page = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        assert "# TYPE switchboard_tasks_total counter" in page
        assert "switchboard_inbox_republished_total" in page
    finally:
        server.shutdown()
        server.server_close()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert start_worker_server(taken.getsockname()[1], "127.0.0.1") is None
    assert "WORKER_METRICS_PORT" in caplog.text


def test_the_operations_page_lists_every_metric_family() -> None:
    from pathlib import Path

    page = (Path(__file__).resolve().parents[2] / "docs" / "operations-metrics.md").read_text()
    for name, (kind, _, _) in DEFINITIONS.items():
        assert f"`{name}_total`" in page if kind == "counter" else f"`{name}`" in page, name
