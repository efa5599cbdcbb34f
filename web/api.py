"""`/v1/messages`: other services ask for a message to be sent, and may wait for the verdict."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
import uuid
from typing import Annotated, Any, Literal

import redis
from flask import Blueprint, Response, current_app, jsonify, request
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from web.enqueue import EnqueueFailed, Enqueuer
from worker.broker.celery_app import QUEUE_OUTBOUND, TASK_DEVICE_UPDATE, TASK_OUTBOUND_SEND
from worker.channels.fcm import valid_token
from worker.fhir.reference import InvalidReference, parse_reference
from worker.fhir.resources import fhir_string
from worker.settings import Settings
from worker.stores.outbound_state import SETTLED, OutboundState

MAX_WAIT_SECONDS = 30
_IDEMPOTENCY_KEY = re.compile(r"[A-Za-z0-9_\-:.]{1,128}")
_PREFER_WAIT = re.compile(r"\bwait=(\d+)")
# How a failed send is told to the caller: the patient's side → 422, ours → 503, provider → 502.
_FAILURE_STATUS = {"throttled": 429, "provider-unavailable": 502, "misconfigured": 503}


def _reference_to(*types: str) -> AfterValidator:
    """A `Type/id` reference in FHIR's grammar (never `.`/`..`) to one of `types` (any: none)."""
    def check(value: str) -> str:
        try:
            parse_reference(value, types or None)
        except InvalidReference as exc:
            raise ValueError(exc.detail) from None
        return value
    return AfterValidator(check)


AnyReference = Annotated[str, _reference_to()]
CommunicationRef = Annotated[str, _reference_to("Communication")]
# Who wrote a reply: never the patient (their messages come in; they are not sent back).
Clinician = Annotated[str, _reference_to("Practitioner", "PractitionerRole", "Organization",
                                         "Device", "CareTeam", "RelatedPerson")]


class ByReference(BaseModel):
    """Send a Communication that already exists on the FHIR server."""

    model_config = ConfigDict(extra="forbid")
    communication: CommunicationRef
    channel: Literal["sms", "email", "push", "whatsapp"] | None = None


# The posted resource is a closed shape: only the Communication elements Switchboard uses or
# passes on, each with a bounded depth. Unknown fields are refused (422), so nothing we do not
# need (or that nests without end) reaches the queue, the dead-letter store or FHIR.

def _fhir_text(value: str | None) -> str | None:
    # Medplum refuses control characters and whitespace-only strings (400) after we said 202.
    if value is not None and fhir_string(value) != value:
        raise ValueError("must not be blank or hold control characters")
    return value


# Every free string of the body: what FHIR would refuse is refused here, before the 202.
FhirText = Annotated[str | None, AfterValidator(_fhir_text)]
RequiredText = Annotated[str, AfterValidator(_fhir_text)]
# FHIR uri / url / code: no whitespace or control characters at all.
Token = Annotated[str, Field(pattern=r"^[^\s\x00-\x1f\x7f]+$", max_length=255)]


class Attachment(BaseModel):
    """A Communication.payload.contentAttachment."""

    model_config = ConfigDict(extra="forbid")
    contentType: Token | None = None
    url: str = Field(pattern=r"^https://[^\s\x00-\x1f\x7f]+$", max_length=2048)
    title: FhirText = Field(default=None, max_length=255)
    size: int | None = Field(default=None, ge=0, le=2**31 - 1)  # FHIR unsignedInt


class Payload(BaseModel):
    """One Communication.payload item: text or an attachment (FHIR's content[x]: exactly one)."""

    model_config = ConfigDict(extra="forbid")
    contentString: FhirText = Field(default=None, min_length=1, max_length=20000)
    contentAttachment: Attachment | None = None

    @model_validator(mode="after")
    def _one_content(self) -> Payload:
        if (self.contentString is None) == (self.contentAttachment is None):
            raise ValueError("give exactly one of contentString and contentAttachment")
        return self


class Reference(BaseModel):
    """A FHIR literal Reference, `Type/id` only."""

    model_config = ConfigDict(extra="forbid")
    reference: AnyReference
    display: FhirText = Field(default=None, max_length=255)


class ThreadReference(Reference):
    """A reference to the thread header (another Communication)."""

    reference: CommunicationRef


class ClinicianReference(Reference):
    """Who wrote the reply: never the patient (their messages come in, they are not sent)."""

    reference: Clinician


class Coding(BaseModel):
    """A Coding."""

    model_config = ConfigDict(extra="forbid")
    system: Token | None = None
    code: Token | None = None
    display: FhirText = Field(default=None, max_length=255)


class Concept(BaseModel):
    """A CodeableConcept."""

    model_config = ConfigDict(extra="forbid")
    coding: list[Coding] | None = Field(default=None, max_length=10)
    text: FhirText = Field(default=None, max_length=1000)


class Note(BaseModel):
    """An Annotation (text only)."""

    model_config = ConfigDict(extra="forbid")
    text: RequiredText = Field(min_length=1, max_length=5000)


class ByResource(BaseModel):
    """A new child Communication to create and send (`channel` is ours, not FHIR's)."""

    model_config = ConfigDict(extra="forbid")
    resourceType: Literal["Communication"]
    status: Literal["preparation", "in-progress"] = "in-progress"
    payload: list[Payload] = Field(min_length=1, max_length=20)
    recipient: list[Reference] | None = Field(default=None, max_length=10)
    partOf: list[ThreadReference] | None = Field(default=None, max_length=1)
    subject: Reference | None = None
    sender: ClinicianReference | None = None
    topic: Concept | None = None
    category: list[Concept] | None = Field(default=None, max_length=10)
    priority: Literal["routine", "urgent", "asap", "stat"] | None = None
    note: list[Note] | None = Field(default=None, max_length=10)
    channel: Literal["sms", "email", "push", "whatsapp"] | None = None


PatientRef = Annotated[str, _reference_to("Patient")]


def _push_token(value: str) -> str:
    if not valid_token(value):
        raise ValueError("must be an FCM registration token (20-4096 of A-Z a-z 0-9 _ : - .)")
    return value


class DeviceRegistration(BaseModel):
    """A push token for a patient (POST /v1/devices); stored as a FHIR Device."""

    model_config = ConfigDict(extra="forbid")
    patient: PatientRef
    token: Annotated[str, AfterValidator(_push_token)]


def _authorised(settings: Settings) -> bool:
    header = request.headers.get("Authorization", "")
    if not header.startswith("Bearer "):
        return False
    given = header[7:].strip().encode()
    # Compare against every token in constant time (no early exit on the first match).
    matches = [hmac.compare_digest(given, t.encode()) for t in settings.api_token_list()]
    return any(matches)


def _verdict(request_id: str, state: dict[str, Any] | None) -> tuple[Response, int]:
    body: dict[str, Any] = {"id": request_id, "status_url": f"/v1/messages/{request_id}",
                            **(state or {"status": "queued"})}
    status = (state or {}).get("status")
    if status in ("sent", "delivered"):
        return jsonify(body), 200
    if status == "failed":
        error = str(body.get("error", "failed"))
        return jsonify({**body, "error": error}), _FAILURE_STATUS.get(error, 422)
    if status == "queued" and body.get("last_error") in _FAILURE_STATUS:
        # Still being retried, but the caller asked to hear about trouble at once. The answer
        # says `"status": "queued"`: the message still goes out; resubmitting it would send it
        # twice unless the request carries an Idempotency-Key.
        error = str(body["last_error"])
        return jsonify({**body, "error": error}), _FAILURE_STATUS[error]
    return jsonify(body), 202


def _request_id(key: str | None, token: bytes) -> str | None:
    """The request id of an Idempotency-Key sent with this API token (the same token and key,
    the same request; another caller's same key is another request), or a new one; None for
    a key of the wrong shape. Keyed by the token, which only the caller and we know."""
    if key is None:
        return uuid.uuid4().hex
    if not _IDEMPOTENCY_KEY.fullmatch(key):
        return None
    return "k-" + hmac.new(token, b"idempotency-key\0" + key.encode(),
                           hashlib.sha256).hexdigest()[:40]


def _body_hash(data: dict[str, Any], token: bytes) -> str:
    """A hash of the request body that a retry with the same Idempotency-Key must match (the
    same JSON, whatever its key order or spacing), keyed by the caller's token: the body holds
    PHI, and an unkeyed hash of a short text could be reversed by trying candidates."""
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hmac.new(token, canonical.encode(), hashlib.sha256).hexdigest()


def _token() -> bytes:
    """The bearer token of this (authorised) request."""
    return request.headers.get("Authorization", "")[7:].strip().encode()


def api_blueprint(settings: Settings, client: redis.Redis) -> Blueprint:
    """Routes of the outbound API."""
    bp = Blueprint("api", __name__)
    state = OutboundState(client, settings.sealer())

    def rejected(reason: str) -> None:
        current_app.extensions["switchboard.metrics"].inc(
            "switchboard_webhooks_rejected", endpoint="api-messages", reason=reason)

    @bp.post("/v1/messages")
    def send_message() -> tuple[Response, int]:
        current_app.extensions["switchboard.metrics"].inc(
            "switchboard_webhooks_received", endpoint="api-messages")
        if not _authorised(settings):
            rejected("unauthorized")
            return jsonify(error="unauthorized", detail="a valid bearer token is required"), 401
        try:
            data = request.get_json(silent=True)
        except RecursionError:  # nesting deep enough to exhaust the parser is not a message
            data = None
        if not isinstance(data, dict):
            rejected("invalid-json")
            return jsonify(error="invalid-json", detail="the body must be a JSON object"), 400
        model: type[BaseModel] = ByReference if "communication" in data else ByResource
        try:
            parsed = model.model_validate(data)
        except ValidationError as exc:
            rejected("invalid-body")
            fields = [{"field": ".".join(str(p) for p in e["loc"]), "error": e["msg"]}
                      for e in exc.errors()]
            return jsonify(error="invalid-body", fields=fields), 422
        token = _token()
        request_id = _request_id(request.headers.get("Idempotency-Key"), token)
        if request_id is None:
            rejected("invalid-body")
            return jsonify(error="invalid-idempotency-key",
                           detail="1-128 letters, digits and _-:."), 400
        body_hash = _body_hash(data, token)
        try:
            fresh = state.create(request_id, body_hash)
            earlier = None if fresh else state.body_hash(request_id)
        except redis.exceptions.RedisError:
            rejected("queue-unavailable")
            return jsonify(error="unavailable", detail="queue unavailable, retry later"), 503
        if not fresh:
            if earlier is not None and not hmac.compare_digest(earlier, body_hash):
                # Another message under a key already used: answering with the first request's
                # state would tell the caller this one was taken, and nothing would be sent.
                rejected("idempotency-key-reused")
                return jsonify(error="idempotency-key-reused",
                               detail="this Idempotency-Key was used with another body"), 422
            # The same request again: answer with its state, send nothing.
            return _verdict(request_id, state.get(request_id))
        payload: dict[str, Any] = {"request_id": request_id,
                                   "channel": getattr(parsed, "channel", None)}
        if isinstance(parsed, ByReference):
            payload["communication"] = parsed.communication
        else:
            # What was validated, and only that, goes on.
            payload["resource"] = parsed.model_dump(exclude_none=True, exclude={"channel"})
        enqueuer: Enqueuer = current_app.extensions["switchboard.enqueuer"]
        try:
            enqueuer.send(TASK_OUTBOUND_SEND, QUEUE_OUTBOUND, [payload],
                          inbox_key=f"outbound:{request_id}")
        except EnqueueFailed:
            state.forget(request_id)  # not queued: the same key may try again
            rejected("queue-unavailable")
            return jsonify(error="unavailable", detail="queue unavailable, retry later"), 503
        current_app.extensions["switchboard.metrics"].inc(
            "switchboard_webhooks_enqueued", endpoint="api-messages")
        wait = _PREFER_WAIT.search(request.headers.get("Prefer", ""))
        if not wait:
            return _verdict(request_id, None)
        deadline = time.monotonic() + min(int(wait.group(1)), MAX_WAIT_SECONDS)
        current = state.get(request_id)
        while time.monotonic() < deadline:
            current = state.wait(request_id, max(0.0, deadline - time.monotonic()))
            # `held`: a WhatsApp reply waits for the patient's answer; the caller hears now.
            if current and (current["status"] in (*SETTLED, "held")
                            or current.get("last_error")):
                break
        return _verdict(request_id, current)

    def enqueue_device(payload: dict[str, Any]) -> tuple[Response, int]:
        enqueuer: Enqueuer = current_app.extensions["switchboard.enqueuer"]
        try:
            enqueuer.send(TASK_DEVICE_UPDATE, QUEUE_OUTBOUND, [payload],
                          inbox_key=f"device:{uuid.uuid4().hex}")
        except EnqueueFailed:
            return jsonify(error="unavailable", detail="queue unavailable, retry later"), 503
        # The Device is written by a worker (no FHIR I/O in a request): conditional create on
        # the token, so repeating a registration changes nothing.
        return jsonify(status="queued", action=payload["action"]), 202

    @bp.post("/v1/devices")
    def register_device() -> tuple[Response, int]:
        if not _authorised(settings):
            return jsonify(error="unauthorized", detail="a valid bearer token is required"), 401
        data = request.get_json(silent=True)
        if not isinstance(data, dict):
            return jsonify(error="invalid-json", detail="the body must be a JSON object"), 400
        try:
            device = DeviceRegistration.model_validate(data)
        except ValidationError as exc:
            # The message, never the input: a rejected value may be a token.
            fields = [{"field": ".".join(str(p) for p in e["loc"]), "error": e["msg"]}
                      for e in exc.errors()]
            return jsonify(error="invalid-body", fields=fields), 422
        return enqueue_device({"action": "register", "patient": device.patient,
                               "token": device.token})

    @bp.delete("/v1/devices/<path:push_token>")
    def unregister_device(push_token: str) -> tuple[Response, int]:
        if not _authorised(settings):
            return jsonify(error="unauthorized", detail="a valid bearer token is required"), 401
        if not valid_token(push_token):
            return jsonify(error="invalid-token",
                           detail="not an FCM registration token"), 422
        return enqueue_device({"action": "unregister", "token": push_token})

    @bp.get("/v1/openapi.json")
    def openapi() -> tuple[Response, int]:
        return jsonify(openapi_document()), 200

    @bp.get("/v1/messages/<request_id>")
    def message_state(request_id: str) -> tuple[Response, int]:
        if not _authorised(settings):
            return jsonify(error="unauthorized", detail="a valid bearer token is required"), 401
        current = state.get(request_id)  # None also for anything not shaped like a request id
        if current is None:
            return jsonify(error="not-found", detail="no such message request"), 404
        return jsonify({"id": request_id, **current}), 200

    return bp


def openapi_document() -> dict[str, Any]:
    """OpenAPI 3.1 description of /v1/messages, with the request schemas from the models."""
    state = {"type": "object", "properties": {
        "id": {"type": "string"}, "status_url": {"type": "string"},
        "status": {"enum": ["queued", "held", "sent", "failed", "delivered"]},
        "provider_id": {"type": "string"},
        "channel": {"enum": ["sms", "email", "push", "whatsapp", "conversations"]},
        "communication": {"type": "string"}, "error": {"type": "string"},
        "provider_code": {"type": ["integer", "null"]}, "last_error": {"type": "string"},
        "devices": {"type": "integer", "description": "push: devices that accepted it"}}}
    error = {"type": "object", "properties": {"error": {"type": "string"},
                                              "detail": {"type": "string"},
                                              "fields": {"type": "array"}}}

    def answer(text: str, schema: dict[str, Any]) -> dict[str, Any]:
        return {"description": text, "content": {"application/json": {"schema": schema}}}

    return {
        "openapi": "3.1.0",
        "info": {"title": "Switchboard outbound API", "version": "1"},
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
                       "schemas": {"ByReference": ByReference.model_json_schema(),
                                   "ByResource": ByResource.model_json_schema(),
                                   "DeviceRegistration": DeviceRegistration.model_json_schema(),
                                   "State": state, "Error": error}},
        "security": [{"bearer": []}],
        "paths": {
            "/v1/messages": {"post": {
                "summary": "Send a child Communication to its patient by SMS, email or push",
                "parameters": [{"name": "Prefer", "in": "header", "required": False,
                                "schema": {"type": "string", "example": "wait=10"}}],
                "requestBody": {"required": True, "content": {"application/json": {"schema": {
                    "oneOf": [{"$ref": "#/components/schemas/ByReference"},
                              {"$ref": "#/components/schemas/ByResource"}]}}}},
                "responses": {
                    "200": answer("sent (with Prefer: wait)", state),
                    "202": answer("queued", state),
                    "400": answer("not JSON", error), "401": answer("no valid token", error),
                    "422": answer("invalid body, the provider refused, or the "
                                  "Idempotency-Key was used with another body", error),
                    "429": answer("the provider throttles (still queued)", error),
                    "502": answer("the provider is unavailable (still queued)", error),
                    "503": answer("queue unavailable or channel not configured", error)}}},
            "/v1/devices": {"post": {
                "summary": "Register a push token for a patient (a FHIR Device; idempotent)",
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/DeviceRegistration"}}}},
                "responses": {"202": answer("queued for the worker", error),
                              "400": answer("not JSON", error),
                              "401": answer("no valid token", error),
                              "422": answer("invalid patient or token", error),
                              "503": answer("queue unavailable", error)}}},
            "/v1/devices/{token}": {"delete": {
                "summary": "Deactivate a push token (its Device becomes inactive)",
                "parameters": [{"name": "token", "in": "path", "required": True,
                                "schema": {"type": "string"}}],
                "responses": {"202": answer("queued for the worker", error),
                              "401": answer("no valid token", error),
                              "422": answer("not a token", error)}}},
            "/v1/messages/{id}": {"get": {
                "summary": "State of a send request",
                "parameters": [{"name": "id", "in": "path", "required": True,
                                "schema": {"type": "string"}}],
                "responses": {"200": answer("state", state), "401": answer("no token", error),
                              "404": answer("unknown id", error)}}},
        },
    }
