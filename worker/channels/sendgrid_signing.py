"""SendGrid's signed webhooks (Event Webhook and Inbound Parse security policy): ECDSA checks.

One place for the check both SendGrid webhooks use (web/webhooks/sendgrid.py for Inbound Parse,
worker.channels.sendgrid.EventSignature for the Event Webhook). SendGrid signs with ECDSA over
P-256 and SHA-256; the signature (base64 DER) comes in `X-Twilio-Email-Event-Webhook-Signature`,
the time it signed at (epoch seconds) in `X-Twilio-Email-Event-Webhook-Timestamp`, and the
signed bytes are the timestamp followed by the exact raw request body. The SDK's `EventWebhook`
helper takes the body as a `str` and encodes it as UTF-8, which cannot reproduce a multipart body
with binary attachments, so the check here works on bytes (same key format, same scheme).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import re

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

SIGNATURE_HEADER = "X-Twilio-Email-Event-Webhook-Signature"
TIMESTAMP_HEADER = "X-Twilio-Email-Event-Webhook-Timestamp"
# A signed request older than this is refused (a captured request replayed later), and so is
# one dated this far in the future (it would stay replayable for longer).
MAX_AGE_SECONDS = 600
_TIMESTAMP = re.compile(r"[0-9]{1,12}")


class InvalidVerificationKey(ValueError):
    """The configured verification key is not a base64 P-256 public key."""


def load_verification_key(key_b64: str) -> ec.EllipticCurvePublicKey:
    """The public key SendGrid shows (base64 DER SubjectPublicKeyInfo, no PEM armour)."""
    try:
        der = base64.b64decode("".join(key_b64.split()), validate=True)
        key = serialization.load_der_public_key(der)
    except (ValueError, TypeError, binascii.Error, UnsupportedAlgorithm) as exc:
        raise InvalidVerificationKey("not a base64 public key") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise InvalidVerificationKey("not an ECDSA P-256 public key")
    return key


def verify_signed_request(key: ec.EllipticCurvePublicKey, body: bytes, signature: str | None,
                          timestamp: str | None, now: float,
                          max_age_seconds: int = MAX_AGE_SECONDS) -> str | None:
    """None when `signature` is SendGrid's ECDSA signature of `timestamp + body` and the
    timestamp is within `max_age_seconds` of `now`; otherwise the reason it is not."""
    if not signature or not timestamp:
        return "unsigned"
    if not _TIMESTAMP.fullmatch(timestamp):  # exactly digits: what SendGrid sends and signs
        return "bad-signature"
    if abs(now - int(timestamp)) > max_age_seconds:
        return "stale-timestamp"
    try:
        der = base64.b64decode(signature.strip(), validate=True)
    except (binascii.Error, ValueError):
        return "bad-signature"
    try:
        key.verify(der, timestamp.encode() + body, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        return "bad-signature"
    return None


def sign_request(private_key: ec.EllipticCurvePrivateKey, body: bytes, timestamp: str
                 ) -> str:
    """The signature header value SendGrid would send (for the provider sandbox and tests)."""
    der = private_key.sign(timestamp.encode() + body, ec.ECDSA(hashes.SHA256()))
    return base64.b64encode(der).decode()


def public_key_b64(private_key: ec.EllipticCurvePrivateKey) -> str:
    """The base64 public key, as SendGrid shows it, of `private_key`."""
    der = private_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(der).decode()


def basic_auth_ok(configured: str, authorization: str | None) -> bool:
    """True when an `Authorization: Basic …` header carries exactly `configured` ("user:pass"),
    compared in constant time. An empty configuration matches nothing."""
    if not configured or not authorization:
        return False
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        given = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        return False
    return hmac.compare_digest(given, configured.encode())
