"""REDIS_SENTINELS and friends: validated at start-up, and turned into the broker URL and the
transport options kombu needs (worker/stores/connection.py). Pure: no Redis is contacted."""

from __future__ import annotations

import pytest

from tests.unit.test_settings import GOOD
from worker.settings import ConfigError, load_settings
from worker.stores.connection import (
    broker_transport_options,
    broker_url,
    redis_client,
    sentinel_kwargs,
)

HA = {**GOOD, "REDIS_SENTINELS": " 10.0.0.1:26379, s2.example.org:26380 ,[fd00::3]:26381",
      "REDIS_SENTINEL_MASTER": "switchboard"}


def test_without_sentinels_nothing_changes() -> None:
    s = load_settings(GOOD)
    assert (s.redis_sentinels, s.redis_sentinel_master, s.redis_min_replicas_ack) == ("", "", 0)
    assert broker_url(s) == GOOD["REDIS_URL"]
    assert broker_transport_options(s) == {}
    client = redis_client(s, socket_timeout=2)  # no connection is made until a command
    assert client.connection_pool.connection_kwargs["port"] == 6379
    assert client.connection_pool.connection_kwargs["socket_timeout"] == 2


def test_sentinel_addresses_are_parsed_and_normalised() -> None:
    s = load_settings(HA)
    assert s.redis_sentinels == "10.0.0.1:26379,s2.example.org:26380,[fd00::3]:26381"
    assert s.sentinel_addresses() == [("10.0.0.1", 26379), ("s2.example.org", 26380),
                                      ("fd00::3", 26381)]


@pytest.mark.parametrize("value", [
    "10.0.0.1", "10.0.0.1:0", "10.0.0.1:65536", "host:port", "-bad:26379", "a b:26379",
    "fd00::3:26379", "10.0.0.1:26379/0", "redis://10.0.0.1:26379", "h:26379;h2:26379",
    "h:26379\nh2:26379",
])
def test_a_bad_sentinel_address_is_refused(value: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_settings({**HA, "REDIS_SENTINELS": value})
    assert "REDIS_SENTINELS: Value error, must be comma-separated host:port" in str(exc.value)


@pytest.mark.parametrize("name", ["my master", "a/b", "x" * 65, "na\nme", "ü"])
def test_a_bad_master_name_is_refused(name: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_settings({**HA, "REDIS_SENTINEL_MASTER": name})
    assert "REDIS_SENTINEL_MASTER" in str(exc.value)


@pytest.mark.parametrize("missing", ["REDIS_SENTINELS", "REDIS_SENTINEL_MASTER"])
def test_sentinels_and_master_name_go_together(missing: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_settings({k: v for k, v in HA.items() if k != missing})
    assert "REDIS_SENTINELS and REDIS_SENTINEL_MASTER go together" in str(exc.value)


@pytest.mark.parametrize("url", ["unix:///run/redis.sock", "rediss://10.0.0.9:6380/0"])
def test_behind_sentinel_redis_url_is_plain_redis(url: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_settings({**HA, "REDIS_URL": url})
    assert "REDIS_URL must be a redis:// URL" in str(exc.value)


@pytest.mark.parametrize("value", ["-1", "17", "one"])
def test_min_replicas_ack_is_bounded(value: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_settings({**GOOD, "REDIS_MIN_REPLICAS_ACK": value})
    assert "REDIS_MIN_REPLICAS_ACK" in str(exc.value)


def test_the_broker_url_names_every_sentinel_with_the_nodes_credentials_and_db() -> None:
    s = load_settings({**HA, "REDIS_URL": "redis://:p%40ss%3Bw@ignored:6379/3"})
    assert broker_url(s) == ";".join([
        "sentinel://:p%40ss%3Bw@10.0.0.1:26379/3", "sentinel://:p%40ss%3Bw@s2.example.org:26380/3",
        "sentinel://:p%40ss%3Bw@[fd00::3]:26381/3"])
    assert broker_url(load_settings(HA)) == ";".join(
        f"sentinel://{a}/0" for a in ("10.0.0.1:26379", "s2.example.org:26380", "[fd00::3]:26381"))


def test_the_transport_options_carry_the_master_name_and_the_sentinel_password() -> None:
    s = load_settings({**HA, "REDIS_SENTINEL_PASSWORD": "s3nt1nel-pw"})
    options = broker_transport_options(s)
    assert options["master_name"] == "switchboard"
    assert options["sentinel_kwargs"]["password"] == "s3nt1nel-pw"
    assert options["socket_timeout"] > 0 and options["health_check_interval"] > 0
    assert "password" not in sentinel_kwargs(load_settings(HA))
    assert "s3nt1nel-pw" not in repr(s)


def test_the_celery_app_uses_them() -> None:
    from worker.broker.celery_app import create_celery

    s = load_settings({**HA, "REDIS_SENTINEL_PASSWORD": "s3nt1nel-pw"})
    app = create_celery(s)
    assert app.conf.broker_url == broker_url(s)
    options = app.conf.broker_transport_options
    assert options["master_name"] == "switchboard"
    assert options["visibility_timeout"] == s.broker_visibility_timeout_seconds  # kept


def test_a_sentinel_client_follows_the_master_name_with_the_urls_db_and_password() -> None:
    s = load_settings({**HA, "REDIS_URL": "redis://:nodepw@ignored:6379/5",
                       "REDIS_SENTINEL_PASSWORD": "s3nt1nel-pw"})
    client = redis_client(s, socket_timeout=2, socket_connect_timeout=1)
    pool = client.connection_pool
    assert pool.service_name == "switchboard"
    assert pool.connection_kwargs["db"] == 5
    assert pool.connection_kwargs["password"] == "nodepw"
    assert pool.connection_kwargs["socket_timeout"] == 2
    sentinels = pool.sentinel_manager.sentinels
    assert [c.connection_pool.connection_kwargs["port"] for c in sentinels] == [26379, 26380,
                                                                                26381]
    assert all(c.connection_pool.connection_kwargs["password"] == "s3nt1nel-pw"
               for c in sentinels)
