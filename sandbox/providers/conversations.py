"""The provider sandbox's Twilio Conversations: the REST subset Switchboard and the demo use,
Media Content Service media, and signed post-event webhooks (onMessageAdded,
onDeliveryUpdated) as Twilio posts them.

REST (`https://conversations.twilio.com/v1`, reached through the same base-URL override as the
Messages API; Basic auth and faults as for Twilio's other routes, a fault's `to` matching the
Conversation SID):
    POST/GET  /v1/Conversations[/CH…]
    POST/GET  /v1/Conversations/CH…/Participants[/MB…]   (Identity, or MessagingBinding.Address
                                                          + MessagingBinding.ProxyAddress)
    POST/GET  /v1/Conversations/CH…/Messages[/IM…]       (Author, Body; the header
                                                          X-Twilio-Webhook-Enabled: false
                                                          suppresses onMessageAdded)
    GET       /v1/Conversations/CH…/Messages/IM…/Receipts
    POST/GET  /v1/Configuration/Webhooks                  (PostWebhookUrl, Filters)
    GET       /v1/Services/IS…/Media/ME…[/Content]        (mcs.us1.twilio.com)
Control (see README.md): /__conversations/setup, /write, /delivery, /webhooks.

Standard library only; the signing and posting functions are handed in by provider_sandbox.py.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import threading
import urllib.parse
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

CHAT_SERVICE_SID = "IS" + "5a" * 16  # the account's default Conversation Service
WEBHOOK_PATH = "/webhooks/twilio/conversations"
_ROUTE = re.compile(r"^/v1/Conversations(?:/(CH[0-9a-f]{32})(?:/(Participants|Messages)"
                    r"(?:/((?:MB|IM)[0-9a-f]{32})(/Receipts)?)?)?)?$")
_MEDIA = re.compile(r"^/v1/Services/(IS[0-9a-f]{32})/Media/(ME[0-9a-f]{32})(/Content)?$")
_ADDRESS = re.compile(r"(whatsapp:)?\+[1-9][0-9]{5,14}")
DELIVERY_STATUSES = ("sent", "delivered", "read", "failed", "undelivered")

Sign = Callable[[str, str, dict[str, str]], str]  # (token, url, params) -> X-Twilio-Signature
Post = Callable[[str, bytes, dict[str, str]], dict[str, Any]]  # (url, body, headers) -> result


def _sid(prefix: str) -> str:
    return prefix + uuid.uuid4().hex


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Conversations:
    """Everything the sandbox's Conversations remember; guarded by `lock`."""

    def __init__(self, sign: Sign, post: Post, token: Callable[[], str],
                 account_sid: str | None) -> None:
        self._sign, self._post, self._token = sign, post, token
        self.account_sid = account_sid or "ACsandbox"  # what webhooks carry as AccountSid
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        """Forget conversations, media and webhook posts (the /__reset route)."""
        with self.lock:
            self.conversations: dict[str, dict[str, Any]] = {}
            self.participants: dict[str, dict[str, Any]] = {}  # MB → participant
            self.messages: dict[str, dict[str, Any]] = {}  # IM → message
            self.media: dict[str, tuple[dict[str, Any], bytes]] = {}
            self.webhook: dict[str, Any] = {"url": None, "post": True,
                                            "filters": ["onMessageAdded", "onDeliveryUpdated"]}
            self.posts: list[dict[str, Any]] = []

    # --- REST ----------------------------------------------------------------------------------

    def handles(self, path: str) -> bool:
        """Whether `path` is one of these routes."""
        return bool(_ROUTE.match(path) or _MEDIA.match(path)
                    or path == "/v1/Configuration/Webhooks")

    def handle(self, h: Any, method: str, path: str, body: bytes) -> None:
        """Serve one REST request on the provider sandbox's handler `h`."""
        route, media = _ROUTE.match(path), _MEDIA.match(path)
        form = dict(urllib.parse.parse_qsl(body.decode("utf-8", "replace"),
                                           keep_blank_values=True))
        conversation = route.group(1) if route else None
        entry = h._record("twilio", method, path, conversation, "form", form)
        if not h._twilio_authorized():
            h._answered(entry, 401)
            h._twilio_error(401, 20003, "Authenticate")
            return
        fault = h.server.state.take_fault("twilio", method, [conversation] if conversation
                                          else [])
        h._apply_delay_or_disconnect(fault, entry)
        if fault is not None and fault.status is not None:
            code = fault.twilio_code or (20500 if fault.status >= 500 else 20001)
            h._answered(entry, fault.status, fault=fault.id)
            h._twilio_error(fault.status, code, fault.message or "Sandbox fault",
                            h._retry_headers(fault))
            return
        if media:
            status, answer = self._media(media.group(1), media.group(2), bool(media.group(3)))
            h._answered(entry, status)
            if isinstance(answer, bytes):
                meta = self.media[media.group(2)][0]
                h._send(200, answer, meta["content_type"])
            else:
                h._json(status, answer)
            return
        if path == "/v1/Configuration/Webhooks":
            if method == "POST":
                with self.lock:
                    if "PostWebhookUrl" in form:
                        self.webhook["url"] = form["PostWebhookUrl"] or None
            status, answer = 200, self._webhook_config()
        else:
            assert route is not None
            status, answer = self._rest(method, route, form,
                                        h.headers.get("X-Twilio-Webhook-Enabled"))
        h._answered(entry, status, sid=answer.get("sid"))
        h._json(status, answer)

    def _webhook_config(self) -> dict[str, Any]:
        return {"account_sid": self.account_sid, "method": "POST",
                "filters": self.webhook["filters"],
                "post_webhook_url": self.webhook["url"], "pre_webhook_url": None,
                "target": "webhook", "url": "https://conversations.twilio.com/v1/"
                                            "Configuration/Webhooks"}

    def _rest(self, method: str, route: re.Match[str], form: dict[str, str],
              webhook_enabled: str | None) -> tuple[int, dict[str, Any]]:
        conv_sid, kind, item, receipts = route.groups()
        if conv_sid is None:
            if method == "POST":
                return 201, self.create_conversation(form.get("FriendlyName", ""))
            with self.lock:
                rows = list(self.conversations.values())
            return 200, {"conversations": rows, "meta": _meta("conversations", len(rows))}
        with self.lock:
            conv = self.conversations.get(conv_sid)
        if conv is None:
            return _not_found(f"/v1/Conversations/{conv_sid}")
        if kind is None:
            return 200, conv
        if kind == "Participants":
            if item is None and method == "POST":
                return self.add_participant(conv_sid, form)
            with self.lock:
                rows = [p for p in self.participants.values()
                        if p["conversation_sid"] == conv_sid]
            if item is None:
                return 200, {"participants": rows, "meta": _meta("participants", len(rows))}
            found = next((p for p in rows if p["sid"] == item), None)
            return (200, found) if found else _not_found(f"Participants/{item}")
        if item is None and method == "POST":
            author = form.get("Author") or "system"
            with self.lock:  # Twilio links a message to the participant with that identity
                own = next((p["sid"] for p in self.participants.values()
                            if p["conversation_sid"] == conv_sid and p["identity"] == author),
                           None)
            message = self.add_message(conv_sid, author, form.get("Body", ""), [], "API",
                                       own, post=webhook_enabled != "false")
            return 201, message
        with self.lock:
            rows = [self._public(m) for m in self.messages.values()
                    if m["conversation_sid"] == conv_sid]
        if item is None:
            return 200, {"messages": rows, "meta": _meta("messages", len(rows))}
        with self.lock:
            stored = self.messages.get(item)
        if stored is None or stored["conversation_sid"] != conv_sid:
            return _not_found(f"Messages/{item}")
        if receipts:
            rows = list(stored["_receipts"].values())
            return 200, {"delivery_receipts": rows, "meta": _meta("delivery_receipts",
                                                                   len(rows))}
        return 200, self._public(stored)

    @staticmethod
    def _public(message: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in message.items() if not k.startswith("_")}

    def _media(self, service: str, media_sid: str, content: bool
               ) -> tuple[int, dict[str, Any] | bytes]:
        with self.lock:
            found = self.media.get(media_sid)
        if found is None or found[0]["service_sid"] != service:
            return _not_found(f"Media/{media_sid}")
        return (200, found[1]) if content else (200, found[0])

    # --- the model -----------------------------------------------------------------------------

    def create_conversation(self, friendly_name: str = "") -> dict[str, Any]:
        """A new Conversation in the default service."""
        sid = _sid("CH")
        conv = {"sid": sid, "account_sid": self.account_sid, "chat_service_sid": CHAT_SERVICE_SID,
                "friendly_name": friendly_name or None, "unique_name": None, "state": "active",
                "attributes": "{}", "date_created": _now(), "date_updated": _now(),
                "url": f"https://conversations.twilio.com/v1/Conversations/{sid}",
                "links": {k: f"https://conversations.twilio.com/v1/Conversations/{sid}/{k}"
                          for k in ("participants", "messages", "webhooks")}}
        with self.lock:
            self.conversations[sid] = conv
        return conv

    def add_participant(self, conv_sid: str, form: dict[str, str]
                        ) -> tuple[int, dict[str, Any]]:
        """A chat participant (Identity) or an SMS/WhatsApp one (MessagingBinding.*)."""
        address = form.get("MessagingBinding.Address", "")
        proxy = form.get("MessagingBinding.ProxyAddress", "")
        identity = form.get("Identity", "")
        if address and (not _ADDRESS.fullmatch(address) or not _ADDRESS.fullmatch(proxy)):
            return 400, {"code": 50216, "message": "Invalid MessagingBinding", "status": 400}
        if not address and not identity:
            return 400, {"code": 50216, "message": "Identity or MessagingBinding.Address is "
                         "required", "status": 400}
        sid = _sid("MB")
        binding = None if not address else {
            "type": "whatsapp" if address.startswith("whatsapp:") else "sms",
            "address": address, "proxy_address": proxy}
        participant = {"sid": sid, "account_sid": self.account_sid, "conversation_sid": conv_sid,
                       "identity": identity or None, "messaging_binding": binding,
                       "attributes": "{}", "date_created": _now(), "date_updated": _now(),
                       "url": f"https://conversations.twilio.com/v1/Conversations/{conv_sid}"
                              f"/Participants/{sid}"}
        with self.lock:
            self.participants[sid] = participant
        return 201, participant

    def add_message(self, conv_sid: str, author: str, body: str, media: list[dict[str, Any]],
                    source: str, participant_sid: str | None = None, post: bool = True,
                    webhook_author: str | None = None) -> dict[str, Any]:
        """Store a message; deliver it to every bound participant but its author (a `sent`
        receipt each); post onMessageAdded when webhooks are on for it."""
        sid = _sid("IM")
        with self.lock:
            index = sum(1 for m in self.messages.values() if m["conversation_sid"] == conv_sid)
            others = [p for p in self.participants.values()
                      if p["conversation_sid"] == conv_sid and p["messaging_binding"]
                      and p["sid"] != participant_sid]
            receipts = {p["sid"]: {"sid": _sid("DY"), "participant_sid": p["sid"],
                                   "message_sid": sid, "conversation_sid": conv_sid,
                                   "channel_message_sid": _sid("SM"), "status": "sent",
                                   "error_code": 0, "date_created": _now()}
                        for p in others}
            message = {"sid": sid, "account_sid": self.account_sid, "conversation_sid": conv_sid,
                       "chat_service_sid": CHAT_SERVICE_SID, "index": index, "author": author,
                       "body": body or None, "media": media or None,
                       "participant_sid": participant_sid, "attributes": "{}",
                       "date_created": _now(), "date_updated": _now(),
                       "delivery": {"total": len(receipts), "sent": "all" if receipts
                                    else "none", "delivered": "none", "read": "none",
                                    "failed": "none", "undelivered": "none"},
                       "url": f"https://conversations.twilio.com/v1/Conversations/{conv_sid}"
                              f"/Messages/{sid}",
                       "_receipts": receipts, "_source": source}
            self.messages[sid] = message
        if post:
            params = {"EventType": "onMessageAdded", "AccountSid": self.account_sid,
                      "ChatServiceSid": CHAT_SERVICE_SID, "ConversationSid": conv_sid,
                      "MessageSid": sid, "Index": str(index), "Author": author,
                      "Body": body, "Source": source, "DateCreated": message["date_created"],
                      "Attributes": "{}", "RetryCount": "0", "WebhookType": "webhook",
                      "WebhookSid": "WH" + "0" * 32}
            if webhook_author is not None:
                params["Author"] = webhook_author
            if participant_sid:
                params["ParticipantSid"] = participant_sid
            if media:
                params["Media"] = json.dumps([{"Sid": m["sid"], "Filename": m["filename"],
                                               "ContentType": m["content_type"],
                                               "Size": m["size"]} for m in media])
            self.emit(params)
        return self._public(message)

    def emit(self, params: dict[str, str], url: str | None = None) -> dict[str, Any]:
        """Sign `params` over the webhook URL and post them (when posting is on); the record,
        with the signature, is kept for /__conversations/webhooks either way."""
        with self.lock:
            target = url or self.webhook["url"]
            post = self.webhook["post"]
        record: dict[str, Any] = {"url": target, "params": params, "status": None}
        if target:
            record["signature"] = self._sign(self._token(), target, params)
            if post:
                record.update(self._post(target, urllib.parse.urlencode(params).encode(), {
                    "Content-Type": "application/x-www-form-urlencoded; charset=utf-8",
                    "User-Agent": "TwilioProxy/1.1",
                    "X-Twilio-Signature": record["signature"],
                    "I-Twilio-Idempotency-Token": str(uuid.uuid4())}))
        with self.lock:
            self.posts.append(record)
        return record

    # --- control -------------------------------------------------------------------------------

    def control(self, h: Any, method: str, path: str, body: bytes) -> bool:
        """Serve /__conversations/… on the handler `h`; False when the path is not one."""
        route = (method, path)
        try:
            spec = json.loads(body or b"{}") if method == "POST" else {}
            if not isinstance(spec, dict):
                raise ValueError("body must be a JSON object")
            if route == ("POST", "/__conversations/setup"):
                h._json(200, self._setup(spec))
            elif route == ("POST", "/__conversations/webhook"):
                with self.lock:
                    if "url" in spec:
                        self.webhook["url"] = spec["url"]
                    self.webhook["post"] = bool(spec.get("post", True))
                h._json(200, dict(self.webhook))
            elif route == ("POST", "/__conversations/write"):
                h._json(200, self._write(spec))
            elif route == ("POST", "/__conversations/delivery"):
                h._json(200, self._delivery(spec))
            elif route == ("GET", "/__conversations/webhooks"):
                with self.lock:
                    h._json(200, [dict(p) for p in self.posts])
            elif route == ("GET", "/__conversations/messages"):
                with self.lock:
                    h._json(200, [self._public(m) for m in self.messages.values()])
            else:
                return False
        except (ValueError, KeyError, TypeError, binascii.Error) as exc:
            h._json(400, {"error": str(exc)})
        return True

    def _setup(self, spec: dict[str, Any]) -> dict[str, Any]:
        """A Conversation with the patient's SMS/WhatsApp participant (and, given `identity`,
        the clinic's chat participant)."""
        conv = self.create_conversation(str(spec.get("friendly_name") or ""))
        status, patient = self.add_participant(conv["sid"], {
            "MessagingBinding.Address": str(spec["address"]),
            "MessagingBinding.ProxyAddress": str(spec["proxy_address"])})
        if status != 201:
            raise ValueError(patient["message"])
        out = {"conversation_sid": conv["sid"], "participant_sid": patient["sid"]}
        if spec.get("identity"):
            _, clinic = self.add_participant(conv["sid"], {"Identity": str(spec["identity"])})
            out["clinic_participant_sid"] = clinic["sid"]
        return out

    def _write(self, spec: dict[str, Any]) -> dict[str, Any]:
        """The patient writes into a Conversation: {conversation, participant, body, media:
        [{content_type, filename, data_b64}], author (what the webhook's Author says; default
        the participant's address, as Twilio writes it for SMS and WhatsApp), post}."""
        conv_sid, participant_sid = str(spec["conversation"]), str(spec["participant"])
        with self.lock:
            participant = self.participants.get(participant_sid)
        if participant is None or participant["conversation_sid"] != conv_sid:
            raise ValueError("no such participant in that conversation")
        binding = participant["messaging_binding"] or {}
        address = binding.get("address") or participant["identity"]
        media = []
        for item in spec.get("media") or []:
            data = base64.b64decode(str(item.get("data_b64", "")), validate=True)
            sid = _sid("ME")
            meta = {"sid": sid, "account_sid": self.account_sid, "service_sid": CHAT_SERVICE_SID,
                    "content_type": str(item.get("content_type") or "image/jpeg"),
                    "filename": str(item.get("filename") or f"{sid}.jpg"), "size": len(data),
                    "date_created": _now(),
                    "links": {"content": f"/v1/Services/{CHAT_SERVICE_SID}/Media/{sid}/Content",
                              "content_direct_temporary": None}}
            with self.lock:
                self.media[sid] = (meta, data)
            media.append(meta)
        source = "WHATSAPP" if str(address).startswith("whatsapp:") else "SMS"
        with self.lock:
            saved_post = self.webhook["post"]
            if "post" in spec:
                self.webhook["post"] = bool(spec["post"])
        try:
            message = self.add_message(conv_sid, str(address), str(spec.get("body") or ""),
                                       media, source, participant_sid,
                                       webhook_author=spec.get("author"))
        finally:
            with self.lock:
                self.webhook["post"] = saved_post
        with self.lock:
            webhook = dict(self.posts[-1])
        return {"message": message, "webhook": webhook}

    def _delivery(self, spec: dict[str, Any]) -> dict[str, Any]:
        """A delivery receipt changes: {message, status, error_code, participant, post}."""
        status = str(spec["status"])
        if status not in DELIVERY_STATUSES:
            raise ValueError(f"status must be one of {DELIVERY_STATUSES}")
        with self.lock:
            message = self.messages.get(str(spec["message"]))
            if message is None or not message["_receipts"]:
                raise ValueError("no such message, or it has no delivery receipts")
            receipt = message["_receipts"].get(str(spec.get("participant") or "")) \
                or next(iter(message["_receipts"].values()))
            receipt["status"] = status
            receipt["error_code"] = int(spec.get("error_code") or 0)
            receipt["date_updated"] = _now()
        params = {"EventType": "onDeliveryUpdated", "AccountSid": self.account_sid,
                  "ChatServiceSid": CHAT_SERVICE_SID,
                  "ConversationSid": message["conversation_sid"], "MessageSid": message["sid"],
                  "DeliveryReceiptSid": receipt["sid"],
                  "ChannelMessageSid": receipt["channel_message_sid"],
                  "ParticipantSid": receipt["participant_sid"], "Status": status,
                  "ErrorCode": str(receipt["error_code"]),
                  "DateCreated": receipt["date_created"], "DateUpdated": receipt["date_updated"],
                  "RetryCount": "0", "WebhookType": "webhook", "WebhookSid": "WH" + "0" * 32}
        with self.lock:
            saved_post = self.webhook["post"]
            if "post" in spec:
                self.webhook["post"] = bool(spec["post"])
        try:
            return self.emit(params)
        finally:
            with self.lock:
                self.webhook["post"] = saved_post


def _meta(key: str, count: int) -> dict[str, Any]:
    return {"page": 0, "page_size": max(count, 50), "first_page_url": None,
            "previous_page_url": None, "next_page_url": None, "url": None, "key": key}


def _not_found(what: str) -> tuple[int, dict[str, Any]]:
    return 404, {"code": 20404, "message": f"The requested resource {what} was not found",
                 "more_info": "https://www.twilio.com/docs/errors/20404", "status": 404}
