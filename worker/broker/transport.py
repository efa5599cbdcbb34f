"""kombu's Redis transport, with one Redis client per channel for its synchronous commands.

kombu builds a new `redis.Redis` object for every publish, acknowledgement and unacked record
it makes outside the consumer's poll (`Channel.conn_or_acquire` → `_create_client`). With
redis-py 5 and later that constructor is no longer cheap (it copies the response-callback
table), and a worker makes three such calls per task for Flower's task events alone: it was a
twelfth of a send's worker CPU (py-spy, bench/results.md "Outbound sends"). A `redis.Redis`
over a connection pool is safe to share between threads (each command checks a connection out
of the pool), so the channel keeps one. Nothing on the wire changes: the same commands, keys and
messages, consumed by any stock kombu or Celery.
"""

from __future__ import annotations

from typing import Any

from kombu.transport import redis as kombu_redis


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
