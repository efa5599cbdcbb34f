"""Delivery status callbacks: move the Communication along, never back from a final state."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from worker.errors import PermanentError, TransientError
from worker.fhir.client import FhirClient
from worker.fhir.query import token
from worker.fhir.update import guarded_update
from worker.outbound.status_map import next_status
from worker.stores.outbound_state import OutboundState

TWILIO_ERROR_SYSTEM = "https://www.twilio.com/docs/api/errors"


def apply_status(fhir: FhirClient, sid_system: str, params: Mapping[str, str],
                 state: OutboundState, request_system: str = "urn:switchboard:outbound-request"
                 ) -> str:
    """Apply one Twilio status callback; returns what happened ("completed", "ignored", …)."""
    sid = (params.get("MessageSid") or params.get("SmsSid") or "").strip()
    status = (params.get("MessageStatus") or params.get("SmsStatus") or "").strip().lower()
    if not sid or not status:
        raise PermanentError("invalid-payload", "MessageSid and MessageStatus are required")
    error_code = (params.get("ErrorCode") or "").strip()
    if not re.fullmatch(r"[0-9]{1,6}", error_code):
        error_code = ""  # the receiver refuses other shapes; never trust one that got here
    found = fhir.search("Communication", [("identifier", token(sid_system, sid)),
                                          ("_count", "2")])
    entries = [e["resource"] for e in found.get("entry") or []]
    if not entries:
        # Twilio can call back before our own record of the send reached FHIR: try again.
        raise TransientError("communication-not-found", "no Communication has this MessageSid")
    comm_id = str(entries[0]["id"])
    outcome: dict[str, str] = {"result": "ignored"}

    def change(c: dict[str, Any]) -> dict[str, Any] | None:
        target = next_status(str(c.get("status", "")), status)
        if target is None:
            return None
        c["status"] = target
        if target == "stopped":
            codings = [{"system": TWILIO_ERROR_SYSTEM, "code": error_code}] if error_code else []
            c["statusReason"] = {"coding": codings,
                                 "text": f"Twilio: {status}"
                                         + (f" (error {error_code})" if error_code else "")}
        outcome["result"] = target
        return c

    written = guarded_update(fhir, "Communication", comm_id, change)
    if written is not None:
        request_id = next((i.get("value") for i in written.get("identifier") or []
                           if i.get("system") == request_system), None)
        if request_id:
            if outcome["result"] == "completed":
                state.update(str(request_id), "delivered", communication=comm_id)
            elif outcome["result"] == "stopped":
                state.update(str(request_id), "failed", communication=comm_id,
                             error="undelivered",
                             provider_code=int(error_code) if error_code else None)
    return outcome["result"]
