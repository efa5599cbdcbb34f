"""The outbound baseline: a bare Celery app whose one task makes the same Twilio call a
Switchboard SMS send makes (the real `twilio` SDK, one client per thread, the same form and
status callback), and nothing else: no FHIR, no ledger, no pacing, stock Celery settings.

    REDIS_URL=... BARE_TWILIO_BASE=... celery -A tests.bench.bare_outbound worker -P threads
"""

from __future__ import annotations

import os
import threading
from typing import Any
from urllib.parse import urlsplit

from celery import Celery
from twilio.http.http_client import TwilioHttpClient
from twilio.rest import Client

TASK = "bare.send"
QUEUE = "bare"
app = Celery("bare", broker=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
app.conf.update(task_ignore_result=True, task_default_queue=QUEUE,
                broker_connection_retry_on_startup=True,
                # Task events (what Flower shows) when the benchmark asks, as Switchboard's
                # worker sends them: the same monitoring cost on both sides.
                worker_send_task_events=os.environ.get("BARE_TASK_EVENTS") == "1")
_local = threading.local()


class _ToSandbox(TwilioHttpClient):  # type: ignore[misc]
    """Sends every api.twilio.com request to the provider sandbox instead."""

    def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        parts = urlsplit(url)
        url = os.environ["BARE_TWILIO_BASE"].rstrip("/") + parts.path
        return super().request(method, url, *args, **kwargs)


def _sdk_http() -> Any:
    """The SDK's own `requests` client (stock), or, with BARE_HTTP=switchboard, the one
    Switchboard's channel gives the SDK (worker.http): what the send costs Switchboard apart
    from how cheaply its HTTP is made."""
    if os.environ.get("BARE_HTTP") == "switchboard":
        from worker.channels.twilio import sdk_http_client

        return sdk_http_client(os.environ["BARE_TWILIO_BASE"], 10)
    return _ToSandbox(timeout=10)


@app.task(name=TASK)
def send(to: str, body: str) -> str:
    """One Twilio Messages.create, as a stock Celery task."""
    client = getattr(_local, "client", None)
    if client is None:
        client = _local.client = Client(os.environ["BARE_TWILIO_SID"],
                                        os.environ["BARE_TWILIO_TOKEN"],
                                        http_client=_sdk_http())
    message = client.messages.create(to=to, from_=os.environ["BARE_TWILIO_FROM"], body=body,
                                     status_callback=os.environ["BARE_STATUS_CALLBACK"])
    return str(message.sid)
