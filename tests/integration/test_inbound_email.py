"""Inbound email end to end: a signed Inbound Parse post → Redis → real Celery worker → FHIR."""

from __future__ import annotations

import base64
import concurrent.futures as cf
import hashlib
import json
import re
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Service, Services
from tests.email_payloads import (
    CLINIC_MAILBOX,
    INBOUND_PATH,
    VERIFICATION_KEY,
    new_message_id,
    other_key,
    parsed_post,
    raw_email,
    raw_post,
    signed,
)
from tests.support import ProviderSandbox, Sandbox, eventually, our_logs, worker_metrics
from worker.channels.sendgrid import EMAIL_INBOUND_MESSAGE_ID_SYSTEM, EMAIL_MESSAGE_ID_SYSTEM
from worker.fhir.query import token
from worker.ops import devstack

PATIENT = "pat.inbound@example.org"
SECRET_BODY = "my inhaler ran out qv9k"
KEYED = {"SENDGRID_INBOUND_VERIFICATION_KEY": VERIFICATION_KEY}
PDF = b"%PDF-1.4\n" + bytes(range(256)) * 64


def email_patient(sandbox: Sandbox, address: str = PATIENT) -> dict[str, Any]:
    """A Patient reachable at `address`."""
    return sandbox.fhir.create({"resourceType": "Patient", "name": [{"family": "Mail"}],
                                "telecom": [{"system": "email", "value": address}]}).resource


def post(svc: Service, content_type: str, body: bytes, headers: dict[str, str] | None = None
         ) -> Any:
    """POST an Inbound Parse request (signed unless `headers` are given)."""
    client = svc.app().test_client()
    return client.post(INBOUND_PATH, data=body,
                       headers=headers if headers is not None else signed(content_type, body))


def deliver(svc: Service, email: tuple[str, bytes]) -> None:
    """Post a signed email and check it was accepted."""
    resp = post(svc, *email)
    assert resp.status_code == 200, resp.get_data(as_text=True)


def messages(sandbox: Sandbox, key: str) -> list[dict[str, Any]]:
    """Child Communications written for the email with this key (Message-ID)."""
    return sandbox.all("Communication",
                       identifier=token(EMAIL_INBOUND_MESSAGE_ID_SYSTEM, key))


def landed(sandbox: Sandbox, key: str) -> dict[str, Any]:
    """Wait for the email's Communication; exactly one must exist."""
    found = eventually(lambda: messages(sandbox, key), what=f"email {key}")
    assert len(found) == 1, found
    return found[0]


def header_of(sandbox: Sandbox, message: dict[str, Any]) -> dict[str, Any]:
    """The thread header a message is part of."""
    return sandbox.fhir.read("Communication",
                             message["partOf"][0]["reference"].split("/")[1]).resource


def processed(svc: Service) -> int:
    """How many emails this configuration's worker has finished (its log lines)."""
    assert svc.worker is not None
    return svc.worker.output().count("inbound email: ")


def queued(svc: Service) -> int:
    """Messages waiting in the inbound queue plus accepted inbox entries."""
    return int(svc.redis.llen("inbound")) + int(svc.redis.hlen("switchboard:inbox:entries"))


def scoped(sender: str, message_id: str) -> str:
    """A Message-ID scoped by its sender, as inbound keys and conversation ids are."""
    return f"sender:{hashlib.sha256(sender.lower().encode()).hexdigest()[:16]}:{message_id}"


def binary_bytes(sandbox: Sandbox, url: str, content_type: str) -> bytes:
    """The bytes of a Binary (`Binary/<id>`), read as Medplum serves them: its own type in
    Accept."""
    resp = httpx.get(f"{sandbox.settings.fhir_base_url.rstrip('/')}/{url}", timeout=30,
                     headers={"Authorization": f"Bearer {sandbox.token()}",
                              "Accept": content_type})
    assert resp.status_code == 200, resp.text[:300]
    return resp.content


BODY_CASES = [
    ("parsed plain", lambda mid: parsed_post(PATIENT, text="Can I come on Friday?",
                                             message_id=mid), "Can I come on Friday?"),
    ("raw plain", lambda mid: raw_post(PATIENT, raw_email(PATIENT, text="Running late today",
                                                          message_id=mid)),
     "Running late today"),
    ("parsed html only", lambda mid: parsed_post(
        PATIENT, text=None, html="<p>Thank you for <i>everything</i></p>", message_id=mid),
     "Thank you for everything"),
    ("raw html only", lambda mid: raw_post(PATIENT, raw_email(
        PATIENT, text=None, html="<p>See you <b>soon</b></p>", message_id=mid)),
     "See you soon"),
    ("parsed ISO-8859-1", lambda mid: parsed_post(PATIENT, text="Grüße aus Köln",
                                                  charset="ISO-8859-1", message_id=mid),
     "Grüße aus Köln"),
    ("raw Shift_JIS", lambda mid: raw_post(PATIENT, raw_email(
        PATIENT, text="予約を変更したいです。", charset="shift_jis", message_id=mid)),
     "予約を変更したいです。"),
    ("parsed wrong declared charset", lambda mid: parsed_post(
        PATIENT, text="予約を変更したいです。お願いします。", charset="UTF-8",
        encoded_with="shift_jis", message_id=mid), "予約を変更したいです。お願いします。"),
]


def test_emails_in_both_modes_and_charsets_land_as_text(services: Services, sandbox: Sandbox
                                                        ) -> None:
    svc = services.get(SENDGRID_INBOUND_VERIFICATION_KEY=VERIFICATION_KEY)
    patient = email_patient(sandbox)
    ids = {case: new_message_id() for case, _, _ in BODY_CASES}
    for case, build, _ in BODY_CASES:
        deliver(svc, build(ids[case]))
    for case, _, expected in BODY_CASES:
        msg = landed(sandbox, ids[case])
        assert msg["payload"][0] == {"contentString": expected}, case
        assert msg["sender"]["reference"] == f"Patient/{patient['id']}"
        assert msg["medium"][0]["coding"][0]["code"] == "EMAILWRIT"
        assert msg["recipient"] == [{"identifier": {"system": "urn:switchboard:clinic-number",
                                                    "value": CLINIC_MAILBOX},
                                     "display": "Clinic mailbox"}]
        header = header_of(sandbox, msg)
        assert header["topic"]["text"] == "Question about my appointment"
        assert header["identifier"][0] == {"system": "urn:switchboard:email-conversation",
                                           "value": scoped(PATIENT, ids[case])}
    assert svc.dead_letters.count() == 0


def test_attachment_becomes_a_binary_once_and_the_quoted_original_is_kept(
        services: Services, sandbox: Sandbox) -> None:
    svc = services.get(SENDGRID_INBOUND_VERIFICATION_KEY=VERIFICATION_KEY)
    email_patient(sandbox)
    mid = new_message_id()
    text = ("Results attached.\n\nOn Mon, 30 Nov 2026 at 09:00, Clinic <care@clinic.example> "
            "wrote:\n> Please send your results.\n")
    email = parsed_post(PATIENT, subject="Re: Lab results", text=text, message_id=mid,
                        attachments=[("results.pdf", "application/pdf", PDF)])
    before = processed(svc)
    deliver(svc, email)
    msg = landed(sandbox, mid)
    deliver(svc, email)  # SendGrid posts it again: no second Binary, no second message
    assert msg["payload"][0] == {"contentString": "Results attached."}
    pdf, original = (p["contentAttachment"] for p in msg["payload"][1:])
    assert (pdf["contentType"], pdf["title"], pdf["size"]) == ("application/pdf", "results.pdf",
                                                               len(PDF))
    assert binary_bytes(sandbox, pdf["url"], "application/pdf") == PDF
    assert original["title"] == "original-message.txt"
    assert binary_bytes(sandbox, original["url"], "text/plain").decode() == text
    assert header_of(sandbox, msg)["topic"]["text"] == "Lab results"
    eventually(lambda: processed(svc) >= before + 2 or None,
               what="the second delivery processed")
    assert len(messages(sandbox, mid)) == 1
    assert svc.dead_letters.count() == 0


def test_an_oversized_email_lands_with_its_text_and_a_note(services: Services,
                                                           sandbox: Sandbox) -> None:
    svc = services.get(SENDGRID_INBOUND_VERIFICATION_KEY=VERIFICATION_KEY)
    email_patient(sandbox)
    mid = new_message_id()
    big = bytes(range(256)) * (41 * 1024)  # 10.25 MB, over the default EMAIL_MAX_BYTES
    deliver(svc, raw_post(PATIENT, raw_email(PATIENT, text="Scan attached", message_id=mid,
                                             attachments=[("scan.tiff", "image/tiff", big)])))
    msg = landed(sandbox, mid)
    assert msg["payload"] == [{"contentString": "Scan attached"}]
    assert "scan.tiff" in msg["note"][0]["text"] and str(len(big)) in msg["note"][0]["text"]
    app = svc.app()

    def counted() -> str | None:
        # Wherever the email is parsed (receiver or worker), its process's page counts it.
        assert svc.worker is not None
        text = (app.test_client().get("/metrics").get_data(as_text=True)
                + worker_metrics(svc.worker.metrics_port))
        return text if re.search(r"switchboard_email_attachments_omitted_total [1-9]",
                                 text) else None

    eventually(counted, what="the omitted attachment counted")


def test_a_2mb_photo_and_a_3mb_text_land_whole(services: Services, sandbox: Sandbox) -> None:
    """Issue 26 finding 4: both are under EMAIL_MAX_BYTES, and Medplum refuses a JSON body or a
    base64Binary over 1 MiB: the photo goes up as a raw Binary, the text is cut below the limit
    with the whole kept as original-message.txt. (Before: a fhir-400 dead letter.)"""
    svc = services.get(SENDGRID_INBOUND_VERIFICATION_KEY=VERIFICATION_KEY)
    email_patient(sandbox)
    photo = bytes((i * 7919) % 256 for i in range(2 * 1024 * 1024))
    text = "Day 1: the rash spread to my arm, and it itches at night.\n" * 52_000  # 3 MB
    mid = new_message_id()
    deliver(svc, raw_post(PATIENT, raw_email(PATIENT, subject="Rash diary", text=text,
                                             message_id=mid,
                                             attachments=[("rash.jpg", "image/jpeg", photo)])))
    msg = eventually(lambda: messages(sandbox, mid) or svc.dead_letters.list() or None,
                     timeout=90, what="the large email written")
    assert svc.dead_letters.count() == 0, [(e.reason, e.detail) for e in svc.dead_letters.list()]
    (msg,) = msg
    shown = msg["payload"][0]["contentString"]
    assert text.startswith(shown) and 100_000 < len(shown) < len(text)
    jpg, original = (p["contentAttachment"] for p in msg["payload"][1:])
    assert (jpg["title"], jpg["contentType"], jpg["size"]) == ("rash.jpg", "image/jpeg",
                                                               len(photo))
    assert binary_bytes(sandbox, jpg["url"], "image/jpeg") == photo
    assert original["title"] == "original-message.txt"
    assert binary_bytes(sandbox, original["url"], "text/plain").decode() == text
    assert "original-message.txt" in msg["note"][0]["text"]


def test_a_json_attachment_is_stored_as_its_bytes(services: Services, sandbox: Sandbox) -> None:
    """A raw upload typed as JSON would be read by the server as a resource of the sender's
    choosing: it is stored as plain bytes, byte-identical."""
    svc = services.get(SENDGRID_INBOUND_VERIFICATION_KEY=VERIFICATION_KEY)
    email_patient(sandbox)
    forged = json.dumps({"resourceType": "Binary", "contentType": "text/html",
                         "data": base64.b64encode(b"<script>x</script>").decode()}).encode()
    mid = new_message_id()
    deliver(svc, parsed_post(PATIENT, text="My data export", message_id=mid,
                             attachments=[("export.json", "application/json", forged)]))
    (item,) = (p["contentAttachment"] for p in landed(sandbox, mid)["payload"][1:])
    assert item["contentType"] == "application/json"
    assert binary_bytes(sandbox, item["url"], "application/octet-stream") == forged


def test_references_to_another_patients_conversation_open_a_new_thread(
        services: Services, sandbox: Sandbox) -> None:
    """Issue 26 finding 5: patient A's authenticated email naming the root of B's conversation
    (a relative's reply-all) lands in A's own thread, never in B's."""
    svc = services.get(SENDGRID_INBOUND_VERIFICATION_KEY=VERIFICATION_KEY)
    b = email_patient(sandbox)
    a = email_patient(sandbox, "relative@example.net")
    root = new_message_id()
    deliver(svc, parsed_post(PATIENT, subject="My results", text="B writes", message_id=root))
    b_thread = landed(sandbox, root)["partOf"]
    mid = new_message_id("example.net")
    deliver(svc, parsed_post("relative@example.net", subject="Re: My results",
                             text="A writes", message_id=mid, in_reply_to=root,
                             references=[root]))
    msg = landed(sandbox, mid)
    assert msg["sender"]["reference"] == f"Patient/{a['id']}"
    assert msg["partOf"] != b_thread
    assert header_of(sandbox, msg)["subject"]["reference"] == f"Patient/{a['id']}"
    b_header = header_of(sandbox, landed(sandbox, root))
    assert b_header["subject"]["reference"] == f"Patient/{b['id']}"
    assert [m["id"] for m in sandbox.all("Communication", **{"part-of": b_thread[0][
        "reference"]})] == [landed(sandbox, root)["id"]]
    # B's own answer in that conversation still joins B's thread.
    again = new_message_id()
    deliver(svc, parsed_post(PATIENT, text="B again", message_id=again, in_reply_to=root,
                             references=[root]))
    assert landed(sandbox, again)["partOf"] == b_thread
    assert svc.dead_letters.count() == 0


def test_the_same_message_id_from_two_senders_is_two_emails(services: Services,
                                                            sandbox: Sandbox) -> None:
    """Issue 26 finding 9: a Message-ID reused by another sender's mailer is not a repeat."""
    svc = services.get(SENDGRID_INBOUND_VERIFICATION_KEY=VERIFICATION_KEY)
    email_patient(sandbox)
    email_patient(sandbox, "other.patient@example.net")
    mid = new_message_id("reused.example")
    before = processed(svc)
    deliver(svc, parsed_post(PATIENT, text="first sender", message_id=mid))
    landed(sandbox, mid)
    deliver(svc, parsed_post("other.patient@example.net", text="second sender", message_id=mid))
    eventually(lambda: processed(svc) >= before + 2 or None, what="both emails processed")
    texts = sorted(m["payload"][0]["contentString"] for m in messages(sandbox, mid))
    assert texts == ["first sender", "second sender"]
    deliver(svc, parsed_post("other.patient@example.net", text="second sender",
                             message_id=mid))  # SendGrid's retry of it is still one
    eventually(lambda: processed(svc) >= before + 3 or None, what="the retry processed")
    assert len(messages(sandbox, mid)) == 2
    assert svc.dead_letters.count() == 0


def test_a_line_break_in_a_subject_never_reaches_sendgrid(
        services: Services, sandbox: Sandbox, providers: ProviderSandbox) -> None:
    """Issue 26 finding 13: a decoded subject (stored as the topic) or a topic typed in the EHR
    with CR/LF goes out on one line."""
    from tests.conftest import outbound_env
    from tests.integration.test_email_events import reply, send_email

    providers.reset()
    svc = services.get(**outbound_env(providers,
                                      SENDGRID_INBOUND_VERIFICATION_KEY=VERIFICATION_KEY))
    patient = email_patient(sandbox)
    mid = new_message_id()
    email = raw_email(PATIENT, text="Hello", message_id=mid).replace(
        b"Subject: Question about my appointment",
        b"Subject: =?utf-8?q?Hi=0D=0ABcc=3A_all=40example=2Eorg?=")
    deliver(svc, raw_post(PATIENT, email))
    header = header_of(sandbox, landed(sandbox, mid))
    assert header["topic"]["text"] == "Hi Bcc: all@example.org"
    send_email(svc, reply(sandbox, header, patient, "Noted"))
    header["topic"]["text"] = "Results\r\nBcc: all@example.org\r\n\r\nInjected body"
    sandbox.fhir.update(header)
    send_email(svc, reply(sandbox, header, patient, "Noted again"))
    subjects = [m["json"]["subject"] for m in providers.requests("sendgrid")]
    assert subjects == ["Re: Hi Bcc: all@example.org",
                        "Re: Results Bcc: all@example.org Injected body"]


def test_a_reply_to_an_email_we_sent_joins_that_thread_through_a_long_chain(
        services: Services, sandbox: Sandbox) -> None:
    svc = services.get(SENDGRID_INBOUND_VERIFICATION_KEY=VERIFICATION_KEY)
    patient = email_patient(sandbox)
    # The thread an outbound email went out in, with its Message-ID recorded as the outbound
    # pipeline records it.
    header = sandbox.fhir.create({
        "resourceType": "Communication", "status": "in-progress",
        "subject": {"reference": f"Patient/{patient['id']}"}, "topic": {"text": "Results"}
    }).resource
    ours = "<comm-1.abc123@clinic.example>"
    sandbox.fhir.create({
        "resourceType": "Communication", "status": "completed",
        "partOf": [{"reference": f"Communication/{header['id']}"}],
        "identifier": [{"system": EMAIL_MESSAGE_ID_SYSTEM, "value": ours}],
        "subject": {"reference": f"Patient/{patient['id']}"},
        "payload": [{"contentString": "Your results are ready"}]})
    # The patient's mail client kept a long chain whose root is not ours.
    chain = [new_message_id("mail.example.org") for _ in range(30)]
    references = [chain[0], *chain[1:15], ours, *chain[15:]]
    mid = new_message_id()
    deliver(svc, parsed_post(PATIENT, subject="Re: Results", text="Thanks!", message_id=mid,
                             in_reply_to=chain[-1], references=references))
    reply = landed(sandbox, mid)
    assert reply["partOf"] == [{"reference": f"Communication/{header['id']}"}]
    # Someone else answering that email (a forward) does not land in this patient's thread.
    email_patient(sandbox, "sibling@example.org")
    theirs = new_message_id()
    deliver(svc, parsed_post("sibling@example.org", text="Forwarded to me", message_id=theirs,
                             in_reply_to=ours, references=[ours]))
    assert landed(sandbox, theirs)["partOf"] != reply["partOf"]
    # Without a message of ours in the chain, the chain's root is the conversation.
    a, b = new_message_id(), new_message_id()
    deliver(svc, parsed_post(PATIENT, text="one", message_id=a, in_reply_to=chain[-1],
                             references=chain))
    deliver(svc, parsed_post(PATIENT, text="two", message_id=b, in_reply_to=a,
                             references=[*chain, a]))
    first, second = landed(sandbox, a), landed(sandbox, b)
    assert first["partOf"] == second["partOf"] != reply["partOf"]
    assert header_of(sandbox, first)["identifier"][0]["value"] == scoped(PATIENT, chain[0])


def test_the_round_trip_by_email(services: Services, sandbox: Sandbox,
                                 providers: ProviderSandbox) -> None:
    """A patient emails; the clinician's reply goes out answering that email; the patient's
    answer to our reply (naming only our Message-ID) comes back into the same thread."""
    from tests.conftest import outbound_env
    from tests.integration.test_email_events import reply, send_email

    providers.reset()
    svc = services.get(**outbound_env(providers,
                                      SENDGRID_INBOUND_VERIFICATION_KEY=VERIFICATION_KEY))
    patient = email_patient(sandbox)
    first = new_message_id()
    deliver(svc, parsed_post(PATIENT, subject="Rash question", text="Is it serious?",
                             message_id=first))
    header = header_of(sandbox, landed(sandbox, first))
    sent_id = send_email(svc, reply(sandbox, header, patient, "No, it is fine"))["communication"]
    (mail,) = providers.requests("sendgrid")
    assert mail["json"]["headers"]["In-Reply-To"] == first
    assert mail["json"]["headers"]["References"] == first
    assert mail["json"]["subject"] == "Re: Rash question"
    ours = mail["json"]["headers"]["Message-ID"]
    # The API says "sent" a moment before our Message-ID is written on the Communication; a
    # patient's answer comes later than that (and is matched by that identifier).
    eventually(lambda: any(i.get("value") == ours for i in sandbox.fhir.read(
        "Communication", sent_id).resource.get("identifier") or []),
        what="our Message-ID recorded")
    answer = new_message_id()
    deliver(svc, parsed_post(PATIENT, subject="Re: Rash question", text="Thanks!",
                             message_id=answer, in_reply_to=ours, references=[ours]))
    assert landed(sandbox, answer)["partOf"] == [{"reference": f"Communication/{header['id']}"}]
    assert len(sandbox.headers()) == 1


def test_same_message_id_five_times_at_once_is_one_communication(services: Services,
                                                                 sandbox: Sandbox) -> None:
    svc = services.get(SENDGRID_INBOUND_VERIFICATION_KEY=VERIFICATION_KEY)
    email_patient(sandbox)
    mid = new_message_id()
    content_type, body = parsed_post(PATIENT, text="only once", message_id=mid,
                                     attachments=[("photo.jpg", "image/jpeg", b"\xff\xd8jpeg")])
    app = svc.app()
    before = processed(svc)

    def one(_: int) -> int:
        return int(app.test_client().post(INBOUND_PATH, data=body,
                                          headers=signed(content_type, body)).status_code)

    with cf.ThreadPoolExecutor(5) as pool:
        assert list(pool.map(one, range(5))) == [200] * 5
    msg = landed(sandbox, mid)
    eventually(lambda: processed(svc) >= before + 5 or None, what="five deliveries processed")
    assert len(messages(sandbox, mid)) == 1
    assert len(sandbox.headers()) == 1
    binaries = {p["contentAttachment"]["url"] for p in msg["payload"] if "contentAttachment" in p}
    assert len(binaries) == 1
    assert svc.dead_letters.count() == 0


def test_spoofed_unknown_and_ambiguous_senders_are_dead_lettered(services: Services,
                                                                 sandbox: Sandbox) -> None:
    svc = services.get(SENDGRID_INBOUND_VERIFICATION_KEY=VERIFICATION_KEY)
    email_patient(sandbox)
    spoofed = new_message_id()
    deliver(svc, parsed_post(PATIENT, text=SECRET_BODY, message_id=spoofed, spf="fail",
                             dkim="{@example.org : fail}", envelope_from="x@attacker.test"))
    entry = eventually(lambda: svc.dead_letters.list(), what="dead letter")[0]
    assert entry.reason == "unauthenticated-sender"
    assert messages(sandbox, spoofed) == []
    svc.dead_letters.purge()

    for files in ([], [("stranger.pdf", "application/pdf", PDF)]):
        # With files, the sender is checked before any Binary is stored.
        deliver(svc, parsed_post("stranger@example.org", message_id=new_message_id(),
                                 attachments=files))
        entry = eventually(lambda: svc.dead_letters.list(), what="dead letter")[0]
        assert entry.reason == "unknown-sender" and "email address" in entry.detail
        svc.dead_letters.purge()

    email_patient(sandbox, "twin@example.org")
    email_patient(sandbox, "TWIN@example.org")
    deliver(svc, parsed_post("Twin@Example.org", message_id=new_message_id(),
                             dkim="{@Example.org : pass}"))
    entry = eventually(lambda: svc.dead_letters.list(), what="dead letter")[0]
    assert entry.reason == "ambiguous-sender"


REFUSALS = [
    # (case, settings, headers builder, expected status, reason)
    ("unsigned", KEYED, lambda ct, body: {"Content-Type": ct}, 401, "unsigned"),
    ("forged", KEYED, lambda ct, body: signed(ct, body, key=other_key()), 403, "bad-signature"),
    ("tampered", KEYED, lambda ct, body: signed(ct, body + b" "), 403, "bad-signature"),
    ("stale", KEYED, lambda ct, body: signed(ct, body, timestamp=int(time.time()) - 660), 403,
     "stale-timestamp"),
    ("nothing configured", {}, lambda ct, body: signed(ct, body), 403, "not-configured"),
    ("wrong basic credentials", {"SENDGRID_INBOUND_BASIC_AUTH": "sendgrid:s3cret"},
     lambda ct, body: {"Content-Type": ct,
                       "Authorization": "Basic " + base64.b64encode(b"sendgrid:guess").decode()},
     401, "bad-credentials"),
]


@pytest.mark.parametrize(("case", "env", "headers", "status", "reason"), REFUSALS,
                         ids=[r[0] for r in REFUSALS])
def test_requests_not_from_sendgrid_are_refused_and_nothing_is_queued(
        services: Services, case: str, env: dict[str, str], headers: Any, status: int,
        reason: str) -> None:
    svc = services.get(False, 1, **env)
    svc.redis.flushdb()
    content_type, body = parsed_post(PATIENT, text=SECRET_BODY)
    resp = post(svc, content_type, body, headers(content_type, body))
    assert (resp.status_code, resp.get_json()["error"]) == (status, reason)
    assert queued(svc) == 0


def test_basic_credentials_admit_a_request(services: Services) -> None:
    svc = services.get(worker=False, SENDGRID_INBOUND_BASIC_AUTH="sendgrid:s3cret")
    svc.redis.flushdb()
    content_type, body = raw_post(PATIENT, raw_email(PATIENT))
    auth = "Basic " + base64.b64encode(b"sendgrid:s3cret").decode()
    resp = post(svc, content_type, body, {"Content-Type": content_type, "Authorization": auth})
    assert resp.status_code == 200
    assert queued(svc) == 2  # the task message and its inbox entry


def test_a_signed_post_that_is_not_an_email_is_a_400(services: Services) -> None:
    svc = services.get(worker=False, SENDGRID_INBOUND_VERIFICATION_KEY=VERIFICATION_KEY)
    svc.redis.flushdb()
    body = b"--x\r\nContent-Disposition: form-data; name=\"subject\"\r\n\r\nhi\r\n--x--\r\n"
    resp = post(svc, "multipart/form-data; boundary=x", body,
                signed("multipart/form-data; boundary=x", body))
    assert resp.status_code == 400 and resp.get_json()["error"] == "invalid-email"
    assert queued(svc) == 0


def test_active_thread_joins_the_patients_open_thread(services: Services,
                                                      sandbox: Sandbox) -> None:
    svc = services.get(EMAIL_THREAD_STRATEGY="active-thread",
                       SENDGRID_INBOUND_VERIFICATION_KEY=VERIFICATION_KEY)
    email_patient(sandbox)
    a, b = new_message_id(), new_message_id()
    deliver(svc, parsed_post(PATIENT, text="first", message_id=a))
    first = landed(sandbox, a)
    deliver(svc, parsed_post(PATIENT, subject="Another thing", text="second", message_id=b))
    assert landed(sandbox, b)["partOf"] == first["partOf"]


def test_provider_sandbox_posts_signed_inbound_parse_to_gunicorn(
        services: Services, sandbox: Sandbox, providers: ProviderSandbox, log_dir: Path) -> None:
    svc = services.get(SENDGRID_INBOUND_VERIFICATION_KEY=VERIFICATION_KEY)
    email_patient(sandbox)
    port = devstack.free_port()
    web = devstack.start_web(svc.env, log_dir, port, name="web-email")
    url = f"http://127.0.0.1:{port}{INBOUND_PATH}"
    try:
        with httpx.Client(base_url=providers.origin, timeout=30) as http:
            assert http.get("/__inbound_email/key").json()["verification_key"] == VERIFICATION_KEY
            ids = {mode: new_message_id() for mode in ("parsed", "raw")}
            for mode, mid in ids.items():
                resp = http.post("/__inbound_email", json={
                    "url": url, "mode": mode, "from": f"Pat <{PATIENT}>", "message_id": mid,
                    "text": f"sent in {mode} mode", "attachments": [
                        {"filename": "note.txt", "content_type": "text/plain",
                         "content_b64": base64.b64encode(b"a note").decode()}]})
                assert resp.json()["status"] == 200, resp.text
            stale = http.post("/__inbound_email", json={
                "url": url, "from": PATIENT, "text": SECRET_BODY, "timestamp_offset": 900})
            assert stale.json()["status"] == 403
            unsigned = http.post("/__inbound_email", json={
                "url": url, "from": PATIENT, "text": SECRET_BODY, "sign": False})
            assert unsigned.json()["status"] == 401
        for mode, mid in ids.items():
            msg = landed(sandbox, mid)
            assert msg["payload"][0] == {"contentString": f"sent in {mode} mode"}
            assert msg["payload"][1]["contentAttachment"]["title"] == "note.txt"
    finally:
        web.stop()


def test_email_logs_hold_no_addresses_or_bodies(services: Services, log_dir: Path) -> None:
    """Runs after the flows above: every worker and web log of the session so far."""
    svc = services.get(SENDGRID_INBOUND_VERIFICATION_KEY=VERIFICATION_KEY)
    eventually(lambda: processed(svc) or None, what="an email processed")
    text = our_logs(log_dir)
    assert "inbound email: " in text
    for needle in (PATIENT, "pat.inbound", "stranger@", "twin@", SECRET_BODY, "qv9k",
                   "Can I come on Friday", "Results attached", "予約", "mail.example.org",
                   VERIFICATION_KEY[-20:]):
        assert needle not in text, needle
    assert not re.search(r"[\w.+\-]+@example\.org", text)
