"""Push through Firebase Cloud Messaging (HTTP v1): OAuth2 from a service account, error mapping.

One call pushes to one device token. The fan-out over a patient's devices, and what a dead
token means for its FHIR `Device`, live in worker.outbound.push; this module only says what FCM
answered, in the closed vocabulary of worker.channels.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping
from typing import Any

from worker.channels import SendError
from worker.messages import OutboundMessage, SendResult

CHANNEL = "push"
# v3-ParticipationMode has no "push"; ONLINEWRIT ("online written") is the app's medium, so a
# thread the patient started in the app is answered by push.
MEDIUM_CODE = "ONLINEWRIT"
SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
# FCM registration tokens are opaque, about 150-200 characters of [A-Za-z0-9_:-]; checked at the
# boundary so nothing else (a phone number, a JSON blob) is ever stored or pushed to as a token.
TOKEN_SHAPE = re.compile(r"[A-Za-z0-9_:\-.]{20,4096}")
FCM_ERROR_TYPE = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
BAD_REQUEST_TYPE = "type.googleapis.com/google.rpc.BadRequest"
MAX_BODY_CHARS = 1000  # FCM refuses a message over 4096 bytes; a push is a teaser anyway


def valid_token(token: str) -> bool:
    """Whether `token` has the shape of an FCM registration token."""
    return bool(TOKEN_SHAPE.fullmatch(token))


def _retry_after(headers: Mapping[str, str]) -> float | None:
    value = {k.lower(): v for k, v in headers.items()}.get("retry-after", "")
    return float(value) if re.fullmatch(r"[0-9]{1,6}", value) else None


def fcm_error_code(body: Any) -> str:
    """The FcmError errorCode of an FCM v1 error body ("" when it has none)."""
    error = body.get("error") if isinstance(body, Mapping) else None
    details = error.get("details") if isinstance(error, Mapping) else None
    for item in details if isinstance(details, list) else []:
        if isinstance(item, Mapping) and item.get("@type") == FCM_ERROR_TYPE:
            return str(item.get("errorCode") or "")
    return ""


def _about_token(body: Any) -> bool:
    """Whether a 400 names the registration token (google.rpc.BadRequest on message.token)."""
    error = body.get("error") if isinstance(body, Mapping) else None
    if not isinstance(error, Mapping):
        return False
    for item in error.get("details") or []:
        if isinstance(item, Mapping) and item.get("@type") == BAD_REQUEST_TYPE:
            for violation in item.get("fieldViolations") or []:
                if isinstance(violation, Mapping) and violation.get("field") == "message.token":
                    return True
    # Older answers say it only in the message text.
    return "registration token" in str(error.get("message") or "").lower()


def classify_error(status: int | None, body: Any = None,
                   headers: Mapping[str, str] | None = None) -> SendError:
    """The SendError for an FCM v1 failure (pure). `detail` starts with the FCM code.

    UNREGISTERED (404), SENDER_ID_MISMATCH (403) and an INVALID_ARGUMENT about the token are
    `invalid-recipient`: that device is dead, the others are not. QUOTA_EXCEEDED (429) is
    `throttled` with FCM's Retry-After; UNAVAILABLE (503) and INTERNAL (500) retry;
    THIRD_PARTY_AUTH_ERROR (APNs/web-push credentials) and 401 are ours to fix.
    """
    headers = headers or {}
    code = fcm_error_code(body)
    where = f"FCM HTTP {status}" if status else "FCM unreachable"
    if code == "THIRD_PARTY_AUTH_ERROR" or status == 401:
        return SendError("misconfigured", f"{code or 'UNAUTHENTICATED'}: {where}")
    if code == "QUOTA_EXCEEDED" or status == 429:
        return SendError("throttled", f"{code or 'QUOTA_EXCEEDED'}: {where}", None,
                         _retry_after(headers))
    if status is None or status >= 500 or code in ("UNAVAILABLE", "INTERNAL"):
        return SendError("provider-unavailable", f"{code or 'UNAVAILABLE'}: {where}", None,
                         _retry_after(headers))
    if code == "UNREGISTERED" or status == 404:
        return SendError("invalid-recipient", f"UNREGISTERED: {where}")
    if code == "SENDER_ID_MISMATCH":
        return SendError("invalid-recipient", f"SENDER_ID_MISMATCH: {where}")
    if status == 403:
        # PERMISSION_DENIED without an FcmError: the service account may not send for this
        # project (a wrong FCM_PROJECT_ID, a missing IAM role).
        return SendError("misconfigured", f"PERMISSION_DENIED: {where}")
    if status == 400 and _about_token(body):
        return SendError("invalid-recipient", f"INVALID_ARGUMENT: {where} on the token")
    return SendError("rejected", f"{code or 'INVALID_ARGUMENT'}: {where}")


def error_code_of(exc: SendError) -> str:
    """The FCM code a SendError from this module carries (the start of its detail)."""
    return exc.detail.split(":", 1)[0]


class FcmPush:
    """Pushes through FCM HTTP v1 with an OAuth2 token from a Google service account."""

    name = CHANNEL
    medium_code = MEDIUM_CODE

    def __init__(self, credentials_file: str, project_id: str, api_base_url: str, title: str,
                 body: str, include_body: bool, timeout: float = 10.0) -> None:
        import google.auth.transport.requests
        import requests
        from google.oauth2 import service_account

        # google-auth signs a JWT with the key and trades it at the file's `token_uri` (so a
        # sandbox file points at the sandbox). Refreshed when less than ~4 minutes are left
        # (google-auth's REFRESH_THRESHOLD), so no request goes out with a token about to expire.
        self._creds = service_account.Credentials.from_service_account_file(  # type: ignore[no-untyped-call]
            credentials_file, scopes=[SCOPE])
        self._project = project_id or str(self._creds.project_id or "")
        if not self._project:
            raise ValueError("FCM_PROJECT_ID is unset and the credentials name no project_id")
        self._url = f"{api_base_url}/v1/projects/{self._project}/messages:send"
        self._session = requests.Session()
        self._auth_request = google.auth.transport.requests.Request(self._session)
        self._lock = threading.Lock()  # one token refresh at a time across the worker threads
        self._title, self._body, self._include_body = title, body, include_body
        self._timeout = timeout

    def sender_key(self) -> str:
        """Rate limits are per FCM project."""
        return self._project

    def _token(self) -> str:
        from google.auth import exceptions

        with self._lock:
            if not self._creds.valid:
                try:
                    self._creds.refresh(self._auth_request)
                except exceptions.TransportError as exc:
                    raise SendError("provider-unavailable",
                                    f"UNAVAILABLE: token endpoint ({type(exc).__name__})") from None
                except exceptions.RefreshError as exc:
                    if getattr(exc, "retryable", False):
                        raise SendError("provider-unavailable",
                                        "UNAVAILABLE: token endpoint") from None
                    raise SendError("misconfigured",
                                    "UNAUTHENTICATED: the service account was refused") from None
            return str(self._creds.token)

    def payload(self, message: OutboundMessage) -> dict[str, Any]:
        """The FCM v1 request body: a fixed notification, the Communication id as data."""
        notification = {"title": self._title}
        text = message.body[:MAX_BODY_CHARS] if self._include_body and message.body else ""
        if text or self._body:
            notification["body"] = text or self._body
        return {"message": {
            "token": message.to,
            "notification": notification,
            # FCM data values must be strings. The app reads the message over FHIR with its own
            # authorisation; nothing of it travels through Google.
            "data": {"communication_id": message.communication_id,
                     "communication": f"Communication/{message.communication_id}"},
            "android": {"priority": "high"},
        }}

    def send(self, message: OutboundMessage) -> SendResult:
        """Push to one device token; raises SendError."""
        resp = self._post(message)
        if resp.status_code == 401 and fcm_error_code(_json(resp)) != "THIRD_PARTY_AUTH_ERROR":
            # Our access token was refused (revoked, or the key rotated) before anything was
            # sent: fetch a fresh one and try once more, as google-auth's AuthorizedSession does.
            with self._lock:
                self._creds.token = None
            resp = self._post(message)
        body = _json(resp)
        if resp.status_code != 200:
            raise classify_error(resp.status_code, body, dict(resp.headers))
        name = body.get("name") if isinstance(body, Mapping) else None
        if not name:
            # 200 without a message name: FCM took it; retrying would push twice.
            name = f"projects/{self._project}/messages/unknown"
        return SendResult(provider_id=str(name), status="accepted")

    def _post(self, message: OutboundMessage) -> Any:
        import requests

        token = self._token()
        try:
            return self._session.post(self._url, json=self.payload(message),
                                      timeout=self._timeout,
                                      headers={"Authorization": f"Bearer {token}"})
        except requests.exceptions.ConnectTimeout:
            raise SendError("provider-unavailable", "UNAVAILABLE: connect timeout") from None
        except requests.exceptions.ConnectionError as exc:
            # Only a refused or unresolvable connection proves that nothing reached FCM; a
            # connection dropped after the request went out may have pushed (see twilio.py).
            if _never_connected(exc):
                raise SendError("provider-unavailable", "UNAVAILABLE: no connection") from None
            raise SendError("outcome-unknown", type(exc).__name__) from None
        except requests.exceptions.RequestException as exc:
            raise SendError("outcome-unknown", type(exc).__name__) from None


def _json(resp: Any) -> Any:
    try:
        return resp.json()
    except ValueError:
        return None


def _never_connected(exc: Exception) -> bool:
    from urllib3.exceptions import MaxRetryError, NameResolutionError, NewConnectionError

    reason = exc.args[0] if exc.args else None
    if isinstance(reason, MaxRetryError):
        reason = reason.reason
    return isinstance(reason, NewConnectionError | NameResolutionError)
