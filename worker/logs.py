"""PHI-safe logging: our code logs ids and reasons only; this filter is the safety net.

Libraries log more than we would: httpx logs every request URL at INFO, and a FHIR search URL
carries the patient's phone number. Those loggers are turned down, and one filter on every
handler redacts phone numbers, emails and bearer tokens from whatever still gets through.
Message bodies cannot be recognised by a pattern, so they are never passed to a logger at all.
"""

from __future__ import annotations

import logging
import re

_PATTERNS = [
    (re.compile(r"(?i)bearer\s+[\w\-.~+/]+=*"), "Bearer [redacted]"),
    (re.compile(r"[\w.+\-]+(?:@|%40)[\w\-]+(?:\.[\w\-]+)+"), "[email]"),
    (re.compile(r"(?:\+|%2B)\d[\d\s().\-]{6,}\d"), "[phone]"),
    (re.compile(r"\(?\b\d{3}\)?[\s.\-]\d{3}[\s.\-]\d{4}\b"), "[phone]"),
    (re.compile(r"(?<![\w\-])1?\d{10}(?![\w\-])"), "[phone]"),
]
# Loggers that print URLs or payloads at INFO/DEBUG.
_CHATTY = ("httpx", "httpcore", "urllib3", "twilio.http_client", "python_http_client")


def redact(text: str) -> str:
    """`text` with phone numbers, email addresses and bearer tokens replaced."""
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


class RedactingFilter(logging.Filter):
    """Rewrites each record's final message through `redact` (args included)."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Redact in place; never drops a record."""
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not take logging down
            message = str(record.msg)
        record.msg = redact(message)
        record.args = None
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


def install(logger: logging.Logger | None = None) -> None:
    """Quiet chatty libraries and put the redacting filter on every handler of `logger`
    (default: root). Idempotent."""
    for name in _CHATTY:
        logging.getLogger(name).setLevel(logging.WARNING)
    target = logger or logging.getLogger()
    for handler in target.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
