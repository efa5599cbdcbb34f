"""Pure rules: query encoding, error classification, backoff, payload parsing."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st
from urllib3 import HTTPHeaderDict

from worker.broker.backoff import retry_delay
from worker.channels.twilio import TwilioSignature, missing_fields, parse_inbound
from worker.errors import PermanentError
from worker.fhir.outcome import (
    FhirPermanentError,
    FhirTransientError,
    classify,
    outcome_text,
    retry_after_seconds,
)
from worker.fhir.query import conditional_reference, query_string

# Phone numbers: tests/unit/test_phones.py.


def test_plus_is_always_percent_encoded() -> None:
    assert query_string([("phone", "+15551234567")]) == "phone=%2B15551234567"
    assert conditional_reference("Patient", {"phone": "+1 555"}) == "Patient?phone=%2B1%20555"
    # '|' and ',' keep their FHIR meaning.
    assert query_string([("identifier", "sys|v1,v2")]) == "identifier=sys|v1,v2"


@given(st.text())
def test_no_raw_plus_or_space_ever_reaches_a_query(value: str) -> None:
    q = query_string([("k", value)])
    assert "+" not in q and " " not in q


def test_classify_table() -> None:
    oo = {"resourceType": "OperationOutcome",
          "issue": [{"severity": "error", "code": "invalid", "details": {"text": "Bad thing"},
                     "expression": ["Communication.status"]}]}
    assert classify(200, {}, {}) is None
    assert classify(201, {}, {}) is None
    for status in (500, 502, 503, 504, 408):
        assert isinstance(classify(status, {}, None), FhirTransientError)
    for status in (400, 404, 409, 410, 412, 422):
        err = classify(status, {}, oo)
        assert isinstance(err, FhirPermanentError)
        assert err.outcome_text == "Bad thing (Communication.status)"
        assert err.reason == f"fhir-{status}"
    throttled = classify(429, {"RateLimit": '"requests";r=0;t=7, "fhirInteractions";r=0;t=56'},
                         None)
    assert isinstance(throttled, FhirTransientError)
    assert throttled.retry_after == 56
    assert throttled.reason == "fhir-throttled"
    assert isinstance(classify(401, {}, None), FhirTransientError)


def test_retry_after_prefers_retry_after_header() -> None:
    assert retry_after_seconds({"Retry-After": "3"}) == 3
    assert retry_after_seconds({"ratelimit": '"requests";r=10;t=2'}) == 2
    assert retry_after_seconds({}) is None


def test_retry_after_reads_a_repeated_header_as_one() -> None:
    # urllib3's HTTPHeaderDict (the FHIR client's answers) yields each line from .items().
    headers = HTTPHeaderDict()
    headers.add("RateLimit", '"fhirInteractions";r=0;t=56')
    headers.add("ratelimit", '"requests";r=99;t=3')
    assert retry_after_seconds(headers) == 56


def test_unresolved_reference_is_read_from_the_outcome() -> None:
    text = outcome_text({"resourceType": "OperationOutcome", "issue": [{
        "details": {"text": "Conditional reference 'Patient?phone=%2B1' did not match any "
                            "resources"}, "expression": ["Communication.sender"]}]})
    err = FhirPermanentError(400, text)
    assert err.unresolved_reference() == "Patient?phone=%2B1"
    assert err.ambiguous_reference() is None
    many = FhirPermanentError(400, "Conditional reference 'Patient?x=1' matched multiple "
                                   "resources")
    assert many.ambiguous_reference() == "Patient?x=1"


@given(st.integers(min_value=1, max_value=50), st.floats(min_value=0, max_value=1000))
def test_backoff_is_bounded_and_honours_server_hint(attempt: int, hint: float) -> None:
    rng = random.Random(attempt)
    d = retry_delay(attempt, 2.0, 300.0, None, rng)
    assert 0 < d <= 300
    assert retry_delay(attempt, 2.0, 300.0, hint, rng) >= min(hint, 300)


def test_backoff_grows_exponentially() -> None:
    rng = random.Random(1)
    lows = [retry_delay(n, 1.0, 1000.0, None, rng) for n in range(1, 8)]
    for n, d in enumerate(lows, start=1):
        assert 2 ** (n - 1) / 2 <= d <= 2 ** (n - 1)


def test_parse_inbound_mms_and_conversation() -> None:
    msg = parse_inbound({
        "MessageSid": "SM1", "From": "+15551234567", "To": "+15557654321", "Body": "pic",
        "NumMedia": "3", "MediaUrl0": "https://api.twilio.com/m/0",
        "MediaContentType0": "image/jpeg", "MediaUrl1": "https://media.twiliocdn.com/m/1",
        "MediaUrl2": "file:///etc/passwd", "ConversationSid": "CH9",
    }, received_at="2026-11-24T10:00:00.000+00:00")
    assert msg.sender == "+15551234567"
    # Only Twilio's own https media hosts become attachments (the receiver refuses the rest).
    assert [a.url for a in msg.attachments] == ["https://api.twilio.com/m/0",
                                                "https://media.twiliocdn.com/m/1"]
    assert msg.attachments[1].content_type == "application/octet-stream"
    assert msg.conversation_key() == "CH9"
    plain = parse_inbound({"MessageSid": "SM2", "From": "+15551234567", "To": "+15557654321"},
                          received_at="2026-11-24T10:00:00Z")
    assert plain.conversation_key() == "sms:+15551234567:+15557654321"
    assert plain.body == "" and plain.attachments == ()


@pytest.mark.parametrize(("params", "reason"), [
    ({"From": "+15551234567", "To": "+1555"}, "invalid-payload"),
    ({"MessageSid": "SM1", "From": "not a number", "To": "+15557654321"}, "invalid-sender"),
])
def test_parse_inbound_permanent_errors(params: dict[str, str], reason: str) -> None:
    with pytest.raises(PermanentError) as exc:
        parse_inbound(params, received_at="2026-11-24T10:00:00Z")
    assert exc.value.reason == reason


def test_missing_fields_counts_blank_as_missing() -> None:
    assert missing_fields({"MessageSid": " ", "From": "+1", "To": "x"}) == ["MessageSid"]


def test_signature_check_uses_url_and_every_param() -> None:
    from twilio.request_validator import RequestValidator

    url = "https://sb.example/webhooks/twilio/sms"
    params = {"MessageSid": "SM1", "Body": "hi"}
    sig = RequestValidator("tok").compute_signature(url, params)
    check = TwilioSignature("tok")
    assert check.is_valid(url, params, sig)
    assert not check.is_valid(url, {**params, "Body": "changed"}, sig)
    assert not check.is_valid(url + "?x=1", params, sig)
    assert not check.is_valid(url, params, None)
    assert not TwilioSignature("other").is_valid(url, params, sig)


@pytest.mark.parametrize(("raw", "clean"), [
    ("GET /Patient?phone=%2B15551234567,5551234567", "GET /Patient?phone=[phone],[phone]"),
    ("from +1 (555) 123-4567 and (555) 123-4567", "from [phone] and [phone]"),
    ("mail jane.doe+x@example.org now", "mail [email] now"),
    ("Authorization: Bearer abc.def-ghi", "Authorization: Bearer [redacted]"),
    ("Communication/2f7e1e3d-b0f9-4774-a1f4-0179b22a7f5f ok",
     "Communication/2f7e1e3d-b0f9-4774-a1f4-0179b22a7f5f ok"),
    ("task abc[SM0123456789abcdef] attempt 3", "task abc[SM0123456789abcdef] attempt 3"),
])
def test_redact(raw: str, clean: str) -> None:
    from worker.ops.logs import redact

    assert redact(raw) == clean


def test_redacting_filter_covers_args_and_tracebacks() -> None:
    import io
    import logging

    from worker.ops.logs import protect

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    protect(handler)
    logger = logging.getLogger("test.redaction")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("search %s", "Patient?phone=%2B15551234567")
        try:
            raise ValueError("bad reference Patient?phone=%2B15557654321 for jo@example.org")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    out = stream.getvalue()
    assert "5551234567" not in out and "5557654321" not in out and "jo@example.org" not in out
    assert "Patient?phone=[phone]" in out and "ValueError: bad reference" in out


def test_task_context_and_extras_are_redacted_on_every_line() -> None:
    import io
    import json
    import logging

    import structlog

    from worker.ops import logs

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("test.redaction.context")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logs.install(logger)
    try:
        # A message id is whatever a provider or caller sent: it may hold an address.
        logs.bind_task(task_id="t-1", task="switchboard.inbound.sms", queue="inbound",
                       message_id="<jo@example.org>")
        logger.info("one")
        # The same field bound again by other code, not through bind_task: redacted per line.
        structlog.contextvars.bind_contextvars(message_id="call +15551234567")
        logger.info("two")
        logs.unbind_task()
        structlog.contextvars.bind_contextvars(message_id="<jo@example.org>")
        logger.info("three")
        structlog.contextvars.clear_contextvars()
    finally:
        logger.removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line.get("message_id") for line in lines] == ["<[email]>", "call [phone]",
                                                          "<[email]>"]
    assert lines[0]["task_id"] == "t-1" and "task_id" not in lines[2]


def test_json_lines_carry_context_level_logger_time_and_a_redacted_traceback() -> None:
    import io
    import json
    import logging

    import structlog

    from worker.ops import logs

    def lines(protected: bool) -> list[dict[str, object]]:
        stream = io.StringIO()
        handler = logging.StreamHandler(stream)
        if protected:
            logs.protect(handler)
        handler.setFormatter(logs.formatter("json"))
        logger = logging.getLogger("test.json.lines")
        logger.handlers[:] = [handler]
        logger.propagate = False
        logger.setLevel(logging.DEBUG)
        logger.info("plain %s", "line")
        logger.warning("call +1 (555) 123-4567 or jo@example.org, Bearer abc.def")
        logs.bind_task(task_id="t-1", task="switchboard.outbound.send", queue="outbound",
                       message_id="<jo@example.org>")
        logger.error("Task %s[%s] received", "switchboard.outbound.send", "t-1")
        structlog.contextvars.bind_contextvars(extra="5551234567", count=3)
        logger.debug("ünïcode 555 123 4567")
        try:
            raise ValueError("Patient?phone=+15551234567")
        except ValueError:
            logger.exception("failed for %s", "jo@example.org")
        logs.unbind_task()
        out = [json.loads(line) for line in stream.getvalue().splitlines()]
        for line in out:
            assert isinstance(line.pop("timestamp"), str)
        return out

    # With the filter (as install() sets up every handler) and without it (a handler someone
    # added later): the formatter alone still redacts every field, the traceback included.
    for protected in (True, False):
        out = lines(protected)
        assert out[0] == {"event": "plain line", "level": "info", "logger": "test.json.lines"}
        assert out[1]["event"] == "call [phone] or [email], Bearer [redacted]"
        assert out[2] == {"event": "Task switchboard.outbound.send[t-1] received",
                          "task_id": "t-1", "task": "switchboard.outbound.send",
                          "queue": "outbound", "message_id": "<[email]>", "level": "error",
                          "logger": "test.json.lines"}
        assert out[3]["extra"] == "[phone]" and out[3]["count"] == 3
        assert out[3]["event"] == "ünïcode [phone]"
        assert out[4]["event"] == "failed for [email]"
        assert "ValueError: Patient?phone=[phone]" in str(out[4]["exception"])
        assert "5551234567" not in json.dumps(out) and "jo@example.org" not in json.dumps(out)
