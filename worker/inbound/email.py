"""Inbound email: judge the sender, store the attachments once, then the common pipeline."""

from __future__ import annotations

import base64
import functools
import hashlib
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from worker.channels.sendgrid import CHANNEL, MEDIUM_CODE
from worker.channels.sendgrid_inbound import (
    ORIGINAL_TITLE,
    EmailBody,
    EmailForm,
    InvalidEmail,
    body_of,
    message_key,
    read_form,
    read_record,
    read_sender,
    sender_authentication,
    to_inbound,
)
from worker.crypto import Unsealable
from worker.errors import PermanentError
from worker.inbound.pipeline import InboundOutcome, SeenMessages, deliver_inbound
from worker.inbound.threads import ThreadContext, sender_search
from worker.messages import Attachment, InboundMessage
from worker.stores.email_posts import DONE, EmailPosts

File = tuple[str, str, bytes]  # (title, content type, bytes) of a file to store


class Binaries(Protocol):
    """Attachment key → Binary id (worker.stores.binaries.StoredBinaries)."""

    def get(self, key: str) -> str | None: ...
    def put(self, key: str, binary_id: str) -> None: ...


def stored_email(posts: EmailPosts, ref: str, content_type: str, max_bytes: int,
                 admit: Callable[[Mapping[str, Any]], None]) -> dict[str, Any] | None:
    """The email record of the post the receiver stored under `ref` (see `admitted_email`), or
    None when an earlier delivery of the task wrote it already. A post that is gone or cannot
    be opened or read is a PermanentError with the reason (never the text)."""
    try:
        post = posts.get(ref)
    except Unsealable as exc:
        raise PermanentError("undecryptable", str(exc)) from None
    if post == DONE:
        return None
    if post is None:
        raise PermanentError("email-post-missing", "the post's bytes are gone (expired)")
    return admitted_email(content_type, post, max_bytes, admit)


def admitted_email(content_type: str, post: bytes, max_bytes: int,
                   admit: Callable[[Mapping[str, Any]], None]) -> dict[str, Any]:
    """The email record of a post, read in two stages: the sender's fields from cheap, bounded
    reads, given to `admit` (which raises PermanentError for an unauthenticated or unknown
    sender, see `admit_sender`), then, only for a sender it let through, the whole email
    (header and MIME parses, bodies: seconds for a big one). A stranger's email costs
    milliseconds and a search, whatever it holds."""
    try:
        form = read_form(content_type, post)
        sender = read_sender(form)
    except InvalidEmail as exc:
        raise PermanentError(exc.reason, str(exc)) from None
    admit(sender)
    return _record(form, max_bytes)


def _record(form: EmailForm, max_bytes: int) -> dict[str, Any]:
    try:
        return read_record(form, max_bytes)
    except InvalidEmail as exc:
        raise PermanentError(exc.reason, str(exc)) from None


def admit_sender(sender: Mapping[str, Any], ctx: ThreadContext, policy: str,
                 require_sender_auth: bool) -> None:
    """Refuse (PermanentError) an email whose From domain is not authenticated (anyone can put
    a patient's address in From) or, unless unknown senders create patients, whose sender is no
    Patient: before anything of the body is read or written. Needs only `sender_fields`."""
    if require_sender_auth:
        _require_authenticated(sender)
    if policy != "create-patient":
        _known_sender(ctx, str(sender.get("from") or "").strip())


def _require_authenticated(sender: Mapping[str, Any]) -> None:
    if sender_authentication(sender) is None:
        raise PermanentError("unauthenticated-sender", "the From domain passed neither an "
                             "aligned DKIM signature nor SPF with an aligned envelope sender")


def deliver_email(record: Mapping[str, Any], received_at: str, ctx: ThreadContext,
                  strategy: str, policy: str, require_sender_auth: bool, seen: SeenMessages,
                  binaries: Binaries, sender_admitted: bool = False) -> InboundOutcome:
    """Write one inbound email (an email record, see worker.channels.sendgrid_inbound) once.

    The sender is judged (`admit_sender`) before anything is written, unless `sender_admitted`
    says it was, before the email was read (`admitted_email`).
    """
    if not sender_admitted and require_sender_auth:
        _require_authenticated(record)
    key = message_key(record)
    if seen.seen(key):
        return InboundOutcome(None, None, "skipped")
    if not sender_admitted:
        # Before any work on the body (the quote stripper, stored files): a stranger's email
        # costs one search.
        admit_sender(record, ctx, policy, require_sender_auth=False)
    msg = email_message(record, received_at,
                        functools.partial(_store_files, ctx, key, binaries))
    return deliver_inbound(msg, ctx, strategy, policy, seen)


def _store_files(ctx: ThreadContext, key: str, binaries: Binaries, files: list[File]
                 ) -> tuple[Attachment, ...]:
    """Each file of the email as a Binary, once (a retried delivery finds the ones it wrote)."""
    stored: list[Attachment] = []
    if not files:
        return ()
    with ctx.lock("email-binaries:" + hashlib.sha256(key.encode()).hexdigest()[:24]) as held:
        for n, (title, content_type, data) in enumerate(files):
            item_key = f"{key}\x1f{n}\x1f{hashlib.sha256(data).hexdigest()}"
            binary_id = binaries.get(item_key)
            if binary_id is None:
                held.confirm()  # still ours: no other worker is storing these files
                # Raw, not base64 in a resource: Medplum refuses a JSON body or a
                # base64Binary over 1 MiB, which would dead-letter the whole email.
                binary_id = ctx.fhir.create_binary(data, content_type)
                binaries.put(item_key, binary_id)
            stored.append(Attachment(f"Binary/{binary_id}", content_type, title, len(data)))
    return tuple(stored)


def _known_sender(ctx: ThreadContext, sender: str) -> None:
    """Refuse an unknown or ambiguous sender before reading the body or storing their files: a
    Binary written for an email that is then dead-lettered would sit in the EHR, attached to
    nothing."""
    probe = InboundMessage(channel=CHANNEL, medium_code=MEDIUM_CODE, provider_message_id="",
                           sender=sender, clinic_address="", body="", received_at="")
    found = ctx.fhir.search("Patient", [sender_search(probe), ("_count", "2"),
                                        ("_elements", "id")])
    matches = [e for e in found.get("entry") or []
               if (e.get("search") or {}).get("mode", "match") == "match"]
    if not matches:
        raise PermanentError("unknown-sender", "no Patient has the sender's email address")
    if len(matches) > 1:
        raise PermanentError("ambiguous-sender", "several Patients have the sender's email "
                             "address")


def email_message(record: Mapping[str, Any], received_at: str,
                  store: Callable[[list[File]], tuple[Attachment, ...]],
                  read_body: Callable[[Mapping[str, Any]], EmailBody] = body_of
                  ) -> InboundMessage:
    """The message of an email record, its files stored by `store`. The body is read once
    (`read_body`): it is the costly step (the quote stripper, HTML to text), and both the text
    shown and the kept original come from it."""
    body = read_body(record)
    return to_inbound(record, received_at, store(email_files(record, body)), body)


def email_files(record: Mapping[str, Any], body: EmailBody) -> list[File]:
    """The attachments kept, then the full original text when the message shows less of it
    (quoted history stripped, an HTML body shown as text, or a text too long for one FHIR
    string cut). Pure."""
    out = []
    for a in record.get("attachments") or []:
        try:
            data = base64.b64decode(str(a.get("data") or ""), validate=True)
        except ValueError as exc:
            raise PermanentError("invalid-payload", "an attachment is not base64") from exc
        out.append((str(a.get("name") or "attachment"),
                    str(a.get("content_type") or "application/octet-stream"), data))
    if body.original:
        out.append((ORIGINAL_TITLE[body.original_type], body.original_type + "; charset=utf-8",
                    body.original.encode("utf-8")))
    return out
