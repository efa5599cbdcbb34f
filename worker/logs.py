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
        if record.exc_info and not record.exc_text:
            # Format the traceback now so its text (exception messages can hold a URL with a
            # phone number) is redacted too; handlers then print exc_text as it is.
            record.exc_text = _FORMATTER.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        record.exc_info = None
        return True


_FORMATTER = logging.Formatter()


def protect(handler: logging.Handler) -> None:
    """Put the redacting filter on one handler (idempotent)."""
    if not any(isinstance(f, RedactingFilter) for f in handler.filters):
        handler.addFilter(RedactingFilter())


def install(*loggers: logging.Logger) -> None:
    """Quiet chatty libraries and protect every handler of the root logger, of `loggers`, and
    the last-resort handler. Call again after a framework adds handlers."""
    for name in _CHATTY:
        logging.getLogger(name).setLevel(logging.WARNING)
    for logger in (logging.getLogger(), *loggers):
        for handler in logger.handlers:
            protect(handler)
    if logging.lastResort is not None:
        protect(logging.lastResort)
