"""The one place Redis clients are made from Settings: REDIS_URL alone, or the current primary
behind Sentinel (docs/redis-ha.md).

Every store, lock, pacing bucket, the inbox, metrics, the liveness janitor, the receiver and the
CLI take their client from here, and the broker its URL and transport options, so all of them
follow the same primary through a failover. With Sentinels, redis-py's `Sentinel.master_for`
asks the Sentinels for the primary on every new connection and drops a connection that finds
itself on a demoted primary (READONLY); nothing of ours tracks the topology.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote, unquote, urlsplit

import redis
from redis.connection import parse_url
from redis.sentinel import Sentinel

from worker.settings import Settings

# How long a question to one Sentinel may take before the next Sentinel is asked. A Sentinel
# answers from memory; this bounds a dead or partitioned one, not a busy one.
SENTINEL_TIMEOUT_SECONDS = 0.5
# kombu's Redis transport checks its long-lived connections (the BRPOP one included, kombu >=
# 5.7.0) this often, and drops a BRPOP whose reply is this much overdue (worker/broker/
# celery_app.py). Short, so a worker whose primary vanished without a TCP reset (a partition,
# a SIGSTOPped or powered-off host) notices within seconds rather than 25.
BROKER_HEALTH_CHECK_SECONDS = 2
# A synchronous broker command (publish, ack, the unacked bookkeeping) waiting longer than this
# is on a dead connection: without a socket timeout it would wait forever (kombu's docs).
BROKER_SOCKET_TIMEOUT_SECONDS = 5.0


def sentinel_kwargs(settings: Settings) -> dict[str, Any]:
    """Connection options of the Sentinels themselves (their password, a short timeout)."""
    out: dict[str, Any] = {"socket_timeout": SENTINEL_TIMEOUT_SECONDS,
                           "socket_connect_timeout": SENTINEL_TIMEOUT_SECONDS}
    password = settings.redis_sentinel_password.get_secret_value()
    if password:
        out["password"] = password
    return out


def sentinel(settings: Settings, **node_options: Any) -> Sentinel:
    """A redis-py Sentinel for REDIS_SENTINELS; `node_options` apply to the data nodes."""
    return Sentinel(settings.sentinel_addresses(),  # type: ignore[no-untyped-call]
                    sentinel_kwargs=sentinel_kwargs(settings), **node_options)


def redis_client(settings: Settings, socket_timeout: float,
                 socket_connect_timeout: float | None = None, **options: Any) -> redis.Redis:
    """A client of the current primary: `Redis.from_url(REDIS_URL)`, or with REDIS_SENTINELS
    `Sentinel.master_for(REDIS_SENTINEL_MASTER)` with REDIS_URL's database and credentials.
    Options are redis-py's (`health_check_interval`, `decode_responses`…)."""
    if not settings.redis_sentinels:
        return redis.Redis.from_url(settings.redis_url, socket_timeout=socket_timeout,
                                    socket_connect_timeout=socket_connect_timeout, **options)
    node = {**parse_url(settings.redis_url), **options}  # type: ignore[no-untyped-call]
    client: redis.Redis = sentinel(
        settings, socket_timeout=socket_timeout, socket_connect_timeout=socket_connect_timeout,
    ).master_for(settings.redis_sentinel_master, **node)  # type: ignore[no-untyped-call]
    return client


def broker_url(settings: Settings) -> str:
    """Celery's broker URL: REDIS_URL, or kombu's `sentinel://h1:p;sentinel://h2:p` form
    carrying REDIS_URL's credentials and database (kombu uses them for the primary)."""
    if not settings.redis_sentinels:
        return settings.redis_url
    node = urlsplit(settings.redis_url)
    auth = ""
    if node.password is not None or node.username:
        # Re-encoded from the decoded form: kombu splits the URL on ';' before decoding, so a
        # ';' (or '@', '/') left raw in REDIS_URL's password must not reach it as is.
        user, password = (quote(unquote(v or ""), safe="") for v in (node.username,
                                                                        node.password))
        auth = f"{user}:{password}@"
    db = node.path.lstrip("/") or "0"
    hosts = [f"[{h}]" if ":" in h else h for h, _ in settings.sentinel_addresses()]
    return ";".join(f"sentinel://{auth}{host}:{port}/{db}"
                    for host, (_, port) in zip(hosts, settings.sentinel_addresses(), strict=True))


def broker_transport_options(settings: Settings) -> dict[str, Any]:
    """The transport options the broker connection needs for this topology (merged into the
    app's own by worker/broker/celery_app.py)."""
    if not settings.redis_sentinels:
        return {}
    return {
        "master_name": settings.redis_sentinel_master,
        "sentinel_kwargs": sentinel_kwargs(settings),
        "socket_timeout": BROKER_SOCKET_TIMEOUT_SECONDS,
        "socket_connect_timeout": BROKER_SOCKET_TIMEOUT_SECONDS,
        "health_check_interval": BROKER_HEALTH_CHECK_SECONDS,
    }
