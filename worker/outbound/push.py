"""Push fan-out: one Communication, one push to each of the patient's active devices, once each.

The send ledger is kept per (communication, device) (worker.stores.send_ledger.device_send), so
a redelivery after two of three devices were pushed pushes only the third. Pacing is per push,
on the project's shared rate: the wait before each device is a Deferred (no retry spent), with
every device pushed so far already in the ledger.

The message counts as sent when at least one device accepted it. A device whose token FCM calls
dead (UNREGISTERED, SENDER_ID_MISMATCH, INVALID_ARGUMENT on the token) is set inactive in FHIR
with the reason and time, so no later send tries it. A retryable failure (429, 5xx) retries the
task: devices already pushed are skipped then.

Devices are registered and unregistered here too (`apply_device_change`, from /v1/devices).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from worker.channels import SendError
from worker.channels.fcm import CHANNEL, error_code_of, valid_token
from worker.errors import PermanentError, TransientError
from worker.fhir.client import FhirClient
from worker.fhir.devices import active_devices, deactivate, deactivate_token, register
from worker.messages import SendResult
from worker.outbound.sending import (
    OutboundDeps,
    OutboundRequest,
    build_message,
    count_send,
    deferral,
    record_sent,
)
from worker.stores.send_ledger import device_send

log = logging.getLogger("switchboard.outbound")


def has_device(deps: OutboundDeps, patient_id: str) -> bool:
    """Whether the patient has an active push device (push is configured and reachable)."""
    return CHANNEL in deps.channels and bool(
        active_devices(deps.fhir, deps.device_system, patient_id))


def send_push(req: OutboundRequest, deps: OutboundDeps, comm: dict[str, Any], comm_id: str,
              patient_id: str, task_id: str) -> SendResult:
    """Push one Communication to every active device of the patient; raises SendError (or
    Deferred / TransientError) like worker.outbound.pipeline does for one send."""
    impl = deps.channels.get(CHANNEL)
    if impl is None:
        raise SendError("misconfigured", "channel push is not configured")
    devices = active_devices(deps.fhir, deps.device_system, patient_id)
    if not devices:
        raise SendError("invalid-recipient", "the patient has no active push device")
    accepted: list[str] = []
    outcomes: list[str] = []
    other: SendError | None = None  # a refusal of the message itself (not of one device)
    slot = req.rate_slot  # reserved by an earlier run for the first device still to push
    for device in devices:
        key = device_send(comm_id, device.id)
        gate = deps.gate.open(key, task_id, f"{CHANNEL}:{impl.sender_key()}",
                              deps.rates[CHANNEL], slot)
        if gate.done is not None:  # pushed by an earlier run: the slot stays for the next
            accepted.append(gate.done["provider_id"])
            outcomes.append(f"push to Device/{device.id}: sent as {gate.done['provider_id']}")
            continue
        if gate.outcome == "wait":
            raise deferral(gate, deps, CHANNEL)
        slot = None
        held = gate.claim
        if held is not None:
            if held.age < deps.claim_seconds:
                raise TransientError("send-in-progress", "another attempt is pushing this message")
            # Its holder died while FCM answered: pushing again could notify twice.
            outcomes.append(f"push to Device/{device.id}: outcome-unknown")
            continue
        try:
            result = impl.send(build_message(comm, comm_id, device.token))
        except SendError as exc:
            count_send(deps, CHANNEL, exc.kind)
            if exc.kind != "outcome-unknown":
                deps.ledger.release(key)  # FCM refused: nothing went out to this device
            exc.channel = CHANNEL
            if exc.retryable:
                raise  # the task retries; the devices pushed so far are in the ledger
            outcomes.append(f"push to Device/{device.id}: {exc.kind} ({exc.detail})")
            if exc.kind == "invalid-recipient":
                code = error_code_of(exc)
                deactivate(deps.fhir, device.id, code, f"FCM answered {exc.detail}")
                log.warning("push token of Device/%s is dead (%s); the Device is now inactive",
                            device.id, code)
            elif exc.kind != "outcome-unknown":
                other = other or exc
            continue
        count_send(deps, CHANNEL, "sent")
        deps.ledger.record(key, {"provider_id": result.provider_id, "channel": CHANNEL,
                                 "device": device.id})
        accepted.append(result.provider_id)
        outcomes.append(f"push to Device/{device.id}: sent as {result.provider_id}")
    if not accepted:
        if other is not None:
            raise _with(other, outcomes)
        unknown = all(o.endswith("outcome-unknown") for o in outcomes)
        raise _with(SendError("outcome-unknown" if unknown else "invalid-recipient",
                              f"no device accepted the push ({len(devices)} tried)"), outcomes)
    result = SendResult(provider_id=accepted[0], status="accepted")
    sent = {"provider_id": result.provider_id, "channel": CHANNEL, "message_id": ""}
    # From here on a redelivery sends nothing at all; the request's state in the same step.
    deps.ledger.record(comm_id, sent, deps.state.change(
        req.request_id, "sent", communication=comm_id, devices=len(accepted), **sent))
    log.info("outbound Communication/%s sent by push to %d of %d devices", comm_id,
             len(accepted), len(devices))
    # Each device's outcome goes on the Communication as a note (ids and FCM names, no tokens).
    record_sent(deps, comm_id, CHANNEL, result, [*req.attempts, *outcomes], req.request_id,
                 known=comm)
    return result


def _with(exc: SendError, outcomes: list[str]) -> SendError:
    exc.channel = CHANNEL
    exc.attempts = (*exc.attempts, *outcomes)
    return exc


def apply_device_change(fhir: FhirClient, system: str, payload: Mapping[str, Any]) -> str:
    """Carry out one `switchboard.devices.update` task (from POST/DELETE /v1/devices): register
    a token for a patient, or deactivate it. A payload of the wrong shape is a PermanentError."""
    action, push_token = payload.get("action"), payload.get("token")
    if not isinstance(push_token, str) or not valid_token(push_token):
        raise PermanentError("invalid-payload", "token must be an FCM registration token")
    if action == "register":
        patient = payload.get("patient")
        if not isinstance(patient, str):
            raise PermanentError("invalid-payload", "patient must be a Patient reference")
        return register(fhir, system, push_token, patient)
    if action == "unregister":
        changed = deactivate_token(fhir, system, push_token, "UNREGISTERED-BY-APP",
                                   "the app unregistered this token")
        return "deactivated" if changed else "unchanged"
    raise PermanentError("invalid-payload", "action must be register or unregister")
