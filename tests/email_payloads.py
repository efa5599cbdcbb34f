"""Realistic SendGrid Inbound Parse posts (both modes), signed like SendGrid, for the tests."""

from __future__ import annotations

import json
import time
import uuid
from email.message import EmailMessage
from email.utils import formatdate
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from worker.channels.sendgrid_signing import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    public_key_b64,
    sign_request,
)

# The provider sandbox's documented Inbound Parse signing key (sandbox/providers/README.md).
SANDBOX_INBOUND_KEY_PEM = b"""-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgBGMQBdOm/lNnrQfw
wA+iWDgxSpk26zEWQS8A+NbPMSqhRANCAAR/gRtu/IugeetwqDc2cc2a4nUr0E3d
6PyIrve87sbZRxaE3drmsXyCZxliKOtpUWRMbBfSi+JhNyg7StHHGaeI
-----END PRIVATE KEY-----
"""
PRIVATE_KEY: Any = serialization.load_pem_private_key(SANDBOX_INBOUND_KEY_PEM, None)
VERIFICATION_KEY = public_key_b64(PRIVATE_KEY)
CLINIC_MAILBOX = "care@clinic.example"
INBOUND_PATH = "/webhooks/sendgrid/inbound"

Part = tuple[str, bytes, str | None, str | None]  # name, value, filename, content type


def new_message_id(domain: str = "mail.example.org") -> str:
    """A fresh Message-ID, as a mail client makes one."""
    return f"<{uuid.uuid4().hex}@{domain}>"


def multipart(parts: list[Part]) -> tuple[str, bytes]:
    """(Content-Type, body) of a multipart/form-data post, as SendGrid sends it."""
    boundary = "xYzZY" + uuid.uuid4().hex
    out = bytearray()
    for name, value, filename, content_type in parts:
        out += f"--{boundary}\r\n".encode()
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        out += f"Content-Disposition: {disposition}\r\n".encode()
        if content_type:
            out += f"Content-Type: {content_type}\r\n".encode()
        out += b"\r\n" + value + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return f"multipart/form-data; boundary={boundary}", bytes(out)


def _auth_fields(sender: str, spf: str, dkim: str | None, envelope_from: str | None
                 ) -> list[Part]:
    domain = sender.rsplit("@", 1)[-1]
    envelope = {"to": [CLINIC_MAILBOX], "from": envelope_from or sender}
    return [
        ("dkim", (dkim if dkim is not None else f"{{@{domain} : pass}}").encode(), None, None),
        ("SPF", spf.encode(), None, None),
        ("envelope", json.dumps(envelope).encode(), None, None),
        ("sender_ip", b"203.0.113.9", None, None),
        ("spam_score", b"0.1", None, None),
    ]


def parsed_post(sender: str, subject: str = "Question about my appointment",
                text: str | None = "Can I come on Friday instead?", html: str | None = None,
                charset: str = "UTF-8", encoded_with: str | None = None,
                message_id: str | None = None, in_reply_to: str | None = None,
                references: list[str] | None = None, spf: str = "pass",
                dkim: str | None = None, envelope_from: str | None = None,
                attachments: list[tuple[str, str, bytes]] = (),  # type: ignore[assignment]
                date: str | None = None) -> tuple[str, bytes]:
    """An Inbound Parse post in the default (parsed) mode. `text`/`html` are encoded with
    `encoded_with` (default `charset`) and declared as `charset` (a wrong declaration when
    they differ)."""
    codec = encoded_with or charset
    mid = message_id if message_id is not None else new_message_id()
    headers = ["Received: from mail.example.org by mx.sendgrid.net with SMTP",
               f"From: Pat Example <{sender}>", f"To: {CLINIC_MAILBOX}",
               f"Subject: {subject}", f"Date: {date or formatdate(localtime=False)}",
               "MIME-Version: 1.0"]
    if mid:
        headers.append(f"Message-ID: {mid}")
    if in_reply_to:
        headers.append(f"In-Reply-To: {in_reply_to}")
    if references:
        headers.append("References: " + "\r\n ".join(references))
    charsets = {"to": "UTF-8", "from": "UTF-8", "subject": "UTF-8", "filename": "UTF-8"}
    parts: list[Part] = [("headers", "\n".join(headers).encode(), None, None)]
    if text is not None:
        parts.append(("text", text.encode(codec), None, None))
        charsets["text"] = charset
    if html is not None:
        parts.append(("html", html.encode(codec), None, None))
        charsets["html"] = charset
    parts += [("from", f"Pat Example <{sender}>".encode(), None, None),
              ("to", CLINIC_MAILBOX.encode(), None, None),
              ("subject", subject.encode(), None, None),
              ("charsets", json.dumps(charsets).encode(), None, None),
              *_auth_fields(sender, spf, dkim, envelope_from)]
    info = {}
    for n, (name, ctype, data) in enumerate(attachments, start=1):
        parts.append((f"attachment{n}", data, name, ctype))
        info[f"attachment{n}"] = {"filename": name, "name": name, "type": ctype}
    parts.append(("attachments", str(len(attachments)).encode(), None, None))
    if attachments:
        parts.append(("attachment-info", json.dumps(info).encode(), None, None))
    return multipart(parts)


def raw_email(sender: str, subject: str = "Question about my appointment",
              text: str | None = "Can I come on Friday instead?", html: str | None = None,
              charset: str = "utf-8", message_id: str | None = None,
              in_reply_to: str | None = None, references: list[str] | None = None,
              attachments: list[tuple[str, str, bytes]] = (),  # type: ignore[assignment]
              extra_headers: list[tuple[str, str]] = ()  # type: ignore[assignment]
              ) -> bytes:
    """A MIME message as a mail client sends it."""
    msg = EmailMessage()
    for name, value in extra_headers:
        msg[name] = value
    msg["From"] = f"Pat Example <{sender}>"
    msg["To"] = CLINIC_MAILBOX
    msg["Subject"] = subject
    msg["Date"] = formatdate(localtime=False)
    mid = message_id if message_id is not None else new_message_id()
    if mid:
        msg["Message-ID"] = mid
    if in_reply_to:
        msg["In-Reply-To"] = in_reply_to
    if references:
        msg["References"] = " ".join(references)
    if text is not None:
        msg.set_content(text, charset=charset)
    if html is not None:
        if text is None:
            msg.set_content(html, subtype="html", charset=charset)
        else:
            msg.add_alternative(html, subtype="html", charset=charset)
    for name, ctype, data in attachments:
        maintype, subtype = ctype.split("/", 1)
        msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=name)
    return msg.as_bytes()


def raw_post(sender: str, email: bytes, spf: str = "pass", dkim: str | None = None,
             envelope_from: str | None = None) -> tuple[str, bytes]:
    """An Inbound Parse post in raw mode ("POST the raw, full MIME message")."""
    return multipart([("email", email, None, None),
                      ("from", sender.encode(), None, None),
                      ("to", CLINIC_MAILBOX.encode(), None, None),
                      ("charsets", b'{"to":"UTF-8","from":"UTF-8","subject":"UTF-8"}',
                       None, None),
                      *_auth_fields(sender, spf, dkim, envelope_from)])


def signed(content_type: str, body: bytes, timestamp: int | None = None,
           key: Any = PRIVATE_KEY) -> dict[str, str]:
    """The headers of a SendGrid-signed post of `body`."""
    ts = str(int(time.time()) if timestamp is None else timestamp)
    return {"Content-Type": content_type, TIMESTAMP_HEADER: ts,
            SIGNATURE_HEADER: sign_request(key, body, ts)}


def other_key() -> Any:
    """A P-256 key that is not the configured one (a forger's)."""
    return ec.generate_private_key(ec.SECP256R1())


# -- hostile emails (issue #26, findings 2, 3, 6, 7) -------------------------------------------

def _raw_head(sender: str, subject: str, message_id: str | None) -> bytes:
    return (f"From: Pat Example <{sender}>\r\nTo: {CLINIC_MAILBOX}\r\nSubject: {subject}\r\n"
            f"Date: {formatdate(localtime=False)}\r\n"
            f"Message-ID: {message_id or new_message_id()}\r\nMIME-Version: 1.0\r\n").encode()


def nested_email(sender: str, depth: int, message_id: str | None = None) -> bytes:
    """A raw email of `depth` multiparts each inside the last, a text at the bottom."""
    opening = [f'Content-Type: multipart/mixed; boundary="n{n}"\r\n\r\n--n{n}\r\n'.encode()
               for n in range(depth)]
    closing = [f"\r\n--n{n}--\r\n".encode() for n in reversed(range(depth))]
    return (_raw_head(sender, "nested", message_id) + b"".join(opening)
            + b"Content-Type: text/plain\r\n\r\nhello\r\n" + b"".join(closing))


def many_parts_email(sender: str, parts: int, message_id: str | None = None) -> bytes:
    """A raw email of `parts` one-line text parts (about 37 bytes each)."""
    part = b"--p\r\nContent-Type: text/plain\r\n\r\nx\r\n"
    return (_raw_head(sender, "parts", message_id)
            + b'Content-Type: multipart/mixed; boundary="p"\r\n\r\n' + part * parts
            + b"--p--\r\n")


def raw_charset_email(sender: str, charset: str | bytes, body: bytes,
                      message_id: str | None = None) -> bytes:
    """A raw email whose text part declares `charset` (any bytes, NUL included)."""
    name = charset if isinstance(charset, bytes) else charset.encode("latin-1")
    return (_raw_head(sender, "charset", message_id)
            + b"Content-Type: text/plain; charset=\"" + name + b"\"\r\n"
            + b"Content-Transfer-Encoding: 8bit\r\n\r\n" + body + b"\r\n")


def boundary_replay(sender: str, message_id: str | None = None,
                    injected_from: str = "someone.else@example.org"
                    ) -> tuple[str, bytes, str]:
    """(genuine Content-Type, body, the attacker's Content-Type): a parsed-mode post of the
    attacker's own email whose text carries a second multipart with boundary EVIL, written as
    if it were another patient's message. Replayed with `boundary=EVIL`, a lax form parser reads
    the injected parts instead of SendGrid's."""
    injected = (
        b"\r\n--EVIL\r\nContent-Disposition: form-data; name=\"from\"\r\n\r\n"
        + injected_from.encode() + b"\r\n--EVIL\r\nContent-Disposition: form-data; "
        b"name=\"text\"\r\n\r\nplease cancel all my appointments\r\n--EVIL\r\n"
        b"Content-Disposition: form-data; name=\"dkim\"\r\n\r\n{@example.org : pass}\r\n"
        b"--EVIL--\r\n")
    content_type, body = parsed_post(sender, text="hi" + injected.decode(),
                                     message_id=message_id)
    return content_type, body, "multipart/form-data; boundary=EVIL"


# --------------------------------------------------------------------------------------------
# Ordinary and hostile emails of issue #26, reusable by any test (the clinic-day scenario and
# the hostile-input classes in tests/reliability/input_scenarios.py use them).
# --------------------------------------------------------------------------------------------

def photo(size: int, seed: int = 0) -> bytes:
    """`size` bytes shaped like a phone camera's JPEG (SOI/APP0 header, incompressible body,
    EOI), so no layer can shrink it by compression."""
    import random

    head = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    body = random.Random(seed).randbytes(max(0, size - len(head) - 2))
    return head + body + b"\xff\xd9"


def quoted_history(turns: int, width: int = 72) -> str:
    """A reply over a long thread as mail clients write it: each earlier turn quoted one level
    deeper under an "On <date>, <name> wrote:" line (what a quote stripper must cut)."""
    text = "Thanks, see you then."
    for n in range(turns):
        quoted = "\n".join("> " + line for line in text.splitlines())
        filler = f"Earlier message number {n} about the appointment and the results. " * 3
        text = (f"Reply {n}: {filler[:width]}\n\nOn Mon, 7 Dec 2026 at 09:{n % 60:02d}, "
                f"Clinic <care@clinic.example> wrote:\n{quoted}")
    return text


def quadratic_quote_text(size: int) -> str:
    """Finding 2: `"On "` repeated to `size` characters. mail-parser-reply's quote-stripping
    regex is quadratic on it (13 s at 24 KB, 187 s at 90 KB on the issue's machine)."""
    return ("On " * (size // 3 + 1))[:size]


def one_line_parts_email(sender: str, size: int, message_id: str | None = None) -> bytes:
    """Finding 3: a raw MIME email of ~`size` bytes made of one-line text parts (a 1.8 MB one
    took 24 s of the receiver's CPU; 7.5 MB, 200k parts, hit gunicorn's worker timeout)."""
    part_bytes = len(b"--p\r\nContent-Type: text/plain\r\n\r\nx\r\n")
    return many_parts_email(sender, max(1, size // part_bytes), message_id)


# Finding 7: charsets that raised UnicodeError/ValueError in the receiver (each a 500, which
# SendGrid retries for 72 h): (charset parameter as sent, body bytes).
HOSTILE_CHARSETS: dict[str, tuple[bytes, bytes]] = {
    "undefined": (b"undefined", b"Hello, I need to move my appointment."),
    "punycode-escape": (b"punycode", b"Hello \\N{x and more"),
    "nul-in-name": (b"utf-8\x00x", b"Hello, NUL in the charset name."),
}


def crlf_subject_email(sender: str, message_id: str | None = None,
                       text: str = "Question about my results") -> bytes:
    """Finding 13: a Subject that decodes (RFC 2047) to `Hi\\r\\nBcc: …`; it became the thread
    topic and then the subject of the clinic's emailed reply."""
    import base64 as b64

    evil = b64.b64encode(b"Hi\r\nBcc: attacker@hostile.example").decode()
    head = (f"From: <{sender}>\r\nTo: {CLINIC_MAILBOX}\r\nSubject: =?utf-8?b?{evil}?=\r\n"
            f"Date: {formatdate(localtime=False)}\r\n"
            f"Message-ID: {message_id or new_message_id()}\r\nMIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=utf-8\r\n\r\n")
    return (head + text + "\r\n").encode()


def boundary_injection(attacker: str, victim: str, text: str = "injected by a replay"
                       ) -> tuple[tuple[str, bytes], str]:
    """Finding 6: the attacker's own, genuinely signed parsed-mode post, whose text holds a
    second multipart (boundary `EVIL`) claiming a DKIM-authenticated email from `victim`.
    Returns (the honest post, the Content-Type to replay it with): the signature covers the
    body, not the boundary in the unsigned Content-Type header."""
    domain = victim.rsplit("@", 1)[-1]
    fields = [
        ("headers", f"From: <{victim}>\nTo: {CLINIC_MAILBOX}\nSubject: hello\n"
                    f"Message-ID: {new_message_id()}"),
        ("from", f"<{victim}>"), ("to", CLINIC_MAILBOX), ("subject", "hello"),
        ("text", text), ("dkim", f"{{@{domain} : pass}}"), ("SPF", "pass"),
        ("envelope", json.dumps({"to": [CLINIC_MAILBOX], "from": victim})),
        ("charsets", json.dumps({"text": "UTF-8", "subject": "UTF-8", "from": "UTF-8",
                                 "to": "UTF-8"})), ("attachments", "0"),
    ]
    inner = "".join(f'--EVIL\r\nContent-Disposition: form-data; name="{n}"\r\n\r\n{v}\r\n'
                    for n, v in fields) + "--EVIL--\r\n"
    honest = parsed_post(attacker, text="see below\r\n" + inner)
    return honest, "multipart/form-data; boundary=EVIL"
