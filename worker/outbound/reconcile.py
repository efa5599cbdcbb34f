"""Stuck sends: outbound messages still in progress long after the provider took them.

A status callback can be lost (our receiver down, Twilio gave up). Periodically (Celery beat),
find outbound Communications that are still `in-progress`, carry a Twilio MessageSid and were
last updated more than STUCK_AFTER_SECONDS ago; ask Twilio for each message's status and apply
it exactly as a callback would (worker.outbound.status), so the same terminal-state rules hold.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

from worker.channels import SendError
from worker.channels.twilio import TwilioSms
from worker.errors import TransientError
from worker.fhir.client import FhirClient
from worker.ops.metrics import Metrics
from worker.outbound.status import OutsideWindow, apply_status
from worker.stores.outbound_state import OutboundState

log = logging.getLogger("switchboard.reconcile")


def reconcile_stuck(fhir: FhirClient, channel: TwilioSms, sid_system: str, request_system: str,
                    state: OutboundState, metrics: Metrics, stuck_after: float,
                    batch: int = 100, now: datetime | None = None,
                    outside_window: OutsideWindow | None = None) -> dict[str, int]:
    """Reconcile up to `batch` stuck SMS and WhatsApp sends (one Messages API, one SID
    system); returns counts by outcome. A WhatsApp send Twilio failed with 63016 is held as
    its callback would have held it (`outside_window`)."""
    cutoff = (now or datetime.now(UTC)) - timedelta(seconds=stuck_after)
    bundle = fhir.search("Communication", [
        ("status", "in-progress"),
        ("identifier", f"{request_system}|"),  # sent by us (outbound), any request id
        ("identifier", f"{sid_system}|"),  # with a Twilio MessageSid
        # UTC with "Z": the engine compares dates as strings, the server parses them.
        ("_lastUpdated", "lt" + cutoff.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"),
        ("_count", str(batch)),
    ])
    counts = {"checked": 0, "completed": 0, "stopped": 0, "unchanged": 0, "errors": 0}
    for entry in bundle.get("entry") or []:
        comm = entry.get("resource") or {}
        sid = next((i.get("value") for i in comm.get("identifier") or []
                    if i.get("system") == sid_system), None)
        if not sid:
            continue
        counts["checked"] += 1
        try:
            status, error_code, to = channel.fetch_status(str(sid))
            result = apply_status(fhir, sid_system, {"MessageSid": str(sid),
                                                     "MessageStatus": status,
                                                     "ErrorCode": error_code, "To": to},
                                  state, request_system, outside_window)
        except (SendError, TransientError) as exc:
            counts["errors"] += 1
            log.warning("reconcile %s failed: %s", sid, getattr(exc, "kind", None) or
                        getattr(exc, "reason", "error"))
            continue
        outcome = result if result in ("completed", "stopped") else "unchanged"
        counts[outcome] += 1
    for outcome, n in counts.items():
        if n and outcome != "checked":
            metrics.inc("switchboard_reconciled", n, outcome=outcome)
    log.info("reconciled stuck sends: %s", counts)
    return counts
