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
# How a worker follows a failover (celery/celery#6348: a worker blocked in BRPOP on a primary
# that dies never fails over). A SIGKILLed primary is easy: its sockets are reset and Celery's
# consumer reconnects through the Sentinels. A primary that goes silent (a stopped process, a
# partitioned or powered-off host) resets nothing, and the worker's event loop holds two kinds
# of stale connection: the BRPOP one (async pool) and the synchronous ones (sync pool; the
# unacked bookkeeping after each BRPOP goes through them). Measured here (tests/integration/
# test_redis_ha.py, SIGSTOP): with kombu's defaults the worker never resumed; with only a
# socket timeout and a short health check, kombu dropped the stale BRPOP first, the new BRPOP
# popped a message from the NEW primary, and recording it as unacked on a stale synchronous
# connection timed out: the message was left to the inbox sweep (30 min). So, with stock options:
# - the synchronous commands time out (BROKER_SOCKET_TIMEOUT_SECONDS), and kombu's unacked
#   restore runs on them every second (unacked_restore_interval=1, the throttle is 1 already):
#   within about a second of the primary going silent one of them times out on the event loop,
#   and the next connection of that pool asks the Sentinels, which makes redis-py drop every
#   idle connection to the old primary (SentinelConnectionPool.get_master_address);
# - kombu's own check of a BRPOP overdue by brpop_timeout + health_check_interval drops the stale
#   BRPOP later than that (BROKER_HEALTH_CHECK_SECONDS), so the first message popped from the
#   new primary is recorded there too. The cost: ~3 Redis round trips a second per worker.
BROKER_HEALTH_CHECK_SECONDS = 5
# A synchronous broker command (publish, ack, the unacked bookkeeping) waiting longer than this
# is on a dead connection (kombu's docs: without a socket timeout it waits forever). It also
# bounds how long the event loop stalls on one.
BROKER_SOCKET_TIMEOUT_SECONDS = 3.0
BROKER_UNACKED_RESTORE_SECONDS = 1


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
    hosts = [(f"[{h}]" if ":" in h else h, p) for h, p in settings.sentinel_addresses()]
    return ";".join(f"sentinel://{auth}{host}:{port}/{db}" for host, port in hosts)


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
        "unacked_restore_interval": BROKER_UNACKED_RESTORE_SECONDS,
    }
