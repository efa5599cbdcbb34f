"""Sealing at rest: round trips, tampering, keys, rotation, and messages sealed with a lost key."""

from __future__ import annotations

import base64
import json

import fakeredis
import pytest
from kombu.serialization import dumps as kombu_dumps
from kombu.serialization import loads as kombu_loads

from worker.broker.celery_app import (
    SEALED_CONTENT_TYPE,
    UNDECRYPTABLE,
    open_body,
    register_sealed,
    undecryptable,
)
from worker.crypto import (
    Sealer,
    Tampered,
    UnknownKey,
    generate_key,
    parse_keys,
    sealer_for,
    text_to_bytes,
)
from worker.settings import ConfigError, load_settings
from worker.stores.dead_letters import DeadLetterStore

OLD, NEW = generate_key(), generate_key()
PHONE, BODY = "+15550001111", "my test results are in"
ARGS = [{"From": PHONE, "Body": BODY, "MessageSid": "SM1"}, {"received_at": "t"}]
EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def test_round_trip_bytes_text_and_json() -> None:
    s = sealer_for(OLD)
    assert s.open_bytes(s.seal_bytes(b"\x00\xffbinary")) == b"\x00\xffbinary"
    token = s.seal(BODY)
    assert token.startswith("sb1:") and BODY not in token
    assert s.open(token) == BODY.encode()
    assert s.open_json(s.seal_json({"to": PHONE, "n": [1, 2]})) == {"to": PHONE, "n": [1, 2]}
    # A fresh nonce each time: the same value never seals the same way twice.
    assert s.seal(BODY) != s.seal(BODY)


def test_tampering_is_detected() -> None:
    s = sealer_for(OLD)
    raw = bytearray(s.seal_bytes(BODY.encode()))
    for position in (len(raw) - 1, 20, 5):  # tag, ciphertext, nonce
        changed = bytearray(raw)
        changed[position] ^= 1
        with pytest.raises(Tampered):
            s.open_bytes(bytes(changed))
    for junk in (b"", b"\x01abcd", b"\x02" + bytes(raw[1:]), BODY.encode()):
        with pytest.raises(Tampered):
            s.open_bytes(junk)
    for text in ("", "plain text", "sb1:not base64!", "sb1:" + base64.b64encode(b"x").decode()):
        with pytest.raises(Tampered):
            s.open(text)


def test_a_key_not_configured_is_named_by_id_not_mistaken_for_tampering() -> None:
    token = sealer_for(OLD).seal(BODY)
    with pytest.raises(UnknownKey) as exc:
        sealer_for(NEW).open(token)
    assert exc.value.kid == sealer_for(OLD).current_id
    assert OLD not in str(exc.value) and NEW not in str(exc.value)


def test_first_key_seals_every_key_opens() -> None:
    old_token = sealer_for(OLD).seal(BODY)
    both = sealer_for(f"{NEW}, {OLD}")
    assert both.current_id == sealer_for(NEW).current_id
    assert both.key_ids == [sealer_for(NEW).current_id, sealer_for(OLD).current_id]
    assert both.open(old_token) == BODY.encode()
    new_token = both.seal(BODY)
    assert sealer_for(NEW).open(new_token) == BODY.encode()
    with pytest.raises(UnknownKey):
        sealer_for(OLD).open(new_token)
    assert both.is_current(new_token) and not both.is_current(old_token)


@pytest.mark.parametrize("text", ["", " , ", "short", OLD + ",", OLD[:-2],
                                  base64.urlsafe_b64encode(b"k" * 16).decode()])
def test_malformed_keys_are_refused_without_echoing_them(text: str) -> None:
    with pytest.raises(ValueError) as exc:
        parse_keys(text)
    for part in text.split(","):
        if part.strip():
            assert part.strip() not in str(exc.value)


def test_settings_require_a_valid_key_and_never_print_it() -> None:
    good = {"REDIS_URL": "redis://h:1/0", "FHIR_BASE_URL": "https://f/fhir/R4/",
            "FHIR_CLIENT_ID": "i", "FHIR_CLIENT_SECRET": "s", "TWILIO_ACCOUNT_SID": "AC1",
            "TWILIO_AUTH_TOKEN": "t", "PUBLIC_BASE_URL": "https://p"}
    with pytest.raises(ConfigError) as missing:
        load_settings(good)
    assert any(p.startswith("DATA_ENCRYPTION_KEYS: missing") and "keys generate" in p
               for p in missing.value.problems)
    bad = OLD[:30]
    with pytest.raises(ConfigError) as malformed:
        load_settings({**good, "DATA_ENCRYPTION_KEYS": f"{OLD},{bad}"})
    text = str(malformed.value)
    assert "key 2 of 2" in text and bad not in text and OLD not in text
    settings = load_settings({**good, "DATA_ENCRYPTION_KEYS": OLD})
    assert OLD not in repr(settings) and OLD not in str(settings.model_dump())


def test_task_bodies_go_through_kombu_sealed() -> None:
    name = register_sealed(sealer_for(OLD))
    content_type, encoding, data = kombu_dumps([ARGS, {}, EMBED], serializer=name)
    assert (content_type, encoding) == (SEALED_CONTENT_TYPE, "binary")
    assert PHONE.encode() not in data and BODY.encode() not in data
    assert kombu_loads(data, content_type, encoding) == [ARGS, {}, EMBED]


def test_a_body_sealed_with_an_unknown_key_becomes_the_undecryptable_placeholder() -> None:
    token = sealer_for(OLD).seal_bytes(json.dumps([ARGS, {}, EMBED]).encode())
    body = open_body(sealer_for(NEW), token)
    held = undecryptable(body[0])
    assert held is not None and held["why"] == "unknown-key"
    assert text_to_bytes(held[UNDECRYPTABLE]) == token  # the sealed payload is kept as it was
    assert undecryptable(open_body(sealer_for(OLD), token)[0]) is None
    damaged = token[:-1] + bytes([token[-1] ^ 1])
    assert (undecryptable(open_body(sealer_for(OLD), damaged)[0]) or {})["why"] == "tampered"


def test_undecryptable_dead_letter_replays_once_the_key_is_back() -> None:
    r = fakeredis.FakeRedis()
    token = sealer_for(OLD).seal_bytes(json.dumps([ARGS, {}, EMBED]).encode())
    placeholder = open_body(sealer_for(NEW), token)[0]
    without = DeadLetterStore(r, sealer_for(NEW))
    entry = without.record("switchboard.inbound.sms", "inbound", placeholder, {},
                           "undecryptable", "sealed with a key not configured", 1)
    raw = r.hget("switchboard:dlq:entries", entry.id)
    assert PHONE.encode() not in raw and BODY.encode() not in raw
    assert json.loads(raw)["reason"] == "undecryptable"  # readable for `dlq list --reason`
    with pytest.raises(UnknownKey):
        without.replay_payload(without.get(entry.id))  # type: ignore[arg-type]
    back = DeadLetterStore(r, sealer_for(f"{NEW},{OLD}"))
    assert back.replay_payload(back.get(entry.id)) == (ARGS, {})  # type: ignore[arg-type]


def test_dead_letters_keep_filters_readable_and_payload_sealed() -> None:
    r = fakeredis.FakeRedis()
    store = DeadLetterStore(r, sealer_for(OLD))
    entry = store.record("switchboard.inbound.sms", "inbound", ARGS, {}, "fhir-400",
                         f"Patient {PHONE} invalid", 2)
    raw = r.hget("switchboard:dlq:entries", entry.id)
    assert PHONE.encode() not in raw and BODY.encode() not in raw
    stored = json.loads(raw)
    assert {k: stored[k] for k in ("task", "queue", "reason", "attempts")} == {
        "task": "switchboard.inbound.sms", "queue": "inbound", "reason": "fhir-400",
        "attempts": 2}
    assert store.get(entry.id) == entry and entry.detail == f"Patient {PHONE} invalid"
    assert [e.id for e in store.query(reason="fhir-400")] == [entry.id]
    # With the key gone, the entry is still listed and filtered, shown as sealed.
    lost = DeadLetterStore(r, sealer_for(NEW)).query(reason="fhir-400")
    assert [(e.id, e.opened, e.args) for e in lost] == [(entry.id, False, [])]


def test_sealers_merge_for_opening_only() -> None:
    merged = Sealer(parse_keys(NEW)).merged(Sealer(parse_keys(OLD)))
    assert merged.current_id == sealer_for(NEW).current_id
    assert merged.open(sealer_for(OLD).seal(BODY)) == BODY.encode()
