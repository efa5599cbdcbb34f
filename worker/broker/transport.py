"""kombu's Redis transport, with one Redis client per channel for its synchronous commands, and
no two-second pause under the gevent pool.

kombu builds a new `redis.Redis` object for every publish, acknowledgement and unacked record
it makes outside the consumer's poll (`Channel.conn_or_acquire` → `_create_client`). With
redis-py 5 and later that constructor is no longer cheap (it copies the response-callback
table), and a worker makes three such calls per task for Flower's task events alone: it was a
twelfth of a send's worker CPU (py-spy, bench/results.md "Outbound sends"). A `redis.Redis`
over a connection pool is safe to share between threads (each command checks a connection out
of the pool), so the channel keeps one. Nothing on the wire changes: the same commands, keys and
messages, consumed by any stock kombu or Celery.

Under the gevent (or eventlet) pool Celery runs a synchronous loop: ack what finished, then
`drain_events(timeout=2.0)`. While every prefetch slot is taken (acks late, a prefetch of 1),
kombu's Redis transport stops its BRPOP and waits out that timeout on its other connections (the
control channel); a task that finishes meanwhile frees a slot nobody asks to refill, so the next
message waited up to 2 s (bench: 6 sends/s against 119 under threads). So while the slots are
full the wait is cut to WAIT_WHILE_FULL_SECONDS: the loop comes round, sees the freed slot and
asks again. The threads and prefork pools run kombu's event loop instead and never call this.

`install()` makes it the transport of `redis://` and `rediss://` URLs in this process. Naming
the class in `broker_transport` instead would put its import path where the scheme goes in the
broker URI that Celery prints and Flower reads (`Connection.as_uri()`), and Flower's broker page
and queue lengths know only `redis://`.
"""

from __future__ import annotations

from typing import Any

from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import redis as kombu_redis

# 1 ms: a freed slot is refilled within a millisecond (at 20 ms the gevent pool sent 0.62 of
# the bare task's rate, at 1 ms about 0.8); the loop comes round at most a thousand times a
# second, and only while every slot is busy.
WAIT_WHILE_FULL_SECONDS = 0.001
SCHEMES = ("redis", "rediss")


class Channel(kombu_redis.Channel):
    """A Redis channel that reuses its synchronous client."""

    _sync_client: Any = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:  # the consumer's BRPOP/LISTEN client: kombu caches it already
            return super()._create_client(asynchronous=True)  # type: ignore[no-untyped-call]
        client = self._sync_client
        # A reconnect or a fork builds a new pool: the kept client must not outlive its own.
        if client is None or client.connection_pool is not self.pool:
            client = self._sync_client = super()._create_client()  # type: ignore[no-untyped-call]
        return client


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with the channel above."""

    Channel = Channel

    def drain_events(self, connection: Any, timeout: Any = None) -> Any:  # type: ignore[override]
        # Only a bounded wait is shortened: a caller that asked to block keeps blocking.
        if timeout is not None and any(channel.active_queues and not channel.qos.can_consume()
                                       for channel in self.channels):
            timeout = min(timeout, WAIT_WHILE_FULL_SECONDS)
        return super().drain_events(connection, timeout=timeout)  # type: ignore[no-untyped-call]


def install() -> None:
    """Use this transport for every `redis://` and `rediss://` broker URL of this process."""
    for scheme in SCHEMES:
        TRANSPORT_ALIASES[scheme] = f"{__name__}:Transport"
