"""Structured, PHI-safe logs: structlog's stdlib `ProcessorFormatter` renders every record.

Our code logs ids and reasons only. Libraries log more than we would: httpx logs every request
URL at INFO, and a FHIR search URL carries the patient's phone number. Those loggers are turned
down, and one redaction step on every handler (a filter, then a structlog processor over every
field) removes phone numbers, emails and bearer tokens from whatever still gets through.
Message bodies cannot be recognised by a pattern, so they are never passed to a logger at all.
Every record carries the context bound for the current task (task id, task name, queue,
message id) through structlog's contextvars.
"""

from __future__ import annotations

import logging
import re
from collections.abc import MutableMapping
from typing import Any

import structlog

# (pattern, replacement). No library recognises PHI in free text, so these are ours.
_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"(?i)bearer\s+[\w\-.~+/]+=*"), "Bearer [redacted]"),
    (re.compile(r"[\w.+\-]+(?:@|%40)[\w\-]+(?:\.[\w\-]+)+"), "[email]"),
    (re.compile(r"(?:\+|%2B)\d[\d\s().\-]{6,}\d"), "[phone]"),
    (re.compile(r"\(?\b\d{3}\)?[\s.\-]\d{3}[\s.\-]\d{4}\b"), "[phone]"),
    (re.compile(r"(?<![\w\-])1?\d{10}(?![\w\-])"), "[phone]"),
    # A push token in a path (DELETE /v1/devices/<token> in the access log).
    (re.compile(r"/v1/devices/[^\s?\"']+"), "/v1/devices/[token]"),
]
# Loggers that print URLs or payloads at INFO/DEBUG.
_CHATTY = ("httpx", "httpcore", "urllib3", "twilio.http_client", "python_http_client",
           "google.auth")
# Fields the formatter adds (time, level, logger name): never anything to redact.
_OURS = frozenset({"timestamp", "level", "logger"})


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


def _redact_fields(_: Any, __: str, event: MutableMapping[str, Any]
                   ) -> MutableMapping[str, Any]:
    """structlog processor: redact every string field (event text, exception, bound context)."""
    for key, value in event.items():
        if isinstance(value, str) and key not in _OURS:
            event[key] = redact(value)
    return event


def _record_exception(_: Any, __: str, event: MutableMapping[str, Any]
                      ) -> MutableMapping[str, Any]:
    # RedactingFilter already turned the traceback into (redacted) exc_text: keep it.
    record = event.get("_record")
    if record is not None and record.exc_text:
        event["exception"] = record.exc_text
    return event


def formatter(fmt: str = "json") -> logging.Formatter:
    """A stdlib Formatter rendering records through structlog: JSON lines or console text."""
    renderer: Any = (structlog.processors.JSONRenderer() if fmt == "json"
                     else structlog.dev.ConsoleRenderer(colors=False))
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.contextvars.merge_contextvars,
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _record_exception,
            # A handler without RedactingFilter still has exc_info: render it here, so the
            # traceback goes through _redact_fields like every other field.
            structlog.processors.format_exc_info,
        ],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            _redact_fields,  # last before rendering: nothing is added after it
            renderer,
        ],
    )


def install(*loggers: logging.Logger, fmt: str = "json") -> None:
    """Quiet chatty libraries; give every handler of the root logger, of `loggers` and the
    last-resort handler the redacting filter and the structured formatter. Idempotent; call
    again after a framework adds handlers."""
    for name in _CHATTY:
        logging.getLogger(name).setLevel(logging.WARNING)
    handlers = [h for logger in (logging.getLogger(), *loggers) for h in logger.handlers]
    if logging.lastResort is not None:
        handlers.append(logging.lastResort)
    for handler in handlers:
        protect(handler)
        if not isinstance(handler.formatter, structlog.stdlib.ProcessorFormatter):
            handler.setFormatter(formatter(fmt))


def bind_task(**context: str | None) -> None:
    """Bind task context (task_id, task, queue, message_id) to every log record of this task."""
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(**{k: v for k, v in context.items() if v})


def unbind_task() -> None:
    """Forget the task context (the thread goes on to another task)."""
    structlog.contextvars.clear_contextvars()
