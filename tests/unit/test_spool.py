"""The spool's record format (worker/broker/spool.py): pure functions over bytes."""

from __future__ import annotations

import struct

import pytest

from worker.broker.spool import (
    MAGIC,
    Damage,
    Record,
    Spooled,
    decode,
    encode,
    last_offset,
    scan,
)
from worker.crypto import Sealer, Tampered, UnknownKey, generate_key, parse_keys

SEALER = Sealer(parse_keys(generate_key()))
PHONE = "+15551239876"
BODY = "my chest hurts since Tuesday"


def sms_entry(n: int = 0) -> Spooled:
    return Spooled("switchboard.inbound_sms", "inbound",
                   [{"From": PHONE, "Body": f"{BODY} {n}", "MessageSid": f"SM{n:032d}"},
                    {"received_at": "2026-12-07T16:00:00.000+00:00"}],
                   f"sms:SM{n:032d}", id=f"{n:032x}", received_at=1_800_000_000.0 + n)


def records(data: bytes, start: int = 0) -> list[Record]:
    out = scan(data, start)
    assert not [r for r in out.records if isinstance(r, Damage)]
    return [r for r in out.records if isinstance(r, Record)]


def test_an_entry_comes_back_as_it_went_in() -> None:
    entries = [sms_entry(1), Spooled("switchboard.inbound_email", "inbound",
                                     [{"email_ref": "email-0123"}, {}], "email:email-0123",
                                     post=("email-0123", b"From: a@b\r\n\r\n\x00\xff" * 50))]
    data = b"".join(encode(e, SEALER) for e in entries)
    found = records(data)
    assert [decode(r.body, r.received_at, SEALER) for r in found] == entries
    assert found[-1].end == len(data) and scan(data).torn == 0


def test_a_record_has_no_phi_in_clear() -> None:
    entry = Spooled("t", "inbound", [{"From": PHONE, "Body": BODY}], "sms:x",
                    post=("ref", f"From: {PHONE}\r\n\r\n{BODY}".encode()))
    data = encode(entry, SEALER)
    for secret in (PHONE, PHONE[2:], BODY, "chest"):
        assert secret.encode() not in data
        assert secret.encode("utf-16-le") not in data


@pytest.mark.parametrize("cut", [1, 5, 19, 20, 21, 60, -1])
def test_a_torn_last_record_is_dropped_not_a_crash(cut: int) -> None:
    first, second = encode(sms_entry(1), SEALER), encode(sms_entry(2), SEALER)
    data = first + second[:cut if cut > 0 else len(second) + cut]
    out = scan(data)
    assert [type(r) for r in out.records] == [Record]
    assert out.torn == len(data) - len(first)


def test_a_tail_of_zeros_is_a_torn_record() -> None:
    # A crash after the file grew and before its data reached the disk reads back as zeros.
    first = encode(sms_entry(1), SEALER)
    out = scan(first + b"\x00" * 300)
    assert len(out.records) == 1 and out.torn == 300


def test_a_damaged_record_is_skipped_and_the_next_one_read() -> None:
    a, b, c = (encode(sms_entry(n), SEALER) for n in (1, 2, 3))
    broken = bytearray(a + b + c)
    broken[len(a) + 40] ^= 0xFF  # inside b's body
    out = scan(bytes(broken))
    assert [type(r) for r in out.records] == [Record, Damage, Record]
    assert out.records[1] == Damage(len(a), len(a) + len(b))
    assert decode(out.records[2].body, out.records[2].received_at, SEALER) == sms_entry(3)
    assert out.torn == 0


def test_a_damaged_length_does_not_swallow_what_follows() -> None:
    a, b = encode(sms_entry(1), SEALER), encode(sms_entry(2), SEALER)
    broken = bytearray(a + b)
    struct.pack_into(">I", broken, 4, 2**31)  # a's length field: far past the end
    out = scan(bytes(broken))
    assert [type(r) for r in out.records] == [Damage, Record]


def test_magic_inside_a_body_is_not_taken_for_a_record() -> None:
    entry = Spooled("t", "q", [], "k", post=("r", MAGIC * 100))
    assert len(records(encode(entry, SEALER) * 2)) == 2


def test_scanning_from_an_offset_reads_only_what_follows() -> None:
    a, b = encode(sms_entry(1), SEALER), encode(sms_entry(2), SEALER)
    assert [r.start for r in records(a + b, len(a))] == [len(a)]
    assert records(a + b, len(a + b)) == []


def test_a_record_sealed_with_another_key_is_told_from_a_changed_one() -> None:
    other = Sealer(parse_keys(generate_key()))
    (r,) = records(encode(sms_entry(1), other))
    with pytest.raises(UnknownKey):
        decode(r.body, r.received_at, SEALER)
    body = bytearray(r.body)
    body[-1] ^= 1
    with pytest.raises(Tampered):
        decode(bytes(body), r.received_at, other)


@pytest.mark.parametrize(("progress", "offset"), [
    (b"", 0),
    (struct.pack(">Q", 120), 120),
    (struct.pack(">QQ", 120, 480), 480),
    (struct.pack(">QQ", 120, 480)[:-3], 120),  # the last write torn by a crash
])
def test_progress_is_the_last_whole_offset(progress: bytes, offset: int) -> None:
    assert last_offset(progress) == offset
