"""Inbound email rules (pure): parsing both Inbound Parse modes, charsets, size limit, sender
authentication, threading ids, body cleaning, request signatures."""

from __future__ import annotations

import base64
import hashlib
import json
import time
from typing import Any

import pytest

from tests.email_payloads import (
    PRIVATE_KEY,
    VERIFICATION_KEY,
    _raw_head,
    boundary_replay,
    many_parts_email,
    multipart,
    nested_email,
    new_message_id,
    other_key,
    parsed_post,
    raw_charset_email,
    raw_email,
    raw_post,
    signed,
)
from worker.channels.sendgrid import EMAIL_INBOUND_MESSAGE_ID_SYSTEM
from worker.channels.sendgrid_inbound import (
    MAX_STRIP_CHARS,
    InvalidEmail,
    aligned,
    body_of,
    conversation_id,
    decode_text,
    message_key,
    mime_problem,
    parse_form_body,
    parse_mime,
    parse_request,
    read_form,
    read_post,
    read_sender,
    replied_ids,
    sender_authentication,
    strip_input,
    strip_quoted,
    to_inbound,
    topic,
)
from worker.channels.sendgrid_signing import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    basic_auth_ok,
    load_verification_key,
    verify_signed_request,
)
from worker.errors import PermanentError
from worker.inbound.email import admitted_email
from worker.messages import MAX_TEXT_BYTES, fit_text

PATIENT = "pat.example@example.org"
MB = 1024 * 1024
PDF = b"%PDF-1.4\n" + bytes(range(256)) * 40  # binary, not UTF-8


def record_of(post: tuple[str, bytes], max_bytes: int = 10 * MB) -> dict[str, Any]:
    content_type, body = post
    fields, files = parse_form_body(content_type, body)
    return parse_request(fields, files, max_bytes)


BODY_CASES = [
    # (case, post, expected text in contentString)
    ("parsed plain", parsed_post(PATIENT, text="Can I come on Friday?"), "Can I come on Friday?"),
    ("raw plain", raw_post(PATIENT, raw_email(PATIENT, text="Can I come on Friday?")),
     "Can I come on Friday?"),
    ("parsed html only", parsed_post(PATIENT, text=None,
                                     html="<p>My <b>rash</b> is better.</p><p>Thanks</p>"),
     "My rash is better.\n\nThanks"),
    ("raw html only", raw_post(PATIENT, raw_email(
        PATIENT, text=None, html="<div>My rash is better.<br>Thanks</div>")),
     "My rash is better.\nThanks"),
    ("parsed ISO-8859-1", parsed_post(PATIENT, text="Müller, Straße, café", charset="ISO-8859-1"),
     "Müller, Straße, café"),
    ("raw ISO-8859-1", raw_post(PATIENT, raw_email(PATIENT, text="Müller, Straße, café",
                                                   charset="iso-8859-1")),
     "Müller, Straße, café"),
    ("parsed Shift_JIS", parsed_post(PATIENT, text="予約を変更したいです。", charset="Shift_JIS"),
     "予約を変更したいです。"),
    ("raw Shift_JIS", raw_post(PATIENT, raw_email(PATIENT, text="予約を変更したいです。",
                                                  charset="shift_jis")),
     "予約を変更したいです。"),
    # Declared UTF-8, really Shift_JIS: decoded by a guess rather than refused or crashed on.
    ("wrong declared charset", parsed_post(PATIENT, text="予約を変更したいです。お願いします。",
                                           charset="UTF-8", encoded_with="shift_jis"),
     "予約を変更したいです。お願いします。"),
    ("unknown charset name", parsed_post(PATIENT, text="plain words", charset="x-no-such",
                                         encoded_with="ascii"),
     "plain words"),
]


@pytest.mark.parametrize(("case", "post", "expected"), BODY_CASES, ids=[c[0] for c in BODY_CASES])
def test_bodies_decode_in_both_modes(case: str, post: tuple[str, bytes], expected: str) -> None:
    record = record_of(post)
    assert body_of(record).text == expected
    assert record["from"] == PATIENT and record["message_id"].startswith("<")


def test_quoted_history_is_stripped_and_the_original_kept() -> None:
    text = ("Yes, Friday works.\n\nOn Mon, 30 Nov 2026 at 09:00, Clinic <care@clinic.example> "
            "wrote:\n> Your appointment is on Thursday.\n> Reply to change it.\n")
    body = body_of(record_of(parsed_post(PATIENT, text=text)))
    assert body.text == "Yes, Friday works."
    assert body.original == text and body.original_type == "text/plain"
    outlook = ("Thanks!\n\n________________________________\nFrom: Clinic <care@clinic.example>"
               "\nSent: Monday\nSubject: Appointment\n\nYour appointment is on Thursday.")
    assert body_of(record_of(parsed_post(PATIENT, text=outlook))).text == "Thanks!"
    whole = body_of(record_of(parsed_post(PATIENT, text="Nothing quoted here.")))
    assert whole.text == "Nothing quoted here." and whole.original == ""


@pytest.mark.parametrize("mode", ["parsed", "raw"])
def test_attachments_kept_with_type_name_and_bytes(mode: str) -> None:
    files = [("lab-results.pdf", "application/pdf", PDF), ("rash.jpg", "image/jpeg", b"\xff\xd8x")]
    post = (parsed_post(PATIENT, attachments=files) if mode == "parsed"
            else raw_post(PATIENT, raw_email(PATIENT, attachments=files)))
    record = record_of(post)
    got = [(a["name"], a["content_type"], base64.b64decode(a["data"]), a["size"])
           for a in record["attachments"]]
    assert got == [(n, t, d, len(d)) for n, t, d in files]
    assert record["omitted"] == []


@pytest.mark.parametrize("mode", ["parsed", "raw"])
def test_an_email_over_the_limit_keeps_its_text_and_names_what_it_leaves_out(mode: str) -> None:
    big = bytes(range(256)) * 8192  # 2 MB
    files = [("scan.pdf", "application/pdf", big)]
    post = (parsed_post(PATIENT, text="Scan attached", attachments=files) if mode == "parsed"
            else raw_post(PATIENT, raw_email(PATIENT, text="Scan attached", attachments=files)))
    record = record_of(post, max_bytes=1 * MB)
    assert record["attachments"] == []
    assert [(o["name"], o["size"]) for o in record["omitted"]] == [("scan.pdf", len(big))]
    msg = to_inbound(record, "2026-11-30T10:00:00Z", (), body_of(record))
    assert msg.body == "Scan attached"
    assert msg.notes and "scan.pdf" in msg.notes[0] and str(len(big)) in msg.notes[0]


def scoped(sender: str, message_id: str) -> str:
    """An id scoped by its sender, as message_key and conversation_id make it."""
    return f"sender:{hashlib.sha256(sender.lower().encode()).hexdigest()[:16]}:{message_id}"


def test_threading_ids_root_of_references_then_in_reply_to_then_own() -> None:
    chain = [new_message_id() for _ in range(40)]
    long_chain = record_of(parsed_post(PATIENT, in_reply_to=chain[-1], references=chain))
    assert conversation_id(long_chain) == scoped(PATIENT, chain[0])
    ids = replied_ids(long_chain)
    assert ids[0] == chain[-1] and ids[-1] == chain[0] and len(ids) == 40
    only_reply = record_of(parsed_post(PATIENT, in_reply_to=chain[3]))
    assert conversation_id(only_reply) == scoped(PATIENT, chain[3])
    own = record_of(parsed_post(PATIENT))
    assert conversation_id(own) == scoped(PATIENT, own["message_id"]) == message_key(own)


def test_another_senders_references_name_another_conversation() -> None:
    """Issue 26 finding 5: a relative's reply-all names the patient's root Message-ID; it must
    not be the patient's conversation."""
    root = new_message_id()
    patients = record_of(parsed_post(PATIENT, message_id=root))
    relatives = record_of(parsed_post("relative@example.net", in_reply_to=root,
                                      references=[root]))
    again = record_of(parsed_post(PATIENT.upper(), in_reply_to=root, references=[root]))
    assert conversation_id(relatives) != conversation_id(patients) == conversation_id(again)
    assert PATIENT not in conversation_id(patients)  # a digest, not the address


def test_the_idempotency_key_is_the_sender_and_the_message_id() -> None:
    """Issue 26 finding 9: a Message-ID reused by another sender is another email."""
    mid = new_message_id()
    first = record_of(parsed_post(PATIENT, message_id=mid, text="first"))
    other = record_of(parsed_post("someone.else@example.net", message_id=mid, text="other"))
    resent = record_of(parsed_post("Pat.Example@Example.org", message_id=mid, text="first"))
    assert message_key(first) != message_key(other)
    assert message_key(first) == message_key(resent) == scoped(PATIENT, mid)
    # The bare Message-ID is still recorded (a reply by email answers it).
    msg = to_inbound(first, "2026-11-30T10:00:00Z", (), body_of(first))
    assert msg.provider_message_id == message_key(first)
    assert msg.identifiers == ((EMAIL_INBOUND_MESSAGE_ID_SYSTEM, mid),)


def test_a_text_too_long_for_one_fhir_string_is_cut_and_kept_whole() -> None:
    """Issue 26 finding 4: a 3 MB text is cut below Medplum's limits; the whole is attached."""
    text = "Ünïcödé line of my diary, with a quote \" and a tab\t.\n" * 60_000  # ~3.4 MB
    body = body_of(record_of(parsed_post(PATIENT, text=text)))
    assert body.cut and body.original == text and body.original_type == "text/plain"
    assert len(json.dumps(body.text, ensure_ascii=False).encode()) - 2 <= MAX_TEXT_BYTES
    assert text.startswith(body.text) and len(body.text) > MAX_TEXT_BYTES // 4
    record = record_of(parsed_post(PATIENT, text=text))
    msg = to_inbound(record, "2026-11-30T10:00:00Z", (), body_of(record))
    assert any("original-message.txt" in n and str(len(body.text)) in n for n in msg.notes)
    short = body_of(record_of(parsed_post(PATIENT, text="Short and whole.")))
    assert not short.cut and short.original == ""


@pytest.mark.parametrize("text", ["", "a", "日本語" * 10, "\n" * 100, "x\"" * 50, "é" * 33])
@pytest.mark.parametrize("limit", [1, 7, 64])
def test_fit_text_keeps_the_longest_prefix_that_fits(text: str, limit: int) -> None:
    def size(t: str) -> int:
        return len(json.dumps(t, ensure_ascii=False).encode()) - 2

    fitted, cut = fit_text(text, limit)
    assert text.startswith(fitted) and size(fitted) <= limit
    assert cut == (fitted != text)
    if cut:
        assert size(text[:len(fitted) + 1]) > limit


def test_without_message_id_the_key_is_a_stable_digest() -> None:
    date = "Mon, 30 Nov 2026 10:00:00 +0000"
    one = record_of(parsed_post(PATIENT, message_id="", date=date, text="same"))
    again = record_of(parsed_post(PATIENT, message_id="", date=date, text="same"))
    other = record_of(parsed_post(PATIENT, message_id="", date=date, text="different"))
    assert one["message_id"] == ""
    assert message_key(one) == message_key(again) != message_key(other)
    assert message_key(one).startswith("sha256:")


@pytest.mark.parametrize(("subject", "expected"), [
    ("Re: Appointment", "Appointment"), ("RE: Fwd: Appointment", "Appointment"),
    ("Fw: AW: Termin", "Termin"), ("Re[2]: Results", "Results"), ("Results", "Results"),
    ("Regarding: x", "Regarding: x"),
    # Issue 26 finding 13: the topic is stored and becomes every reply's subject.
    ("Re: Hi\r\nBcc: all@example.org", "Hi Bcc: all@example.org"),
    ("Hi\x00\x1b[31m\u2028\tthere", "Hi [31m there"), ("\r\n", ""),
    ("x" * 600, "x" * 250)])
def test_topic_drops_reply_and_forward_prefixes(subject: str, expected: str) -> None:
    assert topic(subject) == expected


def test_an_encoded_line_break_in_the_subject_does_not_reach_the_topic() -> None:
    email = raw_email(PATIENT)
    email = email.replace(b"Subject: Question about my appointment",
                          b"Subject: =?utf-8?q?Hi=0D=0ABcc=3A_all=40example=2Eorg?=")
    record = record_of(raw_post(PATIENT, email))
    assert "\n" in record["subject"]  # the decoded header holds the line break
    msg = to_inbound(record, "2026-11-30T10:00:00Z", (), body_of(record))
    assert msg.topic == "Hi Bcc: all@example.org"


SENDER_CASES = [
    # (case, spf, dkim, envelope_from, authenticated as)
    ("dkim pass for the From domain", "fail", "{@example.org : pass}", None, "dkim"),
    ("dkim pass for a subdomain", "none", "{@mail.example.org : pass}", None, "dkim"),
    ("dkim pass for another domain only", "none", "{@mailer.net : pass, @example.org : fail}",
     None, None),
    ("spf pass, envelope in From domain", "pass", "none", "bounce@example.org", "spf"),
    ("spf pass for someone else's envelope", "pass", "{@evil.test : pass}",
     "bounce@evil.test", None),
    ("spoofed: spf and dkim fail", "fail", "{@example.org : fail}", None, None),
    ("spoofed: nothing at all", "none", "none", None, None),
]


@pytest.mark.parametrize(("case", "spf", "dkim", "envelope", "expected"), SENDER_CASES,
                         ids=[c[0] for c in SENDER_CASES])
def test_sender_authentication_needs_the_from_domain_itself(
        case: str, spf: str, dkim: str, envelope: str | None, expected: str | None) -> None:
    record = record_of(parsed_post(PATIENT, spf=spf, dkim=dkim, envelope_from=envelope))
    assert sender_authentication(record) == expected


def test_raw_mode_trusts_only_sendgrids_own_authentication_results() -> None:
    forged = raw_email(PATIENT, extra_headers=[(
        "Authentication-Results", "mx.example.org; dkim=pass header.d=example.org")])
    record = record_of(raw_post(PATIENT, forged, spf="", dkim=""))
    assert sender_authentication(record) is None
    real = raw_email(PATIENT, extra_headers=[(
        "Authentication-Results", "mx.sendgrid.net; dkim=pass header.d=example.org; spf=fail")])
    assert sender_authentication(record_of(raw_post(PATIENT, real, spf="", dkim=""))) == "dkim"


def test_alignment_needs_two_labels() -> None:
    assert aligned("example.org", "mail.example.org")
    assert not aligned("org", "example.org")
    assert not aligned("ample.org", "example.org")


@pytest.mark.parametrize(("data", "charset", "expected"), [
    (b"caf\xe9", "iso-8859-1", "café"), (b"caf\xc3\xa9", "utf-8", "café"),
    (b"caf\xc3\xa9", "no-such-charset", "café"), (b"\xff\xfe\xfa", "utf-8", None)])
def test_decode_text_never_raises(data: bytes, charset: str, expected: str | None) -> None:
    text = decode_text(data, charset)
    assert isinstance(text, str)
    if expected is not None:
        assert text == expected


@pytest.mark.parametrize(("content_type", "body"), [
    ("application/json", b"{}"), ("multipart/form-data; boundary=x", b"garbage"),
    ("multipart/form-data; boundary=x", b"--x\r\nContent-Disposition: form-data; "
     b'name="subject"\r\n\r\nno sender\r\n--x--\r\n')])
def test_unreadable_posts_are_invalid(content_type: str, body: bytes) -> None:
    with pytest.raises(InvalidEmail):
        fields, files = parse_form_body(content_type, body)
        parse_request(fields, files, MB)


def test_a_post_without_from_is_invalid() -> None:
    content_type, body = parsed_post("not-an-address")
    with pytest.raises(InvalidEmail):
        record_of((content_type, body))


# -- request signatures ----------------------------------------------------------------------

def test_signature_over_the_exact_bytes() -> None:
    key = load_verification_key(VERIFICATION_KEY)
    content_type, body = parsed_post(PATIENT, attachments=[("a.pdf", "application/pdf", PDF)])
    headers = signed(content_type, body)
    now = time.time()
    sig, ts = headers[SIGNATURE_HEADER], headers[TIMESTAMP_HEADER]
    assert verify_signed_request(key, body, sig, ts, now) is None
    assert verify_signed_request(key, body + b"x", sig, ts, now) == "bad-signature"
    assert verify_signed_request(key, body, None, ts, now) == "unsigned"
    assert verify_signed_request(key, body, sig, None, now) == "unsigned"
    assert verify_signed_request(key, body, "not base64!", ts, now) == "bad-signature"
    forged = signed(content_type, body, key=other_key())
    assert verify_signed_request(key, body, forged[SIGNATURE_HEADER],
                                 forged[TIMESTAMP_HEADER], now) == "bad-signature"
    stale = signed(content_type, body, timestamp=int(now) - 601)
    assert verify_signed_request(key, body, stale[SIGNATURE_HEADER], stale[TIMESTAMP_HEADER],
                                 now) == "stale-timestamp"
    future = signed(content_type, body, timestamp=int(now) + 3600)
    assert verify_signed_request(key, body, future[SIGNATURE_HEADER],
                                 future[TIMESTAMP_HEADER], now) == "stale-timestamp"


def test_the_sdk_and_our_check_agree_on_text_bodies() -> None:
    from sendgrid.helpers.eventwebhook import EventWebhook

    body = b'[{"event":"delivered","sg_event_id":"abc"}]'
    headers = signed("application/json", body)
    assert EventWebhook(VERIFICATION_KEY).verify_signature(
        body.decode(), headers[SIGNATURE_HEADER], headers[TIMESTAMP_HEADER])
    assert PRIVATE_KEY is not None


@pytest.mark.parametrize("bad", ["", "bm90IGEga2V5", "-----BEGIN PUBLIC KEY-----\nxx\n"])
def test_bad_verification_keys_fail_loudly(bad: str) -> None:
    with pytest.raises(ValueError):
        load_verification_key(bad)


@pytest.mark.parametrize(("header", "ok"), [
    ("Basic " + base64.b64encode(b"sendgrid:s3cret").decode(), True),
    ("basic " + base64.b64encode(b"sendgrid:s3cret").decode(), True),
    ("Basic " + base64.b64encode(b"sendgrid:wrong").decode(), False),
    ("Bearer s3cret", False), ("Basic !!!", False), (None, False)])
def test_basic_auth(header: str | None, ok: bool) -> None:
    assert basic_auth_ok("sendgrid:s3cret", header) is ok
    assert basic_auth_ok("", header) is False


def test_hostile_shapes_are_tamed_not_fatal() -> None:
    post = parsed_post(PATIENT, attachments=[("x.bin", "text/plain\x00; evil", b"x")])
    record = record_of(post)
    assert record["attachments"][0]["content_type"] == "application/octet-stream"
    content_type, body = post
    body = body.replace(b'"to": ["care@clinic.example"]', b'"to": "care@clinic.example"')
    fields, files = parse_form_body(content_type, body)
    assert parse_request(fields, files, MB)["envelope_to"] == ["care@clinic.example"]


# -- hostile posts (issue #26: 2, 3, 6, 7) -------------------------------------------------------

def test_a_replay_with_another_boundary_is_refused() -> None:
    content_type, body, evil = boundary_replay(PATIENT)
    assert record_of((content_type, body))["from"] == PATIENT  # the genuine post reads
    with pytest.raises(InvalidEmail):
        record_of((evil, body))


def _framed(parts: list[bytes], boundary: bytes = b"b") -> bytes:
    return b"".join(b"--" + boundary + b"\r\n" + p + b"\r\n" for p in parts) + \
        b"--" + boundary + b"--\r\n"


FROM_PART = b'Content-Disposition: form-data; name="from"\r\n\r\n' + PATIENT.encode()
TEXT_PART = b'Content-Disposition: form-data; name="text"\r\n\r\nhello'


FRAMING_CASES = [
    ("preamble", b"junk\r\n" + _framed([FROM_PART, TEXT_PART])),
    ("epilogue", _framed([FROM_PART, TEXT_PART]) + b"more parts here\r\n"),
    ("no closing delimiter", _framed([FROM_PART, TEXT_PART])[:-len(b"--b--\r\n")]),
    ("repeated field", _framed([FROM_PART, TEXT_PART, FROM_PART])),
    ("repeated field, other spelling", _framed(
        [FROM_PART, TEXT_PART, b"Content-Disposition: form-data; name=from\r\n\r\nx@y.org"])),
    ("boundary inside a part", _framed([FROM_PART, TEXT_PART + b"\r\n--bX"])),
    ("raw mode's email field in a parsed post", _framed(
        [FROM_PART, TEXT_PART, b'Content-Disposition: form-data; name="email"\r\n\r\n'
         b"From: someone.else@example.org\r\n\r\nforged"])),
    ("too many parts", _framed([FROM_PART] + [b"Content-Disposition: form-data; "
                                              b'name="f%d"\r\n\r\nx' % n for n in range(1100)])),
]


@pytest.mark.parametrize(("case", "body"), FRAMING_CASES, ids=[c[0] for c in FRAMING_CASES])
def test_only_exactly_framed_forms_are_read(case: str, body: bytes) -> None:
    assert record_of(("multipart/form-data; boundary=b", _framed([FROM_PART, TEXT_PART])))[
        "text"] == "hello"
    with pytest.raises(InvalidEmail):
        record_of(("multipart/form-data; boundary=b", body))


CHARSET_CASES = [
    # (case, charset, bytes, the text read)
    ("undefined", "undefined", b"see you soon", "see you soon"),
    ("punycode", "punycode", b"caf\\N{x", None),
    ("unicode_escape", "unicode_escape", b"x\\N{x", None),
    ("NUL in the name", "utf\x00-8", b"see you soon", "see you soon"),
]


@pytest.mark.parametrize(("case", "charset", "data", "expected"), CHARSET_CASES,
                         ids=[c[0] for c in CHARSET_CASES])
def test_broken_charsets_decode_with_replacement_in_both_modes(
        case: str, charset: str, data: bytes, expected: str | None) -> None:
    for post in (parsed_post(PATIENT, text=data.decode("latin-1"), charset=charset,
                             encoded_with="latin-1"),
                 raw_post(PATIENT, raw_charset_email(PATIENT, charset, data))):
        text = body_of(record_of(post)).text
        assert isinstance(text, str) and text
        if expected is not None:
            assert text == expected


def test_deep_nesting_and_many_parts_are_refused_unparsed() -> None:
    for raw in (nested_email(PATIENT, 1200), many_parts_email(PATIENT, 200_000)):
        with pytest.raises(InvalidEmail) as caught:
            record_of(raw_post(PATIENT, raw))
        assert caught.value.reason == "email-too-complex"
    # Ordinary structures still read: a few levels, a few hundred parts.
    assert body_of(record_of(raw_post(PATIENT, nested_email(PATIENT, 10)))).text == "hello"
    assert record_of(raw_post(PATIENT, many_parts_email(PATIENT, 300)))["from"] == PATIENT


def test_read_post_turns_any_failure_into_a_reason_without_the_text(
        monkeypatch: pytest.MonkeyPatch) -> None:
    content_type, body = raw_post(PATIENT, raw_email(PATIENT, text="secret words"))
    assert read_post(content_type, body, MB)["text"].strip() == "secret words"
    import email.feedparser

    def broken(self: Any, data: bytes) -> None:
        raise ValueError("secret words")  # as a library error quoting the body would

    monkeypatch.setattr(email.feedparser.BytesFeedParser, "feed", broken)
    with pytest.raises(InvalidEmail) as caught:
        read_post(content_type, body, MB)
    assert caught.value.reason == "unreadable-email"
    assert "secret" not in str(caught.value) and caught.value.__cause__ is None


def test_the_quote_stripper_sees_a_bounded_head(monkeypatch: pytest.MonkeyPatch) -> None:
    from mailparser_reply import EmailReplyParser

    seen: list[int] = []
    real = EmailReplyParser.parse_reply

    def recording(self: Any, text: str) -> str | None:
        seen.append(len(text))
        # The library's worst case is quadratic (187 s at 90 KB): never run it on more.
        return real(self, text=text) if len(text) <= MAX_STRIP_CHARS else ""

    monkeypatch.setattr(EmailReplyParser, "parse_reply", recording)
    hostile = "On " * 30_000  # 90 KB
    assert strip_quoted(hostile) == hostile.strip()
    assert strip_quoted("\n" * 50_000 + "hi") == "hi"
    assert seen and max(seen) <= MAX_STRIP_CHARS
    assert len(strip_input(hostile)) <= MAX_STRIP_CHARS
    # A long reply: the quote header in the head still cuts the history off, tail included.
    reply = "See you then.\n\nOn Mon, 30 Nov 2026 at 09:00, Clinic wrote:\n" + "> old\n" * 5000
    assert strip_quoted(reply) == "See you then."
    # A long message without any header in its head is shown whole.
    long_text = "word " * 2000 + "\n\nOn Mon, 30 Nov 2026 at 09:00, Clinic wrote:\n> old\n"
    assert strip_quoted(long_text) == long_text.strip()


def test_part_headers_cost_little_and_never_recurse() -> None:
    params = b'Content-Disposition: form-data; name="text"' + b"; a=b" * 400 + b"\r\n\r\nhi"
    lines = b"X-A: b\r\n" * 200 + b'Content-Disposition: form-data; name="text"\r\n\r\nhi'
    for hostile in (params, lines):  # 36 ms per part (317 s for 1,023 parts) with the old parser
        with pytest.raises(InvalidEmail):
            parse_form_body("multipart/form-data; boundary=b", _framed([FROM_PART, hostile]))
    for comments in (b'name="text" ' + b"(" * 1900, b'name="text"; x=' + b"(" * 1900):
        nested = b"Content-Disposition: form-data; " + comments + b"\r\n\r\nhi"
        # compat32 reads it flat (the old parser: RecursionError, a 500).
        fields, _ = parse_form_body("multipart/form-data; boundary=b",
                                    _framed([FROM_PART, nested]))
    assert fields["text"] == b"hi"
    named = _framed([FROM_PART, 'Content-Disposition: form-data; name="attachment1"; '
                                'filename="Röntgen.pdf"\r\n\r\n%PDF'.encode()])
    _, files = parse_form_body("multipart/form-data; boundary=b", named)
    assert files[0].filename == "Röntgen.pdf"  # raw UTF-8 in the header, as browsers send it


def test_headers_the_parser_would_take_minutes_on_are_refused() -> None:
    head = raw_email(PATIENT, text="hi").split(b"\n", 1)
    hostile = [  # read through policy.default, in time growing with the square of their size
        head[0] + b"\nContent-Disposition: inline" + b"; a=b" * 100 + b"\n" + head[1],
        head[0] + b"\nCc: " + b"a@b.example, " * 40_000 + b"\n" + head[1],  # 89 s
    ]
    content_type, body = parsed_post(PATIENT)
    posts = [raw_post(PATIENT, raw) for raw in hostile] + [
        (content_type, body.replace(b"\nMIME-Version", b"\nCc: " + b"a@b.example, " * 40_000
                                    + b"\nMIME-Version"))]  # parsed mode's headers field
    for post in posts:
        with pytest.raises(InvalidEmail) as caught:
            record_of(post)
        assert caught.value.reason == "email-too-complex"


# -- hostile review: F1 (parsed mode's headers field), F2 (MIME parts), the sender first ------

# The review's payload: From/Subject/Message-ID and N Authentication-Results of 30 KB each (the
# old code parsed every one with policy.default, 0.17 s each, before the sender lookup).
_BIG_AR = b"Authentication-Results: " + b"a " * 15_000


def _hostile_headers_post(count: int, top: bytes = b"") -> tuple[str, bytes]:
    headers = b"\n".join([f"From: <{PATIENT}>".encode(), b"Subject: x",
                          b"Message-ID: <1@mail.example.org>", *([top] if top else []),
                          *[_BIG_AR] * count])
    return multipart([("from", PATIENT.encode(), None, None), ("headers", headers, None, None),
                      ("dkim", b"{@evil.example : pass}", None, None),
                      ("text", b"hi", None, None)])


def test_parsed_modes_headers_field_is_capped_like_raw_modes_header_block() -> None:
    post = _hostile_headers_post(9)  # 270 KB: over MAX_EMAIL_HEADER_BYTES
    with pytest.raises(InvalidEmail) as caught:
        record_of(post)
    assert caught.value.reason == "email-too-complex"
    with pytest.raises(InvalidEmail) as caught:
        read_sender(read_form(*post))
    assert caught.value.reason == "email-too-complex"


def test_the_receiver_refuses_a_headers_field_over_the_cap_as_for_raw_mode() -> None:
    """Second review: the receiver accepted a parsed post whose `headers` field was over the
    cap (the worker then refused it, keeping the whole post, 20 MB of attachment included)."""
    from worker.channels.sendgrid_inbound import form_parts, require_email_fields

    with pytest.raises(InvalidEmail, match="headers field is over"):
        require_email_fields(form_parts(*_hostile_headers_post(9)))
    require_email_fields(form_parts(*_hostile_headers_post(7)))  # under the cap: accepted


@pytest.mark.parametrize("mode", ["parsed", "raw"])
def test_only_the_topmost_authentication_results_is_read(mode: str) -> None:
    top = b"Authentication-Results: mx.sendgrid.net; dkim=pass header.d=example.org"
    if mode == "parsed":
        post = _hostile_headers_post(7, top)
        content_type, body = post
        post = (content_type, body.replace(b"{@evil.example : pass}", b""))
    else:
        raw = raw_email(PATIENT, text="hi").replace(
            b"\nMIME-Version", b"\n" + top + b"\r\n" + (_BIG_AR + b"\r\n") * 7 + b"MIME-Version")
        post = raw_post(PATIENT, raw, spf="", dkim="")
    record = record_of(post)
    sender = read_sender(read_form(*post))
    assert record["auth_results"] == sender["auth_results"] == [top.split(b": ", 1)[1].decode()]
    assert sender_authentication(sender) == sender_authentication(record) == "dkim"
    assert record["from"] == sender["from"] == PATIENT


def _cr_only_parts(parts: int) -> bytes:
    return (_raw_head(PATIENT, "parts", None)
            + b'Content-Type: multipart/mixed; boundary="p"\r\n\r\n'
            + b"\r--p\rContent-Type: text/plain\r\rx\r" * parts + b"--p--\r\n")


def _rfc2231_parts(parts: int, declaration: bytes = b"boundary*=''p") -> bytes:
    return (_raw_head(PATIENT, "parts", None)
            + b"Content-Type: multipart/mixed; " + declaration + b"\r\n\r\n"
            + b"--p\r\nContent-Type: text/plain\r\n\r\nx\r\n" * parts + b"--p--\r\n")


@pytest.mark.parametrize("raw", [
    _cr_only_parts(600),  # lone CRs: the parser splits on them
    _rfc2231_parts(600),  # RFC 2231 `boundary*=`
    _rfc2231_parts(600, b'boundary*0="p"; boundary*1=""'),  # RFC 2231 continuations
    _raw_head(PATIENT, "nested", None)  # message/rfc822 inside message/rfc822: no boundary
    + b"Content-Type: message/rfc822\r\n\r\n" * 600 + b"hi\r\n",
], ids=["cr-only", "boundary*=", "boundary*0=", "rfc822-nesting"])
def test_mime_parts_are_bounded_as_the_parser_makes_them(raw: bytes) -> None:
    with pytest.raises(InvalidEmail) as caught:
        record_of(raw_post(PATIENT, raw))
    assert caught.value.reason == "email-too-complex"


def test_the_part_estimate_counts_lines_after_a_lone_cr() -> None:
    assert mime_problem(_cr_only_parts(600)) is not None
    assert mime_problem(_cr_only_parts(300)) is None
    assert record_of(raw_post(PATIENT, _cr_only_parts(300)))["from"] == PATIENT
    assert record_of(raw_post(PATIENT, _rfc2231_parts(300)))["from"] == PATIENT


@pytest.mark.parametrize("raw", [_cr_only_parts(600), _rfc2231_parts(600),
                                 many_parts_email(PATIENT, 200_000)],
                         ids=["cr-only", "boundary*=", "200k-parts"])
def test_a_strangers_email_is_refused_before_it_is_parsed(raw: bytes) -> None:
    """The sender comes from cheap reads, and is judged before the email is parsed: an
    unknown sender's email ends `unknown-sender`, never reaching the parse that would refuse
    it as `email-too-complex` (and cost its time)."""
    judged: list[str] = []

    def stranger(sender: Any) -> None:
        judged.append(sender["from"])
        raise PermanentError("unknown-sender", "no Patient has the sender's email address")

    content_type, body = raw_post(PATIENT, raw)
    with pytest.raises(PermanentError) as caught:
        admitted_email(content_type, body, MB, stranger)
    assert caught.value.reason == "unknown-sender" and judged == [PATIENT]
    # A sender let through gets the whole parse, with its bounds.
    with pytest.raises(PermanentError) as caught:
        admitted_email(content_type, body, MB, lambda sender: None)
    assert caught.value.reason == "email-too-complex"


def test_an_unauthenticated_sender_is_refused_from_the_cheap_read() -> None:
    content_type, body = _hostile_headers_post(7)  # dkim passes for evil.example only
    sender = read_sender(read_form(content_type, body))
    assert sender_authentication(sender) is None
    assert set(sender) == {"from", "spf", "dkim", "envelope_from", "envelope_to",
                           "auth_results"}


def test_a_parts_content_disposition_is_bounded() -> None:
    # Parsed on every read: 0.8 s per part at 30 KB (500 parts: minutes).
    part = (b'--p\r\nContent-Type: application/pdf\r\nContent-Disposition: attachment; '
            b'filename="' + b"a " * 15_000 + b'"\r\n\r\nx\r\n')
    raw = (_raw_head(PATIENT, "parts", None)
           + b'Content-Type: multipart/mixed; boundary="p"\r\n\r\n' + part + b"--p--\r\n")
    with pytest.raises(InvalidEmail) as caught:
        parse_mime(raw)
    assert caught.value.reason == "email-too-complex"
    long_name = "Befund " + "ä" * 120 + ".pdf"  # RFC 2231-encoded in continuations: 1 KB
    record = record_of(raw_post(PATIENT, raw_email(PATIENT, attachments=[
        (long_name, "application/pdf", PDF)])))
    assert record["attachments"][0]["name"] == long_name
