"""Sealing: what Switchboard keeps in Redis that can carry PHI is encrypted at rest.

One pair of functions for every store and the broker: `seal` / `open` (text), `seal_bytes` /
`open_bytes` and `seal_json` / `open_json`, all on a `Sealer` built from DATA_ENCRYPTION_KEYS.

The cipher is AES-256-GCM (authenticated: a changed byte fails to open) from `cryptography`.
Every sealed value names the key that sealed it by a key id (4 bytes of a SHA-256 of the key;
it says which key, never what it is), so:
- the first configured key seals, every configured key opens (roll a key out by adding it
  first, retire the old one once `switchboard keys rotate` has re-sealed what it sealed);
- a value sealed with a key that is no longer configured is told apart from a tampered one
  (`UnknownKey` versus `Tampered`), and kept as it is until that key comes back.

Binary form (broker message bodies, which kombu base64-encodes itself):
    version (1 byte, 0x01) | key id (4) | nonce (12, random) | ciphertext + GCM tag (16)
with version and key id as associated data. Text form (store values): "sb1:" + base64 of it.
Random 96-bit nonces are safe for about 2^32 values per key: rotate keys long before that.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

VERSION = b"\x01"
PREFIX = "sb1:"
KEY_BYTES = 32
_HEAD = 1 + 4  # version + key id
_NONCE = 12
_MIN_TOKEN = _HEAD + _NONCE + 16


class Unsealable(Exception):
    """A value that cannot be opened with the configured keys. The message never holds a key
    or any of the sealed content: only a key id or what is wrong with the shape."""


class UnknownKey(Unsealable):
    """Sealed with a key that is not configured (any more, or not yet)."""

    def __init__(self, kid: str) -> None:
        super().__init__(f"sealed with key id {kid}, which is not configured")
        self.kid = kid


class Tampered(Unsealable):
    """Not a sealed value, or changed after sealing (authentication failed)."""


def generate_key() -> str:
    """A new random key, as DATA_ENCRYPTION_KEYS takes it (URL-safe base64 of 32 bytes)."""
    return base64.urlsafe_b64encode(os.urandom(KEY_BYTES)).decode()


def parse_keys(text: str) -> list[bytes]:
    """The keys of a DATA_ENCRYPTION_KEYS value (comma-separated, first seals). ValueError
    names the position of a bad key, never its value."""
    parts = [p.strip() for p in text.split(",")]
    if not any(parts):
        raise ValueError("no key given (make one with `switchboard keys generate`)")
    keys: list[bytes] = []
    for n, part in enumerate(parts, start=1):
        try:
            key = base64.urlsafe_b64decode(part.encode("ascii")) if part else b""
        except (binascii.Error, ValueError, UnicodeEncodeError):
            key = b""
        if len(key) != KEY_BYTES:
            raise ValueError(f"key {n} of {len(parts)} is not a key: expected URL-safe base64 "
                             f"of {KEY_BYTES} bytes (44 characters), as printed by "
                             "`switchboard keys generate`")
        keys.append(key)
    return keys


def key_id(key: bytes) -> bytes:
    """The 4-byte id of a key (safe to show: it cannot be turned back into the key)."""
    return hashlib.sha256(b"switchboard data key id\0" + key).digest()[:4]


class Sealer:
    """Seals with the first key, opens with any; thread-safe (AESGCM objects are)."""

    def __init__(self, keys: Sequence[bytes]) -> None:
        if not keys:
            raise ValueError("a Sealer needs at least one key")
        self._ciphers: dict[bytes, AESGCM] = {}
        for key in keys:
            self._ciphers.setdefault(key_id(key), AESGCM(key))
        self._kid = key_id(keys[0])
        self._head = VERSION + self._kid
        self._seal_with = self._ciphers[self._kid]

    @classmethod
    def from_text(cls, text: str) -> Sealer:
        """A Sealer for a DATA_ENCRYPTION_KEYS value."""
        return cls(parse_keys(text))

    @property
    def current_id(self) -> str:
        """Hex id of the key that seals."""
        return self._kid.hex()

    @property
    def key_ids(self) -> list[str]:
        """Hex ids of every key that opens (the sealing one first)."""
        return [self.current_id] + [k.hex() for k in self._ciphers if k != self._kid]

    def merged(self, other: Sealer) -> Sealer:
        """A Sealer sealing as this one and opening with the keys of both."""
        out = Sealer.__new__(Sealer)
        out._ciphers = {**other._ciphers, **self._ciphers}
        out._kid, out._head, out._seal_with = self._kid, self._head, self._seal_with
        return out

    # -- bytes ---------------------------------------------------------------------------------

    def seal_bytes(self, data: bytes) -> bytes:
        """`data` sealed with the current key (binary form)."""
        nonce = os.urandom(_NONCE)
        return self._head + nonce + self._seal_with.encrypt(nonce, data, self._head)

    def open_bytes(self, token: bytes) -> bytes:
        """The data in a binary sealed value; raises UnknownKey or Tampered."""
        if len(token) < _MIN_TOKEN or token[:1] != VERSION:
            raise Tampered("not a sealed value")
        head = token[:_HEAD]
        cipher = self._ciphers.get(head[1:])
        if cipher is None:
            raise UnknownKey(head[1:].hex())
        try:
            return cipher.decrypt(token[_HEAD:_HEAD + _NONCE], token[_HEAD + _NONCE:], head)
        except InvalidTag:
            raise Tampered("sealed value failed authentication (changed after sealing)") \
                from None

    def sealed_with(self, token: bytes) -> str | None:
        """Hex id of the key that sealed a binary value (None: not a sealed value)."""
        if len(token) < _MIN_TOKEN or token[:1] != VERSION:
            return None
        return token[1:_HEAD].hex()

    # -- text ----------------------------------------------------------------------------------

    def seal(self, data: bytes | str) -> str:
        """`data` sealed with the current key, as text ("sb1:…")."""
        raw = data.encode() if isinstance(data, str) else data
        return PREFIX + base64.b64encode(self.seal_bytes(raw)).decode("ascii")

    def open(self, token: str) -> bytes:
        """The data in a text sealed value; raises UnknownKey or Tampered."""
        return self.open_bytes(text_to_bytes(token))

    def seal_json(self, value: Any) -> str:
        """A JSON-able value sealed as text."""
        return self.seal(json.dumps(value, separators=(",", ":")))

    def open_json(self, token: str) -> Any:
        """The value of `seal_json`."""
        return json.loads(self.open(token))

    def is_current(self, token: str) -> bool:
        """True if a text value is sealed with the current key (rotation skips it)."""
        try:
            return self.sealed_with(text_to_bytes(token)) == self.current_id
        except Tampered:
            return False

    def reseal(self, token: str) -> str:
        """The same data sealed with the current key; raises UnknownKey or Tampered."""
        return self.seal(self.open(token))


def is_sealed(value: object) -> bool:
    """True if `value` is a text sealed value (as opposed to a clear one from before sealing)."""
    return isinstance(value, str) and value.startswith(PREFIX)


def text_to_bytes(token: str) -> bytes:
    """The binary form of a text sealed value; Tampered if it is not one."""
    if not is_sealed(token):
        raise Tampered("not a sealed value")
    try:
        return base64.b64decode(token[len(PREFIX):], validate=True)
    except (binascii.Error, ValueError):
        raise Tampered("not a sealed value") from None


def bytes_to_text(token: bytes) -> str:
    """The text form of a binary sealed value."""
    return PREFIX + base64.b64encode(token).decode("ascii")


@functools.lru_cache(maxsize=16)
def sealer_for(text: str) -> Sealer:
    """The Sealer of a DATA_ENCRYPTION_KEYS value, built once per process."""
    return Sealer.from_text(text)
