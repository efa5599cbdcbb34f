"""SendGrid Inbound Parse: a posted email → a plain record (receiver) → an InboundMessage (worker).

The receiver turns the request into a JSON-able *email record* (`parse_request`): both Inbound
Parse modes, the parsed multipart form (`headers`, `from`, `to`, `subject`, `text`, `html`,
`envelope`, `charsets`, `SPF`, `dkim`, `attachment-info`, `attachmentN` files) and the raw
MIME message (field `email`), end in the same shape. Every text is decoded with the charset
the email declares, and a wrong or unknown one never raises. An email over EMAIL_MAX_BYTES
keeps its text and names the attachments it leaves out. The worker then judges the sender
(`sender_authentication`) and builds the channel-neutral message (`to_inbound`).

Nothing outside this module knows SendGrid's field names.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from email import policy
from email.headerregistry import Address
from email.message import EmailMessage
from email.parser import BytesParser
from email.utils import getaddresses, parseaddr
from typing import Any

from worker.channels import Attachment, InboundMessage
from worker.channels.sendgrid import (
    CHANNEL,
    EMAIL_INBOUND_MESSAGE_ID_SYSTEM,
    MEDIUM_CODE,
    clean_subject,
)
from worker.errors import PermanentError
from worker.fhir.resources import fit_text

# SendGrid refuses emails over 30 MB; the form or raw message is a little larger than that.
MAX_REQUEST_BYTES = 40 * 1024 * 1024
ATTACHMENT_FIELD = re.compile(r"attachment([0-9]{1,3})")
_MSG_ID = re.compile(r"<[^<>\s]{1,995}>")
_CONTENT_TYPE = re.compile(r"[a-z0-9][\w.+\-]{0,63}/[\w.+\-]{1,127}")
# Languages whose reply headers ("On … wrote:", "Am … schrieb …") the quote stripper knows.
REPLY_LANGUAGES = ["en", "de", "fr", "es", "it", "nl", "pt", "sv", "ja"]
# The longest References chain we look through for a message we sent (newest first).
MAX_REFERENCES = 50
# File names of the full original kept as an attachment when the text shown is less than it.
ORIGINAL_TITLE = {"text/plain": "original-message.txt", "text/html": "original-message.html"}


class InvalidEmail(ValueError):
    """The request is not an Inbound Parse post we can read (the receiver answers 400)."""


# -- decoding ------------------------------------------------------------------------------------

def decode_text(data: bytes, charset: str | None) -> str:
    """`data` as text in its declared charset; a wrong or unknown charset never raises.

    Declared charset, strictly; else UTF-8, strictly; else charset-normalizer's best guess;
    else the declared (or UTF-8) decoding with replacement characters.
    """
    declared = (charset or "").strip().strip('"').lower() or "utf-8"
    for candidate in (declared, "utf-8"):
        try:
            return data.decode(candidate)
        except (LookupError, UnicodeDecodeError):
            continue
    guess = _guess(data)
    if guess is not None:
        return guess
    try:
        return data.decode(declared, errors="replace")
    except LookupError:
        return data.decode("utf-8", errors="replace")


def _guess(data: bytes) -> str | None:
    from charset_normalizer import from_bytes

    try:
        best = from_bytes(data).best()
    except Exception:  # a guess that fails is no worse than no guess
        return None
    return None if best is None else str(best)


def _part_text(part: EmailMessage) -> str:
    raw = part.get_payload(decode=True)
    data = raw if isinstance(raw, bytes) else b""
    return decode_text(data, part.get_content_charset())


def html_to_text(html: str) -> str:
    """Readable text of an HTML body (html2text: links kept, no markup, no wrapping)."""
    import html2text

    converter = html2text.HTML2Text()
    converter.body_width = 0
    converter.ignore_images = True
    converter.ignore_emphasis = True  # **bold** is markup, not what the patient wrote
    converter.unicode_snob = True
    return str(converter.handle(html)).strip()


def strip_quoted(text: str) -> str:
    """The new part of a reply: quoted history (`On … wrote:` blocks, `>` lines, Outlook
    separators) removed by mail-parser-reply; the whole text when nothing would be left."""
    from mailparser_reply import EmailReplyParser

    try:
        latest = EmailReplyParser(languages=REPLY_LANGUAGES).parse_reply(text=text)
    except Exception:  # a library failure must not lose the message
        return text.strip()
    latest = (latest or "").strip()
    return latest or text.strip()


# -- the record ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class FilePart:
    """One uploaded file of the form (an attachment in parsed mode)."""

    field: str
    filename: str
    content_type: str
    data: bytes


def parse_form_body(content_type: str, body: bytes) -> tuple[dict[str, bytes], list[FilePart]]:
    """The fields (raw bytes) and files of a multipart/form-data body, read with the standard
    library's email parser so that every text field keeps its bytes for its own charset
    (a form parser would decode them all as UTF-8)."""
    if not content_type.lower().startswith("multipart/form-data"):
        raise InvalidEmail("expected multipart/form-data")
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1")
    message = BytesParser(policy=policy.default).parsebytes(head + body)
    if not message.is_multipart():
        raise InvalidEmail("the multipart body could not be read")
    fields: dict[str, bytes] = {}
    files: list[FilePart] = []
    for part in message.iter_parts():
        disposition = part.get("Content-Disposition", "")
        name = part.get_param("name", header="content-disposition")
        if not disposition or not isinstance(name, str):
            continue
        raw = part.get_payload(decode=True)
        data = raw if isinstance(raw, bytes) else b""
        filename = part.get_filename()
        if filename is not None or ATTACHMENT_FIELD.fullmatch(name):
            files.append(FilePart(name, filename or name, part.get_content_type(), data))
        elif name not in fields:
            fields[name] = data
    return fields, files


def parse_request(fields: Mapping[str, bytes], files: list[FilePart], max_bytes: int
                  ) -> dict[str, Any]:
    """The email record of one Inbound Parse post (either mode). Raises InvalidEmail."""
    charsets = _json_object(fields.get("charsets", b""))
    envelope = _json_object(fields.get("envelope", b""))

    def text(name: str) -> str:
        value = fields.get(name)
        return decode_text(value, str(charsets.get(name) or "utf-8")) if value else ""

    common = {
        "spf": text("SPF").strip().lower(),
        "dkim": text("dkim").strip(),
        "envelope_from": str(envelope.get("from") or "").strip(),
        "envelope_to": [a for a in _list(envelope.get("to")) if isinstance(a, str)],
    }
    if "email" in fields:
        return {**common, **_from_raw(fields["email"], max_bytes)}
    if "from" not in fields and "headers" not in fields:
        raise InvalidEmail("neither an `email` field (raw mode) nor `from`/`headers` (parsed)")
    headers = _headers(fields.get("headers", b""))
    info = _json_object(fields.get("attachment-info", b""))
    attachments: list[tuple[str, str, bytes]] = []
    for f in files:
        found = info.get(f.field)
        meta: dict[str, Any] = found if isinstance(found, dict) else {}
        attachments.append((str(meta.get("filename") or meta.get("name") or f.filename),
                            str(meta.get("type") or f.content_type), f.data))
    body_text, body_html = text("text"), text("html")
    size = sum(len(v) for v in fields.values()) + sum(len(f.data) for f in files)
    return {**common, **_record(headers, text("from"), text("subject"), body_text, body_html,
                                attachments, size, max_bytes)}


def _from_raw(raw: bytes, max_bytes: int) -> dict[str, Any]:
    message = BytesParser(policy=policy.default).parsebytes(raw)
    body_text = body_html = ""
    chosen = []
    for kind in ("plain", "html"):
        try:
            part = message.get_body(preferencelist=(kind,))
        except Exception:  # a malformed structure: no body of that kind
            part = None
        if isinstance(part, EmailMessage):
            chosen.append(part)
            if kind == "plain":
                body_text = _part_text(part)
            else:
                body_html = _part_text(part)
    attachments: list[tuple[str, str, bytes]] = []
    for part in message.walk():
        if part.is_multipart() or any(part is c for c in chosen) or not isinstance(
                part, EmailMessage):
            continue
        if not (part.is_attachment() or part.get_filename()
                or part.get_content_maintype() not in ("text", "multipart")):
            continue
        raw_part = part.get_payload(decode=True)
        data = raw_part if isinstance(raw_part, bytes) else b""
        attachments.append((part.get_filename() or f"attachment{len(attachments) + 1}",
                            part.get_content_type(), data))
    return _record(message, _header(message, "From"), _header(message, "Subject"), body_text,
                   body_html, attachments, len(raw), max_bytes)


def _record(headers: Any, from_field: str, subject: str, body_text: str, body_html: str,
            attachments: list[tuple[str, str, bytes]], size: int, max_bytes: int
            ) -> dict[str, Any]:
    sender = parseaddr(from_field)[1].strip()
    if not sender or "@" not in sender:
        raise InvalidEmail("From holds no address")
    kept: list[dict[str, Any]] = []
    omitted: list[dict[str, Any]] = []
    for name, content_type, data in attachments:
        item = {"name": name[:255], "content_type": _content_type(content_type),
                "size": len(data)}
        if size > max_bytes:
            omitted.append(item)
        else:
            kept.append({**item, "data": base64.b64encode(data).decode()})
    return {
        "message_id": _first_id(_header(headers, "Message-ID")),
        "in_reply_to": _ids(_header(headers, "In-Reply-To")),
        "references": _ids(_header(headers, "References")),
        "date": _header(headers, "Date"),
        "from": sender,
        "to": [a for _, a in getaddresses([_header(headers, "To")]) if a],
        "subject": subject.strip(),
        "text": body_text,
        "html": body_html,
        "auth_results": _all_headers(headers, "Authentication-Results"),
        "size": size,
        "attachments": kept,
        "omitted": omitted,
    }


def _headers(raw: bytes) -> EmailMessage:
    message = BytesParser(policy=policy.default).parsebytes(raw.strip() + b"\r\n\r\n",
                                                            headersonly=True)
    return message if isinstance(message, EmailMessage) else EmailMessage()


def _header(headers: Any, name: str) -> str:
    try:
        value = headers.get(name)
        return str(value or "")
    except Exception:  # a malformed header reads as absent
        return ""


def _all_headers(headers: Any, name: str) -> list[str]:
    try:
        return [str(v) for v in headers.get_all(name) or []]
    except Exception:
        return []


def _ids(value: str) -> list[str]:
    return _MSG_ID.findall(value)


def _first_id(value: str) -> str:
    found = _ids(value)
    return found[0] if found else ""


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value] if value else []


def _content_type(value: str) -> str:
    # A FHIR code: a hostile or broken type would make the server refuse the whole message.
    value = value.strip().lower()
    return value if _CONTENT_TYPE.fullmatch(value) else "application/octet-stream"


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw.decode("utf-8", errors="replace")) if raw else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


# -- sender authenticity -------------------------------------------------------------------------

_DKIM_RESULT = re.compile(r"@([A-Za-z0-9.\-]+)\s*:\s*([a-z]+)")
_AR_DKIM = re.compile(r"\bdkim=([a-z]+)\b[^;]*?\bheader\.(?:d|i)=@?([A-Za-z0-9.\-]+)", re.I)
_AR_SPF = re.compile(r"\bspf=([a-z]+)\b[^;]*?\bsmtp\.mailfrom=([^\s;]+)", re.I)


def domain_of(address: str) -> str:
    """The lower-cased domain of an email address ("" when there is none)."""
    return address.rsplit("@", 1)[-1].strip().strip(">").lower() if "@" in address else ""


def aligned(domain: str, from_domain: str) -> bool:
    """DMARC's relaxed alignment, without the public-suffix list: the same domain, or one a
    subdomain of the other when the shorter has at least two labels (`mail.example.org` and
    `example.org` align; `org` aligns with nothing)."""
    domain, from_domain = domain.lower().strip("."), from_domain.lower().strip(".")
    if not domain or not from_domain:
        return False
    if domain == from_domain:
        return True
    shorter, longer = sorted((domain, from_domain), key=len)
    return shorter.count(".") >= 1 and longer.endswith("." + shorter)


def sender_authentication(record: Mapping[str, Any]) -> str | None:
    """How the From domain was authenticated ("dkim" or "spf"), or None.

    DKIM: SendGrid's `dkim` field (`{@example.org : pass, @other.net : fail}`) has a pass for a
    domain aligned with From. SPF: SendGrid's `SPF` field says pass and the envelope sender is
    in a domain aligned with From (SPF passing for some other domain proves nothing). Without
    those fields (raw mode posts them too), only the topmost Authentication-Results header
    counts, and only when SendGrid's own receiving host wrote it: any lower one may be the
    sender's own invention.
    """
    from_domain = domain_of(str(record.get("from") or ""))
    dkim = str(record.get("dkim") or "")
    for domain, result in _DKIM_RESULT.findall(dkim):
        if result.lower() == "pass" and aligned(domain, from_domain):
            return "dkim"
    if str(record.get("spf") or "").lower() == "pass" and aligned(
            domain_of(str(record.get("envelope_from") or "")), from_domain):
        return "spf"
    if dkim or record.get("spf"):
        return None
    results = list(record.get("auth_results") or [])
    top = str(results[0]) if results else ""
    if not top.split(";", 1)[0].strip().lower().endswith(".sendgrid.net"):
        return None
    for result, domain in _AR_DKIM.findall(top):
        if result.lower() == "pass" and aligned(domain, from_domain):
            return "dkim"
    for result, mailfrom in _AR_SPF.findall(top):
        if result.lower() == "pass" and aligned(domain_of(mailfrom), from_domain):
            return "spf"
    return None


# -- the message ---------------------------------------------------------------------------------

def _for_sender(record: Mapping[str, Any], value: str) -> str:
    """`value` scoped by the sender: `sender:<digest of the lower-cased From>:<value>`.

    Message-IDs are chosen by the sender's side: mailers reuse them, and anyone can copy one
    from a header they have seen (a reply-all, a forward). Scoped this way, another sender's
    Message-ID can neither make their email a "repeat" of ours nor put it in our thread. The
    digest keeps the address out of identifiers and Redis keys."""
    sender = str(record.get("from") or "").strip().lower()
    return f"sender:{hashlib.sha256(sender.encode('utf-8', 'replace')).hexdigest()[:16]}:{value}"


def message_key(record: Mapping[str, Any]) -> str:
    """The email's idempotency key: (sender, Message-ID), else a digest of (from, date,
    subject, body) that a resend of the same email reproduces."""
    if record.get("message_id"):
        return _for_sender(record, str(record["message_id"]))
    parts = [str(record.get(k) or "") for k in ("from", "date", "subject", "text", "html")]
    return "sha256:" + hashlib.sha256("\x1f".join(parts).encode("utf-8", "replace")).hexdigest()


def conversation_id(record: Mapping[str, Any]) -> str:
    """The conversation an email belongs to, for this sender: the root of References, else
    In-Reply-To, else the email's own key. A thread another sender started is never joined
    through its Message-ID (a reply-all from a relative opens the relative's own thread);
    answering an email we sent is matched by ownership instead (threads.by_conversation)."""
    refs = list(record.get("references") or [])
    replies = list(record.get("in_reply_to") or [])
    root = str(refs[0]) if refs else str(replies[0]) if replies else ""
    return _for_sender(record, root) if root else message_key(record)


def replied_ids(record: Mapping[str, Any]) -> tuple[str, ...]:
    """The Message-IDs this email answers, newest first (In-Reply-To, then References from
    its end), at most MAX_REFERENCES."""
    seen: list[str] = []
    for mid in [*(record.get("in_reply_to") or []), *reversed(record.get("references") or [])]:
        if mid not in seen:
            seen.append(str(mid))
    return tuple(seen[:MAX_REFERENCES])


_SUBJECT_PREFIX = re.compile(r"^\s*((re|fwd?|aw|wg|sv|vs|tr|rv)\s*(\[[0-9]+\])?\s*:\s*)+", re.I)


def topic(subject: str) -> str:
    """The subject on one line (no control characters: it becomes the thread's topic, and the
    subject of every reply) without its `Re:` / `Fwd:` prefixes (also AW:, WG:, SV:, TR:, RV:)."""
    return _SUBJECT_PREFIX.sub("", clean_subject(subject)).strip()


@dataclass(frozen=True)
class EmailBody:
    """The text to show and, when it is not all the email said, the full original."""

    text: str
    original: str  # "" when `text` is the whole body
    original_type: str  # text/plain or text/html
    cut: bool = False  # `text` was cut to MAX_TEXT_BYTES (the original holds all of it)


def body_of(record: Mapping[str, Any]) -> EmailBody:
    """The text part (else the HTML as readable text) with quoted history stripped, cut to
    what a FHIR server takes in one string (the full original is then kept)."""
    plain, html = str(record.get("text") or ""), str(record.get("html") or "")
    if plain.strip():
        latest = strip_quoted(plain)
        body = EmailBody(latest, plain if latest != plain.strip() else "", "text/plain")
        source = plain
    elif html.strip():
        body = EmailBody(strip_quoted(html_to_text(html)), html, "text/html")
        source = html
    else:
        return EmailBody("", "", "text/plain")
    text, cut = fit_text(body.text)
    if not cut:
        return body
    return EmailBody(text, body.original or source, body.original_type, cut=True)


def clinic_mailbox(record: Mapping[str, Any]) -> str:
    """The clinic address the email was delivered to (SMTP envelope, else the first To)."""
    for address in [*(record.get("envelope_to") or []), *(record.get("to") or [])]:
        if "@" in str(address):
            return str(address).strip().lower()
    return ""


def to_inbound(record: Mapping[str, Any], received_at: str,
               attachments: tuple[Attachment, ...]) -> InboundMessage:
    """The channel-neutral message of an email record (attachments already stored)."""
    sender = str(record.get("from") or "").strip()
    try:
        Address(addr_spec=sender)
    except (ValueError, IndexError, TypeError) as exc:
        raise PermanentError("invalid-sender", "From is not an email address") from exc
    body = body_of(record)
    notes = [f"Attachment left out (the email was over the size limit): "
             f"{a.get('name')} ({a.get('content_type')}, {a.get('size')} bytes)"
             for a in record.get("omitted") or []]
    if body.cut:
        notes.append(f"The text was too long to show in full: the first {len(body.text)} "
                     f"characters are shown; the whole email is attached as "
                     f"{ORIGINAL_TITLE[body.original_type]}.")
    mid = str(record.get("message_id") or "")
    return InboundMessage(
        channel=CHANNEL, medium_code=MEDIUM_CODE, provider_message_id=message_key(record),
        sender=sender, clinic_address=clinic_mailbox(record), body=body.text,
        received_at=received_at, attachments=attachments,
        provider_conversation_id=conversation_id(record), replies_to=replied_ids(record),
        topic=topic(str(record.get("subject") or "")), notes=tuple(notes),
        identifiers=((EMAIL_INBOUND_MESSAGE_ID_SYSTEM, mid),) if mid else ())
