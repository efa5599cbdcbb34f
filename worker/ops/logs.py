"""Structured, PHI-safe logs: JSON lines (structlog) with the task's context bound.

Our code logs ids and reasons only. Libraries log more than we would: httpx logs every request
URL at INFO, and a FHIR search URL carries the patient's phone number. Those loggers are turned
down, and one redaction step on every handler (a filter, then a structlog processor over every
field) removes phone numbers, emails and bearer tokens from whatever still gets through.
Message bodies cannot be recognised by a pattern, so they are never passed to a logger at all.
Every record carries the context bound for the current task (task id, task name, queue,
message id) through structlog's contextvars.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import MutableMapping
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

import structlog

_NO_DIGITS = str.maketrans("", "", "0123456789")
_TEN_DIGITS = ("ten digits",)  # a precondition of its own (see redact)

# (pattern, replacement, precondition): a pattern runs only on text that could hold a match,
# text holding one of the listed strings, or ten digits. Most strings logged (task names, ids,
# times) hold none, a worker logs a few lines per message, and the email pattern backtracks
# over every run of word characters (30 µs on a task line).
_PATTERNS: list[tuple[re.Pattern[str], str, tuple[str, ...] | None]] = [
    (re.compile(r"(?i)bearer\s+[\w\-.~+/]+=*"), "Bearer [redacted]", None),
    (re.compile(r"[\w.+\-]+(?:@|%40)[\w\-]+(?:\.[\w\-]+)+"), "[email]", ("@", "%40")),
    (re.compile(r"(?:\+|%2B)\d[\d\s().\-]{6,}\d"), "[phone]", ("+", "%2B")),
    (re.compile(r"\(?\b\d{3}\)?[\s.\-]\d{3}[\s.\-]\d{4}\b"), "[phone]", _TEN_DIGITS),
    (re.compile(r"(?<![\w\-])1?\d{10}(?![\w\-])"), "[phone]", _TEN_DIGITS),
    # A push token in a path (DELETE /v1/devices/<token> in the access log).
    (re.compile(r"/v1/devices/[^\s?\"']+"), "/v1/devices/[token]", ("/v1/devices/",)),
]
# Loggers that print URLs or payloads at INFO/DEBUG.
_CHATTY = ("httpx", "httpcore", "urllib3", "twilio.http_client", "python_http_client",
           "google.auth")
# Fields our own formatter adds (time, level, logger name): never anything to redact.
_OURS = frozenset({"timestamp", "level", "logger"})
# The task context as bind_task bound it, already redacted: every line of the task carries it,
# so it is redacted once at binding rather than on every line (it was 4 of 5 redactions per
# line). A field is skipped only while it is that very object; anything else under the same
# name is redacted as usual.
_BOUND: ContextVar[dict[str, str] | None] = ContextVar("switchboard_bound", default=None)


def redact(text: str) -> str:
    """`text` with phone numbers, email addresses and bearer tokens replaced."""
    # The preconditions are read on the text as given: a replacement never adds a digit, an
    # `@`, a `+` or a path, so what the original lacks the rewritten text lacks too. `\d` also
    # matches other scripts' digits: outside ASCII the digit patterns always look.
    ten = not text.isascii() or len(text) - len(text.translate(_NO_DIGITS)) >= 10
    original = text
    for pattern, replacement, needs in _PATTERNS:
        if needs is None or (ten if needs is _TEN_DIGITS else
                             any(part in original for part in needs)):
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
        record.switchboard_redacted = True  # the message; _redact_fields need not look again
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


def _redact_fields(_: Any, __: str, event: MutableMapping[str, Any],
                   record: logging.LogRecord | None = None) -> MutableMapping[str, Any]:
    """structlog processor: redact every string field (event text, exception, extras)."""
    record = event.get("_record", record)
    done = (record is not None and getattr(record, "switchboard_redacted", False)
            and event.get("event") == record.msg)
    bound = _BOUND.get() or {}
    for key, value in list(event.items()):
        if (isinstance(value, str) and key not in _OURS and not (done and key == "event")
                and bound.get(key) is not value):
            event[key] = redact(value)
    return event


def _record_exception(_: Any, __: str, event: MutableMapping[str, Any]
                      ) -> MutableMapping[str, Any]:
    # RedactingFilter already turned the traceback into (redacted) exc_text: keep it.
    record = event.get("_record")
    if record is not None and record.exc_text:
        event["exception"] = record.exc_text
    return event


class JsonLines(logging.Formatter):
    """One JSON object per record, exactly as the structlog chain below renders it for the
    JSON format (the message, the bound task context, level, logger, time, exception), with
    every string field redacted, in a quarter of its time (about 5 µs instead of 20 µs a line:
    a worker writes three lines per message, and the send is CPU-bound). The console format
    still goes through structlog."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as one JSON line."""
        event: dict[str, Any] = {"event": record.getMessage()}
        if record.stack_info:
            event["stack_info"] = record.stack_info
        for key, value in structlog.contextvars.get_contextvars().items():
            event.setdefault(key, value)
        event["level"] = record.levelname.lower()
        event["logger"] = record.name
        event["timestamp"] = datetime.now(tz=UTC).isoformat().replace("+00:00", "Z")
        if record.exc_info and not record.exc_text:  # a handler without RedactingFilter
            record.exc_text = _FORMATTER.formatException(record.exc_info)
        if record.exc_text:
            event["exception"] = record.exc_text
        _redact_fields(None, "", event, record)
        return json.dumps(event, default=repr)


def formatter(fmt: str = "json") -> logging.Formatter:
    """A stdlib Formatter that renders records as JSON lines (or console text)."""
    return JsonLines() if fmt == "json" else structlog_formatter(fmt)


def structlog_formatter(fmt: str) -> logging.Formatter:
    """The structlog chain behind the console format (and the reference JsonLines matches)."""
    renderer: Any = (structlog.processors.JSONRenderer() if fmt == "json"
                     else structlog.dev.ConsoleRenderer(colors=False))
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.contextvars.merge_contextvars,
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _record_exception,
        ],
        processors=[
            _redact_fields,  # first: it reads the record (_record), which the next one drops
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
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
        if not isinstance(handler.formatter, JsonLines | structlog.stdlib.ProcessorFormatter):
            handler.setFormatter(formatter(fmt))


def bind_task(**context: str | None) -> None:
    """Bind task context (task_id, task, queue, message_id) to every log record of this task."""
    structlog.contextvars.clear_contextvars()
    bound = {k: redact(v) for k, v in context.items() if v}
    _BOUND.set(bound)
    structlog.contextvars.bind_contextvars(**bound)


def unbind_task() -> None:
    """Forget the task context (the thread goes on to another task)."""
    structlog.contextvars.clear_contextvars()
    _BOUND.set(None)
