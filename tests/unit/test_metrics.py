"""Shared metrics: counted in memory, flushed to Redis, rendered as Prometheus text."""

from __future__ import annotations

import fakeredis
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from worker.ops.metrics import LATENCY_BUCKETS, Metrics, RedisCollector


def render(client: fakeredis.FakeRedis) -> str:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RedisCollector(client))
    return generate_latest(registry).decode()


def test_counts_from_two_processes_add_up_and_render() -> None:
    client = fakeredis.FakeRedis()
    a, b = Metrics(client, interval=3600), Metrics(client, interval=3600)
    a.inc("switchboard_sends", channel="sms", outcome="sent")
    b.inc("switchboard_sends", 2, channel="sms", outcome="sent")
    b.inc("switchboard_sends", channel="email", outcome="throttled")
    a.observe("switchboard_fhir_request_seconds", 0.02, operation="create")
    a.observe("switchboard_fhir_request_seconds", 3.0, operation="create")
    a.flush()
    b.flush()
    client.rpush("inbound", "m1", "m2")
    text = render(client)
    assert 'switchboard_sends_total{channel="sms",outcome="sent"} 3.0' in text
    assert 'switchboard_sends_total{channel="email",outcome="throttled"} 1.0' in text
    assert 'switchboard_fhir_request_seconds_bucket{le="0.025",operation="create"} 1.0' in text
    assert 'switchboard_fhir_request_seconds_bucket{le="+Inf",operation="create"} 2.0' in text
    assert 'switchboard_fhir_request_seconds_count{operation="create"} 2.0' in text
    assert 'switchboard_fhir_request_seconds_sum{operation="create"} 3.02' in text
    assert 'switchboard_queue_depth{queue="inbound"} 2.0' in text
    assert "switchboard_dead_letter_entries 0.0" in text


def test_unknown_labels_are_refused() -> None:
    m = Metrics(fakeredis.FakeRedis(), interval=3600)
    with pytest.raises(ValueError):
        m.inc("switchboard_sends", channel="sms")
    with pytest.raises(KeyError):
        m.inc("no_such_metric")


@pytest.mark.parametrize("value", [0.0, 0.001, 0.005, 0.0050001, 0.02, 0.1, 1.0, 3.0, 10.0,
                                   10.5, 99.0])
def test_an_observation_counts_in_every_bucket_it_does_not_exceed(value: float) -> None:
    # Prometheus buckets are cumulative: `le` counts every observation <= its bound, at the
    # bound included; +Inf counts them all. Observed twice: the second uses the cached series.
    client = fakeredis.FakeRedis()
    m = Metrics(client, interval=3600)
    for _ in range(2):
        m.observe("switchboard_fhir_request_seconds", value, operation="read")
    m.flush()
    text = render(client)
    for le in LATENCY_BUCKETS:
        expected = 2.0 if value <= le else 0.0
        line = f'switchboard_fhir_request_seconds_bucket{{le="{le}",operation="read"}}'
        assert f"{line} {expected}" in text, (le, text)
    assert 'switchboard_fhir_request_seconds_bucket{le="+Inf",operation="read"} 2.0' in text
    assert f'switchboard_fhir_request_seconds_sum{{operation="read"}} {2 * value}' in text


def test_histogram_series_keep_their_labels_apart() -> None:
    client = fakeredis.FakeRedis()
    m = Metrics(client, interval=3600)
    m.observe("switchboard_fhir_request_seconds", 0.02, operation="read")
    m.observe("switchboard_fhir_request_seconds", 0.2, operation="update")
    m.flush()
    text = render(client)
    assert 'switchboard_fhir_request_seconds_bucket{le="0.025",operation="read"} 1.0' in text
    assert 'switchboard_fhir_request_seconds_bucket{le="0.025",operation="update"} 0.0' in text
    assert 'switchboard_fhir_request_seconds_count{operation="update"} 1.0' in text
    with pytest.raises(ValueError):
        m.observe("switchboard_fhir_request_seconds", 0.1, op="read")
