"""Twilio SMS/MMS: webhook signature check, inbound parsing, sending, error and status mapping."""

from __future__ import annotations

import hmac
import json
import logging
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from urllib.parse import urlencode, urlsplit

import httpx
from twilio.request_validator import RequestValidator

from worker.broker.backoff import retry_after_seconds
from worker.channels import SendError
from worker.channels.phones import (
    DEFAULT_REGION,
    SHAPE,
    WHATSAPP,
    InvalidPhoneNumber,
    to_e164,
)
from worker.errors import PermanentError
from worker.httpclient import fetch, never_sent, new_client
from worker.messages import Attachment, InboundMessage, OutboundMessage, SendResult

CHANNEL = "sms"
MEDIUM_CODE = "SMSWRIT"
# WhatsApp shares Twilio's Messages API and this webhook (worker/channels/whatsapp.py sends).
WHATSAPP_CHANNEL = "whatsapp"
# Its medium code, in Switchboard's own system (worker.fhir.resources.WHATSAPP_MEDIUM_CODE,
# which channels may not import: a unit test keeps the two equal).
WHATSAPP_MEDIUM_CODE = "whatsapp"
REQUIRED_FIELDS = ("MessageSid", "From", "To")
STATUS_FIELDS = ("MessageSid", "MessageStatus")
TWILIO_API = "https://api.twilio.com"
# Twilio sends at most 10 media items per MMS (MediaUrl0..MediaUrl9).
MAX_MEDIA = 10
# Shapes of the fields we use. Twilio signs names and values run together with no separator, so
# text can move from a value into the next parameter's name without breaking the signature
# (`MessageSid=SM…NumMedia0` with `NumMedia` dropped signs the same): every field's shape is
# checked before anything is enqueued.
MESSAGE_SID = re.compile(r"(SM|MM)[0-9a-f]{32}")
CONVERSATION_SID = re.compile(r"CH[0-9a-f]{32}")
# Twilio's message statuses (https://www.twilio.com/docs/messaging/api/message-resource); what
# each means for the Communication is worker/outbound/status_map.py's (a test keeps both equal).
STATUSES = frozenset({"accepted", "scheduled", "queued", "sending", "sent", "receiving",
                      "received", "delivered", "read", "failed", "undelivered", "canceled"})
SHORT_CODE = re.compile(r"[0-9]{3,8}")
# Where Twilio serves MMS media: only these become attachment links in the EHR.
MEDIA_HOSTS = frozenset({"api.twilio.com", "media.twiliocdn.com", "mms.twiliocdn.com"})


class TwilioSignature:
    """Verifies `X-Twilio-Signature` over the public URL and every posted parameter."""

    def __init__(self, auth_token: str) -> None:
        self._validator = RequestValidator(auth_token)

    def is_valid(self, url: str, params: Any, signature: str | None) -> bool:
        """True when `signature` is Twilio's HMAC of `url` + sorted params under our token.

        `params` may be a MultiDict: the SDK signs every value of a repeated key.
        """
        if not signature:
            return False
        try:
            # Fast path: the URL exactly as configured, one HMAC. The SDK's validate() always
            # computes two (the URL with and without its port), which is what a genuine
            # request pays for nothing; it stays the judge of everything else.
            expected = self._validator.compute_signature(url, params)
            if hmac.compare_digest(expected.encode(), signature.encode()):
                return True
            return bool(self._validator.validate(url, params, signature))
        except (TypeError, ValueError, UnicodeEncodeError):  # never in a real Twilio request
            return False


def missing_fields(params: Mapping[str, str], required: tuple[str, ...] = REQUIRED_FIELDS
                   ) -> list[str]:
    """The required webhook fields that are absent or blank."""
    return [name for name in required if not (params.get(name) or "").strip()]


# Twilio's default opt-out and opt-in keywords: the whole message, any case. Twilio itself
# blocks sends after an opt-out (error 21610) and lifts it after an opt-in; we mirror both so a
# send is refused without a provider call, and a patient who texts START is reachable again.
OPT_OUT_WORDS = frozenset({"STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT", "REVOKE",
                           "OPTOUT"})
OPT_IN_WORDS = frozenset({"START", "YES", "UNSTOP"})


def opt_keyword(body: str) -> str | None:
    """"opt-out" or "opt-in" when the message is one of Twilio's keywords, else None."""
    word = body.strip().upper()
    return "opt-out" if word in OPT_OUT_WORDS else "opt-in" if word in OPT_IN_WORDS else None


def field_problems(kind: str, params: Mapping[str, str] | Iterable[tuple[str, str]],
                   account_sid: str) -> list[str]:
    """What is wrong with the fields of a signed webhook (empty: nothing); names, never values.

    `kind` is "sms" (incoming message) or "status" (delivery callback); `params` may repeat a
    name (give the form's `items(multi=True)`). Twilio's signature binds no name to its value,
    so besides the shape of every field we use: no name may repeat (`From=a&From=b` signs like
    text moved out of the preceding value), and an unknown name may not extend a known one
    (`Fromz` is how a value is re-split into a new `From`). Unknown names otherwise pass: Twilio
    adds parameters without notice.
    """
    pairs = list(params.items()) if isinstance(params, Mapping) else list(params)
    problems: list[str] = []
    seen: dict[str, str] = {}
    for name, value in pairs:
        if name in seen:
            problems.append(f"{name} (repeated)")
        seen.setdefault(name, value)
    shapes = SMS_FIELDS if kind == "sms" else STATUS_FIELDS_SHAPES
    previous = ""
    for name in sorted(seen):  # the order Twilio signs in
        value = seen[name]
        shape = shapes.get(name) or _indexed_shape(kind, name)
        if shape is not None:
            if not shape(value):
                problems.append(name)
        elif not PARAM_NAME.fullmatch(name) or any(
                name.startswith(known) for known in KNOWN_NAMES):
            problems.append(f"{name} (unknown parameter)")
        elif shapes.get(previous) in FREE_TEXT:
            # Right after free text in the signed string: the tail of the body cut off into a
            # new name (`Body="Cancel "` + `Friday=" appointment…"` signs like the original
            # and turned a message into an opt-out keyword, found by the hostile review).
            problems.append(f"{name} (unknown parameter after {previous})")
        previous = name
    for required in ("MessageSid", "AccountSid"):
        if required not in seen:
            problems.append(required)
    if seen.get("AccountSid", account_sid) != account_sid:
        problems.append("AccountSid")
    for alias in ("SmsSid", "SmsMessageSid"):  # Twilio's older names of the same id
        if alias in seen and seen[alias] != seen.get("MessageSid"):
            problems.append(alias)
    if kind == "sms":
        problems += whatsapp_problems(seen)
        count = seen.get("NumMedia", "0")
        count = count if _digits(count, 2) else "0"
        for name in seen:
            found = MEDIA_FIELD.fullmatch(name)
            if found and int(found.group(2)) >= int(count):
                problems.append(f"{name} (beyond NumMedia)")
    return sorted(set(problems), key=problems.index)


def is_whatsapp(address: str) -> bool:
    """Whether a Twilio address names a WhatsApp user (`whatsapp:+E164`)."""
    return address[:len(WHATSAPP)].lower() == WHATSAPP


def whatsapp_problems(seen: Mapping[str, str]) -> list[str]:
    """What is inconsistent about an incoming message's WhatsApp fields (names, never values):
    WaId (when given) is the digits of a WhatsApp From's number, so a signed SMS cannot carry
    another number's WhatsApp id. (`To` is not compared with `From`: which channel a message
    is follows `From` alone, and only our own numbers receive.)"""
    sender = seen.get("From", "")
    problems: list[str] = []
    wa_id = seen.get("WaId")
    if wa_id is not None and (not is_whatsapp(sender)
                              or re.sub(r"[^0-9]", "", sender) != wa_id):
        problems.append("WaId (not From's number)")
    return problems


def _digits(value: str, most: int) -> bool:
    # ASCII digits only: str.isdigit() also takes '²' and Arabic-Indic digits, and int() then
    # raises or reads another number.
    return re.fullmatch(rf"[0-9]{{1,{most}}}", value) is not None


def _phone(value: str) -> bool:
    # The shape only: whether the number counts is the worker's to judge (it knows the
    # region), and one that does not is dead-lettered with its reason, not refused here.
    return SHAPE.fullmatch(value) is not None


def _text(most: int, pattern: str = r"[A-Za-z .'\-]") -> Callable[[str], bool]:
    compiled = re.compile(rf"{pattern}{{0,{most}}}")
    return lambda value: compiled.fullmatch(value) is not None


def _free(value: str) -> bool:
    return True  # free text (the message itself): any content, checked where it is written


def _profile_name(value: str) -> bool:
    # WhatsApp's display name of the sender (PHI: never logged): any printable text, bounded.
    return len(value) <= 256 and re.fullmatch(r"[^\x00-\x1f\x7f]*", value) is not None


# Fields after which an unknown name is suspect (see field_problems): free text.
FREE_TEXT = (_free, _profile_name)


_COMMON: dict[str, Callable[[str], bool]] = {
    "MessageSid": lambda v: MESSAGE_SID.fullmatch(v) is not None,
    "SmsSid": lambda v: MESSAGE_SID.fullmatch(v) is not None,
    "SmsMessageSid": lambda v: MESSAGE_SID.fullmatch(v) is not None,
    "AccountSid": lambda v: re.fullmatch(r"AC[0-9A-Za-z]{1,32}", v) is not None,
    "MessagingServiceSid": lambda v: re.fullmatch(r"MG[0-9a-f]{32}", v) is not None,
    "ApiVersion": lambda v: re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", v) is not None,
    "From": _phone,
    "To": lambda v: SHORT_CODE.fullmatch(v) is not None or _phone(v),
}
SMS_FIELDS: dict[str, Callable[[str], bool]] = {
    **_COMMON,
    "Body": _free,
    "NumMedia": lambda v: _digits(v, 2) and int(v) <= MAX_MEDIA,
    "NumSegments": lambda v: _digits(v, 3),
    "ReferralNumMedia": lambda v: _digits(v, 2),
    "SmsStatus": lambda v: v.lower() in STATUSES,
    "ConversationSid": lambda v: CONVERSATION_SID.fullmatch(v) is not None,
    "OptOutType": _text(16, "[A-Z]"),
    # WhatsApp adds these to the incoming-message webhook (Twilio's "WhatsApp-specific
    # parameters"): the sender's WhatsApp id (their number's digits) and display name, the
    # kind of message, a shared location, quick-reply buttons, forwards, the message replied
    # to, and click-to-WhatsApp ad referrals.
    "WaId": lambda v: _digits(v, 15),
    "ProfileName": _profile_name,
    "MessageType": _text(32, "[a-z_]"),
    "Latitude": lambda v: re.fullmatch(r"-?[0-9]{1,3}(\.[0-9]{1,15})?", v) is not None,
    "Longitude": lambda v: re.fullmatch(r"-?[0-9]{1,3}(\.[0-9]{1,15})?", v) is not None,
    "Address": _free,
    "Label": _free,
    "ButtonText": _free,
    "ButtonPayload": _free,
    "Forwarded": lambda v: v in ("true", "false"),
    "FrequentlyForwarded": lambda v: v in ("true", "false"),
    "OriginalRepliedMessageSid": lambda v: MESSAGE_SID.fullmatch(v) is not None,
    "OriginalRepliedMessageSender": _phone,
    "ChannelMetadata": _free,
    **{f"Referral{part}": _free for part in (
        "Body", "Headline", "SourceId", "SourceType", "SourceUrl", "MediaId",
        "MediaContentType", "MediaUrl", "CtwaClid")},
    **{f"{side}{part}": shape for side in ("From", "To") for part, shape in (
        ("City", _text(64)), ("State", _text(64)), ("Zip", _text(16, r"[A-Za-z0-9 \-]")),
        ("Country", _text(2, "[A-Z]")))},
}
STATUS_FIELDS_SHAPES: dict[str, Callable[[str], bool]] = {
    **_COMMON,
    # The sender of a message we sent: a number, a short code or an alphanumeric sender id.
    "From": lambda v: SHORT_CODE.fullmatch(v) is not None or _phone(v)
    or re.fullmatch(r"[A-Za-z0-9 ]{1,11}", v) is not None,
    "MessageStatus": lambda v: v.lower() in STATUSES,
    "SmsStatus": lambda v: v.lower() in STATUSES,
    "ErrorCode": lambda v: _digits(v, 6),
    "ErrorMessage": _free,
    "RawDlrDoneDate": lambda v: _digits(v, 14),
    # WhatsApp status callbacks (`read` among the statuses) name the channel too.
    "ChannelPrefix": _text(16, "[a-z]"),
    "ChannelToAddress": lambda v: re.fullmatch(r"\+?[0-9]{1,16}", v) is not None,
    "ChannelInstallSid": lambda v: re.fullmatch(r"XE[0-9a-f]{32}", v) is not None,
    "ChannelStatusMessage": _free,
}
MEDIA_FIELD = re.compile(r"(MediaUrl|MediaContentType)([0-9]{1,2})")
PARAM_NAME = re.compile(r"[A-Z][A-Za-z0-9]{0,63}")
KNOWN_NAMES = frozenset({*SMS_FIELDS, *STATUS_FIELDS_SHAPES, "MediaUrl", "MediaContentType"})
_CONTENT_TYPE = re.compile(r"[\w.+\-]{1,64}/[\w.+\-]{1,128}")


def _indexed_shape(kind: str, name: str) -> Callable[[str], bool] | None:
    found = MEDIA_FIELD.fullmatch(name) if kind == "sms" else None
    if found is None:
        return None
    if found.group(1) == "MediaUrl":
        return _twilio_media
    return lambda v: _CONTENT_TYPE.fullmatch(v) is not None


def _twilio_media(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme == "https" and (parts.hostname or "") in MEDIA_HOSTS \
        and not parts.username and not parts.password


def parse_inbound(params: Mapping[str, str], received_at: str,
                  region: str = DEFAULT_REGION) -> InboundMessage:
    """Turn a Twilio incoming-message webhook into an InboundMessage.

    Numbers without a country code are read in `region` (PHONE_DEFAULT_REGION). Raises
    PermanentError("invalid-payload") for a payload no retry can fix, and
    PermanentError("invalid-sender") when From is not a number we can look up.
    """
    gone = missing_fields(params)
    if gone:
        raise PermanentError("invalid-payload", "missing " + ", ".join(gone))
    try:
        sender = to_e164(params["From"], region)
    except InvalidPhoneNumber as exc:
        # The reason says what is wrong, never the number (dead letters reach logs).
        raise PermanentError("invalid-sender", f"From: {exc}") from exc
    try:
        clinic = to_e164(params["To"], region)
    except InvalidPhoneNumber:
        clinic = params["To"].strip()  # short codes and alphanumeric ids are kept as they are
    try:
        num_media = min(int(params.get("NumMedia") or 0), MAX_MEDIA)
    except ValueError:
        num_media = 0
    attachments = tuple(
        Attachment(
            url=params[f"MediaUrl{i}"],
            content_type=params.get(f"MediaContentType{i}") or "application/octet-stream",
        )
        for i in range(num_media)
        if params.get(f"MediaUrl{i}") and _twilio_media(params[f"MediaUrl{i}"])
    )
    # WhatsApp arrives on the same webhook, its addresses `whatsapp:+E164` (to_e164 reads the
    # number): a message of its own channel and medium, so its thread and replies stay on it.
    whatsapp = is_whatsapp(params["From"].strip())
    return InboundMessage(
        channel=WHATSAPP_CHANNEL if whatsapp else CHANNEL,
        medium_code=WHATSAPP_MEDIUM_CODE if whatsapp else MEDIUM_CODE,
        provider_message_id=params["MessageSid"].strip(),
        sender=sender,
        clinic_address=clinic,
        body=params.get("Body") or "",
        received_at=received_at,
        attachments=attachments,
        provider_conversation_id=(params.get("ConversationSid") or "").strip() or None,
    )


# -- outbound -------------------------------------------------------------------------------------

# Twilio error codes → our send-error vocabulary (https://www.twilio.com/docs/api/errors).
ERROR_KINDS: dict[int, str] = {
    20429: "throttled",  # too many requests
    30001: "provider-unavailable",  # queue overflow: Twilio asks us to slow down and retry
    20003: "misconfigured",  # authentication failed
    21606: "misconfigured",  # From is not a Twilio number we own
    21211: "invalid-recipient",  # invalid 'To' number
    21408: "rejected",  # sending to this region is not enabled on the account
    21610: "opted-out",  # the recipient replied STOP
    21612: "unreachable",  # not reachable via SMS
    21614: "unreachable",  # not a mobile number
    21635: "unreachable",  # a landline
    30003: "unreachable",  # unreachable handset
    30004: "unreachable",  # blocked
    30005: "unreachable",  # unknown handset
    30006: "unreachable",  # landline or unreachable carrier
    30007: "rejected",  # carrier filtered the message
}


def classify_error(status: int | None, code: int | None, retry_after: float | None = None,
                   kinds: Mapping[int, str] = ERROR_KINDS) -> SendError:
    """The SendError for a Twilio failure (pure): the code decides, then the HTTP status."""
    kind = kinds.get(code or 0)
    if kind is None:
        if status == 429:
            kind = "throttled"
        elif status is None or status >= 500:
            kind = "provider-unavailable"
        elif status in (401, 403):
            kind = "misconfigured"
        else:
            kind = "rejected"
    return SendError(kind, f"Twilio HTTP {status}" if status else "Twilio unreachable", code,
                     retry_after)


class TwilioSms:
    """Sends SMS/MMS through Twilio's Messages API with the official SDK.

    The SDK's client is not safe to share between threads (it keeps the last response on the
    client, which is also where the Retry-After header is found), so each thread has its own.
    """

    name = CHANNEL
    medium_code = MEDIUM_CODE
    error_kinds: Mapping[int, str] = ERROR_KINDS

    def __init__(self, account_sid: str, auth_token: str, from_number: str,
                 messaging_service_sid: str, status_callback: str, api_base_url: str,
                 timeout: float = 10.0) -> None:
        if not (from_number or messaging_service_sid):
            raise ValueError("TWILIO_FROM_NUMBER or TWILIO_MESSAGING_SERVICE_SID is required")
        self._sid = account_sid
        self._token = auth_token
        self._from = from_number
        self._service = messaging_service_sid
        self._callback = status_callback
        self._base = api_base_url
        self._timeout = timeout
        self._local = threading.local()
        self._warm()

    @staticmethod
    def _warm() -> None:
        """Import the SDK's Messages API now. Twilio's SDK imports it on first use, under
        Python's import lock: the first send of a fresh worker waited most of a second under
        load, long after the pacing slot it had reserved. Builds objects only; no request."""
        from twilio.rest import Client

        Client("AC" + "0" * 32, "warm-up").api.v2010.account.messages  # noqa: B018

    def sender_key(self) -> str:
        """Rate limits are per sending number (or messaging service)."""
        return self._service or self._from

    def _client(self) -> Any:
        return thread_client(self._local, self._sid, self._token, self._base, self._timeout)

    def send(self, message: OutboundMessage) -> SendResult:
        """Send one message; raises SendError."""
        kwargs: dict[str, Any] = {}
        if message.body:
            kwargs["body"] = message.body
        if message.attachments:
            kwargs["media_url"] = [a.url for a in message.attachments]
        return self._create(message.to, kwargs)

    def _address(self, to: str) -> str:
        """The `To` of a message to this E.164 number (WhatsApp prefixes it)."""
        return to

    def _create(self, to: str, content: dict[str, Any]) -> SendResult:
        """Create one message to `to` with `content` (body, media, or a template)."""
        from twilio.base.exceptions import TwilioException

        client = self._client()
        kwargs: dict[str, Any] = {"to": self._address(to), "status_callback": self._callback,
                                  **content}
        if self._service:
            kwargs["messaging_service_sid"] = self._service
        else:
            kwargs["from_"] = self._from
        try:
            created = client.messages.create(**kwargs)
        except TwilioException as exc:
            # TwilioRestException (classic error JSON) and TwilioServiceException (newer
            # problem+json bodies) share no base but this one; both carry status and code.
            # The Retry-After header is not on the exception: our HTTP client kept it.
            retry_after = retry_after_seconds(client.http_client.last_headers)
            raise classify_error(getattr(exc, "status", None), getattr(exc, "code", None),
                                 retry_after, self.error_kinds) from None
        except httpx.HTTPError as exc:
            if never_sent(exc):  # refused, unresolvable, connect timeout: nothing left us
                raise SendError("provider-unavailable", type(exc).__name__) from None
            # The request reached Twilio, which may have created the message before the answer
            # was lost (read timeout, connection dropped, an answer refused as malformed or too
            # large): retrying could text the patient twice, and Twilio's Messages API has no
            # idempotency key.
            raise SendError("outcome-unknown", type(exc).__name__) from None
        return SendResult(provider_id=str(created.sid), status=str(created.status))

    def fetch_status(self, sid: str) -> tuple[str, str, str]:
        """Ask Twilio for a message's current status: (status, error code or "", its To)."""
        from twilio.base.exceptions import TwilioException

        try:
            message = self._client().messages(sid).fetch()
        except TwilioException as exc:
            raise classify_error(getattr(exc, "status", None),
                                 getattr(exc, "code", None)) from None
        except httpx.HTTPError as exc:
            raise SendError("provider-unavailable", type(exc).__name__) from None
        code = message.error_code
        return (str(message.status), "" if code in (None, "") else str(code),
                str(message.to or ""))


# The largest Twilio answer read (a Message resource is about 2 KB of JSON; a page of them
# stays far below). Only a broken or hostile server comes near it; not a setting.
MAX_ANSWER_BYTES = 1024 * 1024
# Connections per thread's client: the SDK sends one request at a time per client.
POOL_SIZE = 2


def thread_client(local: threading.local, account_sid: str, auth_token: str, base_url: str,
                  timeout: float) -> Any:
    """This thread's Twilio SDK client (kept on `local`): the SDK's client keeps the last
    response on itself, so it is not shared between threads."""
    client = getattr(local, "client", None)
    if client is None:
        from twilio.rest import Client

        client = Client(account_sid, auth_token,
                        http_client=sdk_http_client(base_url, timeout))
        local.client = client
    return client


def sdk_http_client(base_url: str, timeout: float) -> Any:
    """The SDK's HTTP client, a public subclass of twilio.http.HttpClient (the SDK's extension
    point for custom clients) that sends through httpx with worker.httpclient's limits: a
    total deadline, a size limit on the (decoded) answer, no stale answer. It keeps the last
    answer's headers (Retry-After is not on the SDK's exceptions). One instance per thread.

    Why not the SDK's own TwilioHttpClient: it sends through `requests`, which has neither a
    total deadline nor a size limit (it reads the whole answer, gzip inflated), and whose
    http.client reads `Content-Length: 1_0` as 10. The request on the wire is the one
    `requests` would make: the SDK's headers, its form (or JSON) body, HTTP Basic auth, no
    redirects followed; proxies come from the environment (HTTPS_PROXY, NO_PROXY).

    Rewriting every *.twilio.com URL (rather than setting `client.api.base_url`) keeps working
    when the SDK itself rewrites hosts for TWILIO_EDGE / TWILIO_REGION.
    """
    from twilio.http import HttpClient
    from twilio.http.response import Response

    rewrite = base_url.rstrip("/") != TWILIO_API
    base_url = base_url.rstrip("/")

    class Transport(HttpClient):  # type: ignore[misc]
        last_headers: Mapping[str, str] = {}

        def __init__(self) -> None:
            super().__init__(logging.getLogger("twilio.http_client"), False, timeout)
            self._clients: dict[str, httpx.Client] = {}  # origin → its pool

        def request(self, method: str, url: str, params: Mapping[str, Any] | None = None,
                    data: Mapping[str, Any] | None = None,
                    headers: Mapping[str, str] | None = None,
                    auth: tuple[str, str] | None = None, timeout: float | None = None,
                    allow_redirects: bool = False) -> Any:
            parts = urlsplit(url)
            if rewrite and (parts.hostname or "").endswith(".twilio.com"):
                url = base_url + parts.path + (f"?{parts.query}" if parts.query else "")
            if params:
                url += ("&" if "?" in url else "?") + _form(params)
            hdrs = dict(headers or {})
            body = None
            if data:
                if hdrs.get("Content-Type") in ("application/json", "application/scim+json"):
                    body = json.dumps(data).encode()
                else:
                    hdrs.setdefault("Content-Type", "application/x-www-form-urlencoded")
                    body = _form(data).encode()
            self.last_headers = {}
            target = urlsplit(url)
            origin = f"{target.scheme}://{target.netloc}"
            client = self._clients.get(origin)
            wait = timeout if timeout is not None else self.timeout or 10.0
            if client is None:
                client = self._clients[origin] = new_client(origin, POOL_SIZE, wait)
            answer = fetch(client, method.upper(), url, headers=hdrs, content=body,
                           auth=auth, timeout=wait, max_bytes=MAX_ANSWER_BYTES)
            self.last_headers = dict(answer.headers)
            return Response(answer.status, answer.body.decode("utf-8", "replace"),
                            self.last_headers)

    return Transport()


def _form(values: Mapping[str, Any]) -> str:
    """A form body or query string as `requests` encodes a dict: lists repeat the key, None
    values are left out."""
    pairs = [(key, v) for key, value in values.items()
             for v in (value if isinstance(value, list | tuple) else [value]) if v is not None]
    return urlencode(pairs)
