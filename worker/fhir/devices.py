"""Push device tokens as FHIR `Device` resources (shape: docs/channels.md, "Push (FCM)").

    {"resourceType": "Device", "status": "active",
     "identifier": [{"system": DEVICE_TOKEN_SYSTEM, "value": "<FCM registration token>"}],
     "patient": {"reference": "Patient/<id>"}}

A token is one Device whatever patient it belongs to now (conditional create on the token), so
a phone handed to another patient moves its Device instead of pushing to both.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from worker.fhir.client import FhirClient
from worker.fhir.query import token as token_param
from worker.fhir.reference import parse_reference
from worker.fhir.resources import identifier
from worker.fhir.update import guarded_update

DEVICE_STATUS_REASON_SYSTEM = "urn:switchboard:device-status-reason"


@dataclass(frozen=True)
class PushDevice:
    """An active device of a patient: its FHIR id and its push token."""

    id: str
    token: str


def device_resource(system: str, push_token: str, patient_ref: str) -> dict[str, Any]:
    """A new active Device for `push_token`, owned by `patient_ref` (pure)."""
    return {"resourceType": "Device", "status": "active",
            "identifier": [identifier(system, push_token)],
            "patient": {"reference": patient_ref},
            "type": {"text": "Push notification token (FCM)"}}


def _token_of(device: Mapping[str, Any], system: str) -> str | None:
    for ident in device.get("identifier") or []:
        if isinstance(ident, Mapping) and ident.get("system") == system and ident.get("value"):
            return str(ident["value"])
    return None


def active_devices(fhir: FhirClient, system: str, patient_id: str) -> list[PushDevice]:
    """The patient's active Devices that carry a push token, oldest first."""
    found = fhir.search("Device", [("patient", f"Patient/{patient_id}"), ("status", "active"),
                                   ("_sort", "_lastUpdated"), ("_count", "50")])
    devices = []
    for entry in found.get("entry") or []:
        resource = entry.get("resource") or {}
        push_token = _token_of(resource, system)
        # The server filtered; checked again because a patient app writes these itself.
        owner = (resource.get("patient") or {}).get("reference")
        if push_token and resource.get("status") == "active" and \
                owner == f"Patient/{patient_id}" and resource.get("id"):
            devices.append(PushDevice(str(resource["id"]), push_token))
    return devices


def register(fhir: FhirClient, system: str, push_token: str, patient_ref: str) -> str:
    """Make `push_token` an active Device of `patient_ref`; idempotent. Returns what happened:
    "created", "unchanged" or "updated" (moved to this patient, or active again)."""
    patient = parse_reference(patient_ref, {"Patient"})
    wanted = f"Patient/{patient.id}"
    created = fhir.create(device_resource(system, push_token, wanted),
                          if_none_exist=[("identifier", token_param(system, push_token))])
    if created.created:
        return "created"
    outcome = {"result": "unchanged"}

    def change(d: dict[str, Any]) -> dict[str, Any] | None:
        if d.get("status") == "active" and (d.get("patient") or {}).get("reference") == wanted:
            return None
        d["status"] = "active"
        d["patient"] = {"reference": wanted}
        d.pop("statusReason", None)
        outcome["result"] = "updated"
        return d

    guarded_update(fhir, "Device", str(created.resource["id"]), change)
    return outcome["result"]


def deactivate(fhir: FhirClient, device_id: str, code: str, text: str,
               when: datetime | None = None) -> bool:
    """Set a Device inactive with the reason and the time (no later push tries it)."""
    at = (when or datetime.now(UTC)).isoformat(timespec="seconds")
    done = {"changed": False}

    def change(d: dict[str, Any]) -> dict[str, Any] | None:
        if d.get("status") == "inactive":
            return None
        d["status"] = "inactive"
        d["statusReason"] = [{"coding": [{"system": DEVICE_STATUS_REASON_SYSTEM, "code": code}],
                              "text": text}]
        d["note"] = [*(d.get("note") or []), {"time": at, "text": f"{code}: {text}"}]
        done["changed"] = True
        return d

    guarded_update(fhir, "Device", device_id, change)
    return done["changed"]


def deactivate_token(fhir: FhirClient, system: str, push_token: str, code: str, text: str
                     ) -> int:
    """Deactivate every Device carrying `push_token` (the app unregistered it); returns how many
    changed."""
    found = fhir.search("Device", [("identifier", token_param(system, push_token)),
                                   ("_count", "10")])
    return sum(deactivate(fhir, str(e["resource"]["id"]), code, text)
               for e in found.get("entry") or [] if (e.get("resource") or {}).get("id"))
