"""The FHIR Subscription that makes the server push new replies to Switchboard (Medplum shape).

R4's Subscription has no `identifier`, so the one Switchboard owns is marked with a `meta.tag`
and written with a conditional update on that tag: run twice, it updates the same resource.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from worker.fhir.client import FhirClient

TAG_SYSTEM = "urn:switchboard:subscription"
TAG_CODE = "outbound-replies"
# Medplum's extensions (https://www.medplum.com/docs/subscriptions/subscription-extensions).
# The secret's URL has `www.`, the interaction filter's has not: both exactly as Medplum reads
# them.
SECRET_EXTENSION = "https://www.medplum.com/fhir/StructureDefinition/subscription-secret"  # noqa: S105
INTERACTION_EXTENSION = ("https://medplum.com/fhir/StructureDefinition/"
                         "subscription-supported-interaction")
# New child messages that are ready to go. Create only: our own updates of a message (provider
# id, delivery status) must not notify us again.
CRITERIA = "Communication?part-of:missing=false&status=in-progress"
SUBSCRIPTION_PATH = "/webhooks/fhir/subscription"
# Medplum's AuditEvent.outcome codes: 0 success, 4 minor failure (a failed attempt), 8 serious,
# 12 major.
FAILED_OUTCOMES = "4,8,12"


def tag_search() -> list[tuple[str, str]]:
    """The search that finds Switchboard's Subscription."""
    return [("_tag", f"{TAG_SYSTEM}|{TAG_CODE}")]


def endpoint(public_base_url: str) -> str:
    """Where the server posts notifications."""
    return public_base_url.rstrip("/") + SUBSCRIPTION_PATH


def subscription_resource(public_base_url: str, secret: str) -> dict[str, Any]:
    """The Subscription Switchboard installs (pure)."""
    return {
        "resourceType": "Subscription",
        "meta": {"tag": [{"system": TAG_SYSTEM, "code": TAG_CODE,
                          "display": "Switchboard automatic outbound"}]},
        "status": "active",
        "reason": "Switchboard: send clinicians' replies to patients by SMS or email",
        "criteria": CRITERIA,
        "channel": {"type": "rest-hook", "endpoint": endpoint(public_base_url),
                    "payload": "application/fhir+json"},
        "extension": [{"url": SECRET_EXTENSION, "valueString": secret},
                      {"url": INTERACTION_EXTENSION, "valueCode": "create"}],
    }


@dataclass(frozen=True)
class Installed:
    """What `install` did."""

    created: bool
    resource: dict[str, Any]


def install(fhir: FhirClient, public_base_url: str, secret: str) -> Installed:
    """Create or update Switchboard's Subscription (conditional update on its tag)."""
    answer = fhir.upsert(subscription_resource(public_base_url, secret), tag_search())
    return Installed(answer.created, answer.resource)


def installed(fhir: FhirClient) -> list[dict[str, Any]]:
    """Switchboard's Subscriptions on the server (one, unless someone copied it)."""
    bundle = fhir.search("Subscription", [*tag_search(), ("_count", "20")])
    return [e["resource"] for e in bundle.get("entry") or [] if isinstance(e, dict)
            and isinstance(e.get("resource"), dict)]


def failed_deliveries(fhir: FhirClient, subscription_id: str, count: int = 10
                      ) -> tuple[int | None, list[dict[str, Any]]]:
    """Failed delivery attempts Medplum recorded for a Subscription (its AuditEvents): the
    total when the server says it, and the latest few."""
    bundle = fhir.search("AuditEvent", [
        ("entity", f"Subscription/{subscription_id}"), ("outcome", FAILED_OUTCOMES),
        ("_sort", "-_lastUpdated"), ("_count", str(count)), ("_total", "accurate")])
    events = [e["resource"] for e in bundle.get("entry") or [] if isinstance(e, dict)
              and isinstance(e.get("resource"), dict)]
    total = bundle.get("total")
    return (total if isinstance(total, int) else None), events


def extension_value(resource: dict[str, Any], url: str) -> Any:
    """The value[x] of the first extension with this URL, or None."""
    for ext in resource.get("extension") or []:
        if isinstance(ext, dict) and ext.get("url") == url:
            return next((v for k, v in ext.items() if k.startswith("value")), None)
    return None
