"""WhatsApp's 24-hour windows and the replies held while a window is closed.

Windows: when each patient last wrote to each of our WhatsApp senders, from the inbound
messages we wrote (a free-form reply is allowed for 24 hours after it). One string per (patient,
sender), named by a keyed HMAC (no number in a key name), holding only a time, expiring with
the window. Losing it is safe: the outbound side asks FHIR for the patient's last WhatsApp
message, and Twilio's 63016 corrects what both got wrong (worker/outbound/whatsapp.py).

Held replies: per (patient, sender) a sorted set of Communication ids in the order they were
held (the order they are released in), one sealed record per reply (its API request), an index
of every held reply by time (listing and expiry), and a marker that the template asking the
patient to write went out for this hold. Nothing in clear says who the patient is.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Any

import redis

from worker.crypto import Sealer
from worker.stores import Resealed, reseal_strings, sealed_text

PREFIX = "switchboard:whatsapp:"
WINDOW = PREFIX + "window:"
QUEUE = PREFIX + "held:"
ITEM = PREFIX + "held-item:"
ALL = PREFIX + "held-all"
TEMPLATE = PREFIX + "template:"

# Keep the latest inbound time only (two messages may be processed out of order); the key
# expires when the window closes. KEYS: window key. ARGV: inbound time, window length (s).
_OPENED = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
local at = tonumber(ARGV[1])
if at > current then
  redis.call('SET', KEYS[1], ARGV[1], 'EXAT', math.floor(at + tonumber(ARGV[2])))
end
return 1
"""
# Hold one reply: queue, index and record, once. KEYS: queue, index, record. ARGV: time,
# Communication id, sealed record. Returns 1 when newly held.
_HOLD = """
local added = redis.call('ZADD', KEYS[1], 'NX', ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], 'NX', ARGV[1], ARGV[2])
redis.call('SET', KEYS[3], ARGV[3], 'NX')
return added
"""


@dataclass(frozen=True)
class HeldReply:
    """One held reply: its Communication, API request, queue and when it was held."""

    communication_id: str
    request_id: str
    queue: str
    held_at: float


class WhatsAppStore:
    """The windows and held replies (see the module's doc)."""

    def __init__(self, client: redis.Redis, sealer: Sealer, key: bytes,
                 window_seconds: float) -> None:
        if not key:
            raise ValueError("an address key is required")
        self._r: Any = client
        self._sealer = sealer
        self._key = key
        self._window = window_seconds
        self._opened = client.register_script(_OPENED)
        self._hold = client.register_script(_HOLD)

    def queue(self, patient: str, sender: str) -> str:
        """The keyed name of one (patient number, our sender) pair: no number in clear."""
        return hmac.new(self._key, f"whatsapp:{patient}|{sender}".encode(),
                        hashlib.sha256).hexdigest()[:40]

    # -- windows ------------------------------------------------------------------------------

    def opened(self, queue: str, at: float) -> None:
        """The patient wrote at `at` (epoch seconds): the window runs 24 hours from then."""
        self._opened(keys=[WINDOW + queue], args=[f"{at:.3f}", int(self._window)])

    def last_inbound(self, queue: str) -> float | None:
        """When the patient last wrote, while the window is open (None: closed or unknown)."""
        raw = self._r.get(WINDOW + queue)
        return float(raw) if raw else None

    def close(self, queue: str) -> None:
        """Twilio said the window is closed (63016): forget what we believed."""
        self._r.delete(WINDOW + queue)

    # -- held replies -------------------------------------------------------------------------

    def hold(self, queue: str, communication_id: str, request_id: str, at: float) -> bool:
        """Hold a reply for the patient's answer (idempotent); True when newly held."""
        record = self._sealer.seal_json({"request_id": request_id, "queue": queue, "at": at})
        return bool(self._hold(keys=[QUEUE + queue, ALL, ITEM + communication_id],
                               args=[f"{at:.3f}", communication_id, record]))

    def template_due(self, queue: str, keep_seconds: float) -> bool:
        """True once per hold: the template asking the patient to write is to go out now (the
        marker is set before the send, so a redelivery never sends it twice)."""
        return bool(self._r.set(TEMPLATE + queue, "1", nx=True, ex=max(1, int(keep_seconds))))

    def template_failed(self, queue: str) -> None:
        """The template did not go out: the next hold (or retry) sends it."""
        self._r.delete(TEMPLATE + queue)

    def held(self, queue: str) -> list[str]:
        """The Communication ids held for this pair, oldest first."""
        return [m.decode() for m in self._r.zrange(QUEUE + queue, 0, -1)]

    def get(self, communication_id: str) -> HeldReply | None:
        """The held reply of this Communication, if it is held."""
        raw = self._r.get(ITEM + communication_id)
        if raw is None:
            return None
        record = self._sealer.open_json(raw.decode())
        return HeldReply(communication_id, str(record["request_id"]), str(record["queue"]),
                         float(record["at"]))

    def release(self, communication_id: str) -> None:
        """No longer held (sent, failed or expired); the hold's template marker goes with
        the last one."""
        reply = self.get(communication_id)
        pipe = self._r.pipeline()
        if reply is not None:
            pipe.zrem(QUEUE + reply.queue, communication_id)
        pipe.zrem(ALL, communication_id)
        pipe.delete(ITEM + communication_id)
        pipe.execute()
        if reply is not None and not self._r.zcard(QUEUE + reply.queue):
            self._r.delete(TEMPLATE + reply.queue)

    def all(self) -> list[HeldReply]:
        """Every held reply, oldest first."""
        ids = [m.decode() for m in self._r.zrange(ALL, 0, -1)]
        return [r for r in (self.get(i) for i in ids) if r is not None]

    def held_before(self, cutoff: float) -> list[str]:
        """The Communication ids held before `cutoff` (epoch seconds), oldest first."""
        return [m.decode() for m in self._r.zrangebyscore(ALL, "-inf", f"({cutoff:.3f}")]

    def reseal(self) -> Resealed:
        """Seal every held reply's record with the first key (`switchboard keys rotate`)."""
        return reseal_strings(self._r, ITEM + "*", sealed_text(self._sealer))
