"""SendGrid Inbound Parse: a posted email → a plain record → an InboundMessage (worker).

The receiver only checks the post's shape (`form_parts`: the exact multipart framing the
signature must bind, no repeated fields, a bounded number of parts) and enqueues its bytes; the
worker reads them in two stages, the sender first from cheap, bounded reads (`read_form`,
`read_sender`), then, for an admitted sender, the whole email (`read_record`), with bounds on
parts, nesting, time and the text given to the quote stripper and html2text, so one hostile
email can stall neither the receiver nor a worker (`read_post` does both stages at once).

`read_record` turns the post into a JSON-able *email record* (`parse_request`): both Inbound
Parse modes, the parsed multipart form (`headers`, `from`, `to`, `subject`, `text`, `html`,
`envelope`, `charsets`, `SPF`, `dkim`, `attachment-info`, `attachmentN` files) and the raw
MIME message (field `email`), end in the same shape. Every text is decoded with the charset
the email declares, and a wrong or unknown one never raises. An email over EMAIL_MAX_BYTES
keeps its text and names the attachments it leaves out. The worker judges the sender
(`sender_authentication`) and builds the channel-neutral message (`to_inbound`).

Nothing outside this module knows SendGrid's field names.
"""

from __future__ import annotations

import base64
import hashlib
import html as html_module
import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from email import policy
from email.feedparser import BytesFeedParser
from email.headerregistry import Address
from email.message import EmailMessage
from email.parser import BytesParser, HeaderParser
from email.utils import collapse_rfc2231_value, getaddresses, parseaddr
from html.parser import HTMLParser
from typing import Any

from worker.channels.sendgrid import (
    CHANNEL,
    EMAIL_INBOUND_MESSAGE_ID_SYSTEM,
    MEDIUM_CODE,
    clean_subject,
)
from worker.errors import PermanentError
from worker.messages import Attachment, InboundMessage, fit_text

# SendGrid refuses emails over 30 MB; the form or raw message is a little larger than that.
MAX_REQUEST_BYTES = 40 * 1024 * 1024
# Bounds on a post's form: SendGrid's parsed mode sends about 20 fields plus `attachmentN`
# files (N has at most three digits), raw mode about 10 fields. A part's headers are a line or
# two. Anything beyond these is not SendGrid's.
MAX_FORM_PARTS = 1024
MAX_PART_HEADER_BYTES = 2 * 1024
MAX_PART_HEADER_PARAMS = 16
MAX_PART_HEADER_LINES = 8
# The receiver reads the sender from at most this much (a From field; a raw email's headers,
# long References chains included).
MAX_FROM_BYTES = 4 * 1024
MAX_EMAIL_HEADER_BYTES = 256 * 1024
# Bounds on the MIME message of raw mode, checked on its bytes before the parser sees them:
# the standard library's parser costs about 100 µs per part (a 7.5 MB email of 200k one-line
# parts took minutes), and walking a structure nested 1,200 deep raises RecursionError.
# Real emails have a few multiparts and a few dozen parts; these leave room for big forwards
# (500 parts of 16-parameter headers: 1.6 s of parsing; 2,000: 6.3 s).
MAX_MIME_MULTIPARTS = 64  # boundary declarations, so also the deepest nesting
MAX_MIME_PARTS = 500  # delimiter lines of those boundaries; also parts the parser makes
# The byte count above is only an estimate (a parser splits on a lone CR, honours RFC 2231's
# `boundary*=`...): the bound that holds is counted as the parser goes (_PartCounter), which
# stops it at the (MAX_MIME_PARTS + 1)th part it makes. A backstop on the time of one parse,
# checked between chunks of _PARSE_CHUNK fed to the parser (a chunk holds at most a few
# hundred ms of work: parts are bounded, headers are linear): the bounds keep a 40 MB email to
# a few seconds; this ends anything they missed.
MAX_PARSE_SECONDS = 60.0
_PARSE_CHUNK = 64 * 1024
# policy.default parses a header when it is read, in time that grows with the square of its
# length: a To of 20,000 addresses (140 KB) took 21 s, of 40,000 89 s; a Content-Type of 2,000
# parameters 1.3 s. Each header of the message and its parts must stay under these (a To of
# 500 recipients is about 15 KB; DKIM and Authentication-Results have about 10 parameters).
# Content-Type and Content-Disposition are read several times per part (2,000 parts of 60
# parameters: 25 s): real ones have a handful of parameters.
MAX_HEADER_CHARS = 32 * 1024
MAX_HEADER_PARAMS = 64
MAX_MIME_HEADER_PARAMS = 16
# ... and at most this long: a part's Content-Disposition is parsed each time it is read (a few
# times per part), in time growing with its words: 0.8 s per 30 KB filename (500 such parts:
# minutes), 72 ms at 4 KB, 28 ms at 2 KB. Real ones are a few hundred bytes; a long non-ASCII
# filename in RFC 2231 continuations meets the parameter bound before this one.
MAX_MIME_HEADER_CHARS = 2 * 1024
_MIME_HEADERS = ("content-type", "content-disposition")
# `boundary=`, and RFC 2231's `boundary*=` and `boundary*0=` continuations (the stdlib honours
# them all): each counts as a declaration.
_BOUNDARY_DECLARED = re.compile(rb'boundary(?:\*[0-9]{0,3}\*?)?\s*=\s*"?([^"\s;]{1,200})', re.I)
# Of the topmost Authentication-Results header (the only one read, see sender_authentication)
# only this much is searched: a real one is under 2 KB, and the patterns backtrack.
MAX_AUTH_RESULTS_CHARS = 8 * 1024
# mail-parser-reply's regexes span lines and backtrack: measured on this project's 2-core
# machine under load, its worst inputs found ("On ", "Op " repeated) take 0.3 s at 2,000
# characters, 2.3 s at 8,000 and 187 s at 90 KB, holding the GIL (so every thread of the worker)
# throughout. It only ever sees the first MAX_STRIP_CHARS of a body; the full text stays in the
# kept original (worker/inbound/email.py). Runs of blank lines, another slow case (8,000
# newlines: 11 s), are folded to one blank line first (the library strips each line anyway).
MAX_STRIP_CHARS = 2000
_BLANK_RUN = re.compile(r"\n[ \t\r\f\v]*(?:\n[ \t\r\f\v]*)+\n")
# html2text is pure Python (it lets other threads run, so a worker thread is held, not the
# process) and costs about 3 s per MB of ordinary HTML: the text shown is made from the first
# MAX_HTML_CHARS; the full HTML stays in the kept original (worker/inbound/email.py).
MAX_HTML_CHARS = 100_000
# html2text indents every line by the depth of the lists and quotes around it, so its time and
# output grow with the square of that depth: `<ol><li>` 4,000 times (32 KB) took 2.2 s and made
# 24 MB of text, 8,000 times 19.7 s and 96 MB (blockquotes: 4 MB from 34 KB). HTML nesting
# lists or quotes deeper than MAX_HTML_NESTING (a long Gmail thread nests a quote per reply) is
# read by the plain extractor instead (`scan_html`: text only, linear), and so is HTML with a
# tag or comment that never ends (see scan_html). Its output, and
# html2text's, is cut to MAX_HTML_TEXT_CHARS (more than a FHIR string takes, see fit_text).
MAX_HTML_NESTING = 32
MAX_HTML_TEXT_CHARS = 300_000
_HTML_NESTED = frozenset({"ol", "ul", "blockquote"})
# Where the plain extractor breaks a line, and what it leaves out.
_HTML_BLOCK = frozenset({
    "address", "article", "aside", "blockquote", "br", "dd", "div", "dl", "dt", "figcaption",
    "footer", "h1", "h2", "h3", "h4", "h5", "h6", "header", "hr", "li", "main", "nav", "ol",
    "p", "pre", "section", "table", "tr", "ul"})
# Skipped to their end tag, exactly as html.parser (under html2text) skips them: it reads every
# other element's content as markup (lists inside a <title> nest for html2text too).
_HTML_HIDDEN = frozenset(HTMLParser.CDATA_CONTENT_ELEMENTS)
_TAG_START = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ/!?")
_TAG_BODY = re.compile(r"[^<>]*")
_TAG_NAME = re.compile(r"(/?)([a-zA-Z][^\s/>]*)")
_SPACES = re.compile(r"[ \t\r\f\v\xa0]+")
_BLANK_LINES = re.compile(r"\n(?: ?\n)+")
ATTACHMENT_FIELD = re.compile(r"attachment([0-9]{1,3})")
_MSG_ID = re.compile(r"<[^<>\s]{1,995}>")
_CONTENT_TYPE = re.compile(r"[a-z0-9][\w.+\-]{0,63}/[\w.+\-]{1,127}")
# Languages whose reply headers ("On … wrote:", "Am … schrieb …") the quote stripper knows.
REPLY_LANGUAGES = ["en", "de", "fr", "es", "it", "nl", "pt", "sv", "ja"]
# The longest References chain we look through for a message we sent (newest first).
MAX_REFERENCES = 50
# File names of the full original kept as an attachment when the text shown is less than it.
ORIGINAL_TITLE = {"text/plain": "original-message.txt", "text/html": "original-message.html"}


class InvalidEmail(ValueError):
    """The request is not an Inbound Parse post we can read: the receiver answers 400, the
    worker dead-letters it with `reason`."""

    def __init__(self, detail: str, reason: str = "invalid-email") -> None:
        super().__init__(detail)
        self.reason = reason


# -- decoding ------------------------------------------------------------------------------------

def decode_text(data: bytes, charset: str | None) -> str:
    """`data` as text in its declared charset; a wrong or unknown charset never raises.

    Declared charset, strictly; else UTF-8, strictly; else charset-normalizer's best guess;
    else the declared (or UTF-8) decoding with replacement characters.
    """
    declared = (charset or "").strip().strip('"').lower() or "utf-8"
    for candidate in (declared, "utf-8"):
        try:
            return data.decode(candidate)
        # Not only UnicodeDecodeError: the `undefined` codec raises UnicodeError, `punycode`
        # raises others on `\\N{`, a NUL in the name ValueError; none may end the message.
        except (LookupError, UnicodeError, ValueError):
            continue
    guess = _guess(data)
    if guess is not None:
        return guess
    try:
        return data.decode(declared, errors="replace")
    except (LookupError, UnicodeError, ValueError):
        return data.decode("utf-8", errors="replace")


def _guess(data: bytes) -> str | None:
    from charset_normalizer import from_bytes

    try:
        best = from_bytes(data).best()
    except Exception:  # a guess that fails is no worse than no guess
        return None
    return None if best is None else str(best)


def _part_text(part: EmailMessage) -> str:
    raw = part.get_payload(decode=True)
    data = raw if isinstance(raw, bytes) else b""
    try:
        charset = part.get_content_charset()
    except Exception:  # a malformed parameter reads as undeclared
        charset = None
    return decode_text(data, charset)


@dataclass(frozen=True)
class HtmlScan:
    """What one linear pass over HTML found (`scan_html`)."""

    text: str  # the text, without markup, scripts or styles, a line per block
    nesting: int  # the deepest nesting of lists and quotes (html2text's cost grows with it)
    closed: bool  # every tag, comment, script and style ends where html.parser expects


def scan_html(html: str) -> HtmlScan:
    """One pass over `html` in time linear in its length (pure). Hand-written, not the standard
    library's HTMLParser (which html2text is built on): on this Python, HTMLParser rescans the
    rest of the input after each tag or comment that never ends, so 100 KB of `<a ` took 278 s,
    of `<!--` 20 s. Each character here is looked at a bounded number of times: a tag ends at
    the first `>` and is unfinished at the next `<`; comments, scripts and styles end at the
    first terminator searched forward from where they begin."""
    chunks: list[str] = []
    open_nested: dict[str, int] = {}
    nesting = deepest = 0
    closed = True
    pos, end = 0, len(html)
    while pos < end:
        lt = html.find("<", pos)
        if lt < 0:
            chunks.append(html[pos:])
            break
        chunks.append(html[pos:lt])
        if html.startswith("<!--", lt):
            stop = html.find("-->", lt + 4)
            if stop < 0:
                closed = False
                break
            pos = stop + 3
            continue
        if lt + 1 >= end or html[lt + 1] not in _TAG_START:
            chunks.append("<")  # text to html.parser too
            pos = lt + 1
            continue
        stop = _TAG_BODY.match(html, lt + 1).end()  # type: ignore[union-attr]
        if stop >= end or html[stop] != ">":
            closed = False  # html.parser reads this as text, slowly
            chunks.append(html[lt:stop])
            pos = stop
            continue
        pos = stop + 1
        name_match = _TAG_NAME.match(html, lt + 1, stop)
        if name_match is None:
            continue  # <!DOCTYPE …>, <?xml …?>
        closing, name = name_match.group(1) == "/", name_match.group(2).lower()
        if name in _HTML_BLOCK:
            chunks.append("\n")
        if name in _HTML_NESTED:
            if not closing and not html.startswith("/", stop - 1):
                open_nested[name] = open_nested.get(name, 0) + 1
                nesting += 1
                deepest = max(deepest, nesting)
            elif closing and open_nested.get(name):
                open_nested[name] -= 1
                nesting -= 1
        if name in _HTML_HIDDEN and not closing:
            found = re.compile(r"</" + name + r"\b", re.I).search(html, pos)
            if found is None:
                closed = False
                break
            pos = found.start()
    lines = (_SPACES.sub(" ", line).strip()
             for line in html_module.unescape("".join(chunks)).split("\n"))
    return HtmlScan(_BLANK_LINES.sub("\n\n", "\n".join(lines)).strip(), deepest, closed)


def html_to_text(html: str) -> str:
    """Readable text of an HTML body (html2text: links kept, no markup, no wrapping), in time
    and memory bounded by MAX_HTML_CHARS: HTML nesting lists or quotes past MAX_HTML_NESTING,
    or with a tag that never ends, is read as plain text instead (scan_html). Pure."""
    html = html[:MAX_HTML_CHARS]
    scan = scan_html(html)
    if scan.nesting > MAX_HTML_NESTING or not scan.closed:
        return scan.text[:MAX_HTML_TEXT_CHARS]
    import html2text

    converter = html2text.HTML2Text()
    converter.body_width = 0
    converter.ignore_images = True
    converter.ignore_emphasis = True  # **bold** is markup, not what the patient wrote
    converter.unicode_snob = True
    return str(converter.handle(html)).strip()[:MAX_HTML_TEXT_CHARS]


def strip_input(text: str) -> str:
    """What the quote stripper is given of `text`: its first MAX_STRIP_CHARS, with runs of
    blank lines folded to one (see MAX_STRIP_CHARS for why)."""
    return _BLANK_RUN.sub("\n\n", text[:MAX_STRIP_CHARS])[:MAX_STRIP_CHARS]


def strip_quoted(text: str) -> str:
    """The new part of a reply: quoted history (`On … wrote:` blocks, `>` lines, Outlook
    separators) removed by mail-parser-reply; the whole text when nothing would be left.

    Only the head of a long text is searched (strip_input): when the stripper cuts something
    there, everything after the cut, the rest of the text included, is history; when it cuts
    nothing, the whole text is the message."""
    from mailparser_reply import EmailReplyParser

    head = strip_input(text)
    try:
        latest = EmailReplyParser(languages=REPLY_LANGUAGES).parse_reply(text=head)
    except Exception:  # a library failure must not lose the message
        return text.strip()
    latest = (latest or "").strip()
    if not latest or (len(text) > len(head) and latest.split() == head.split()):
        return text.strip()
    return latest


# -- the record ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class FilePart:
    """One uploaded file of the form (an attachment in parsed mode)."""

    field: str
    filename: str
    content_type: str
    data: bytes


@dataclass(frozen=True)
class FormPart:
    """One part of a multipart/form-data body, as framed by `form_parts`."""

    name: str | None  # None: not a form-data part with a name (ignored)
    filename: str | None
    content_type: str
    data: bytes


def form_parts(content_type: str, body: bytes) -> list[FormPart]:
    """The parts of a multipart/form-data body, framed strictly. Raises InvalidEmail.

    Written here rather than taken from a form parser because SendGrid's signature covers the
    body but not the Content-Type header that names the boundary: a replayed post with another
    boundary (`boundary=EVIL`) would be read from parts an attacker's own email text carried.
    So the body must start with the boundary's first delimiter and end with its closing one
    (no preamble, no epilogue, which parsers skip silently), every delimiter must be a whole
    one, and no field may come twice (a parser keeps the first or the last). Cheap enough for
    the receiver: byte counts and splits in C, then a header parse per part (at most
    MAX_FORM_PARTS).
    """
    try:
        ctype = BytesParser(policy=policy.default).parsebytes(
            b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n",
            headersonly=True)
        kind, boundary = ctype.get_content_type(), ctype.get_param("boundary")
    except Exception:  # an unreadable header names no boundary
        kind, boundary = "", None
    if kind != "multipart/form-data":
        raise InvalidEmail("expected multipart/form-data")
    if not isinstance(boundary, str) or not 1 <= len(boundary) <= 70 or \
            not boundary.isascii() or "\r" in boundary or "\n" in boundary:
        raise InvalidEmail("the multipart boundary is not a valid one")
    b = boundary.encode("ascii")
    first, delimiter, closing = b"--" + b + b"\r\n", b"\r\n--" + b + b"\r\n", \
        b"\r\n--" + b + b"--"
    if not body.startswith(first):
        raise InvalidEmail("the body does not start with the boundary's first delimiter")
    end = len(body) - (2 if body.endswith(b"\r\n") else 0)
    if not body.startswith(closing, end - len(closing)) or end - len(closing) < len(first) - 2:
        raise InvalidEmail("the body does not end with the boundary's closing delimiter")
    inner = body[len(first):end - len(closing)]
    count = inner.count(delimiter) + 1
    if inner.count(b"\r\n--" + b) + 1 != count:
        raise InvalidEmail("the boundary appears inside a part")
    if count > MAX_FORM_PARTS:
        raise InvalidEmail(f"more than {MAX_FORM_PARTS} form parts")
    parts: list[FormPart] = []
    names: set[str] = set()
    for chunk in inner.split(delimiter):
        head_end = 0 if chunk.startswith(b"\r\n") else chunk.find(b"\r\n\r\n", 0,
                                                                    MAX_PART_HEADER_BYTES)
        if head_end < 0:
            raise InvalidEmail("a form part has no end of headers")
        name, filename, part_type = _part_headers(chunk[:head_end])
        if name is not None:
            if name in names:
                raise InvalidEmail("a form field is repeated")
            names.add(name)
        parts.append(FormPart(name, filename, part_type,
                              chunk[head_end + 2 if head_end == 0 else head_end + 4:]))
    return parts


def _part_headers(raw: bytes) -> tuple[str | None, str | None, str]:
    """(name, filename, content type) of a form part's header block. Read with the standard
    library's compat32 parser: `policy.default` took 2 ms for an ordinary part header on this
    machine, 36 ms for one of 400 parameters (317 s for a post of 1,023 such parts) and raised
    RecursionError on nested comments; compat32 is linear and flat. Blocks past
    MAX_PART_HEADER_PARAMS parameters or MAX_PART_HEADER_LINES lines (200 lines in each of
    1,023 parts: 0.6 s) are refused before it sees them."""
    if raw.count(b";") > MAX_PART_HEADER_PARAMS or raw.count(b"\n") >= MAX_PART_HEADER_LINES:
        raise InvalidEmail("a form part's headers are too many or too long")
    try:
        # Decoded first: raw 8-bit bytes (a UTF-8 filename) would otherwise come back as an
        # unknown-8bit Header with replacement characters.
        part = HeaderParser(policy=policy.compat32).parsestr(
            raw.decode("utf-8", "replace") + "\r\n\r\n")
        name: Any = None
        if part.get_content_disposition() == "form-data":
            name = part.get_param("name", header="content-disposition")
        name = collapse_rfc2231_value(name) if name else None
        filename = part.get_filename()
        content_type = part.get_content_type()
    except Exception:  # no exception of a header parser may escape with header text in it
        raise InvalidEmail("a form part's headers are unreadable") from None
    return (name if isinstance(name, str) and name else None,
            filename if isinstance(filename, str) and filename else None, content_type)


def require_email_fields(parts: list[FormPart]) -> None:
    """Raises InvalidEmail unless the form is one of Inbound Parse's two modes with a From
    address: the `from` field (parsed mode) or the From header of the `email` field's header
    block (raw mode). Cheap: a few KB read, never the email's body."""
    fields = {p.name: p.data for p in parts if p.name is not None and p.filename is None}
    _one_mode(set(fields), any(p.filename is not None for p in parts))
    if "email" in fields:
        raw = fields["email"]
        end = _header_block_end(raw)
        if end < 0:
            raise InvalidEmail("the email's headers do not end within "
                               f"{MAX_EMAIL_HEADER_BYTES // 1024} KB")
        try:  # compat32: flat and linear (see _part_headers); only From is read
            head = BytesParser(policy=policy.compat32).parsebytes(raw[:end] + b"\r\n\r\n",
                                                                  headersonly=True)
            from_field = str(head.get("From") or "")
        except Exception:
            from_field = ""
        if len(from_field) > MAX_FROM_BYTES:
            raise InvalidEmail("the From header is too long")
    elif "from" in fields or "headers" in fields:
        value = fields.get("from", b"")
        if len(value) > MAX_FROM_BYTES:
            raise InvalidEmail("the from field is too long")
        if len(fields.get("headers", b"")) > MAX_EMAIL_HEADER_BYTES:
            # As raw mode's header block: a header block this large is not an email we read.
            raise InvalidEmail("the headers field is over "
                               f"{MAX_EMAIL_HEADER_BYTES // 1024} KB")
        charsets = _json_object(fields.get("charsets", b"")[:MAX_FROM_BYTES])
        from_field = decode_text(value, str(charsets.get("from") or "utf-8")) if value else ""
    else:
        raise InvalidEmail("neither an `email` field (raw mode) nor `from`/`headers` (parsed)")
    if "@" not in parseaddr(from_field)[1]:
        raise InvalidEmail("From holds no address")


# Fields only parsed mode posts. SendGrid's boundary (`xYzZY`) is well known: if an email's own
# text ever carried it, the form would split there, and parts the sender wrote would follow.
# A repeated field is refused anyway; this refuses an `email` field (raw mode, which wins)
# slipped into a parsed post, and parsed fields into a raw one.
_PARSED_ONLY = frozenset({"headers", "text", "html", "attachment-info"})


def _one_mode(names: set[str], has_files: bool) -> None:
    if "email" in names and (has_files or names & _PARSED_ONLY):
        raise InvalidEmail("fields of both Inbound Parse modes")


def _header_block_end(raw: bytes) -> int:
    """Where a raw message's header block ends (its first blank line), -1 when not within
    MAX_EMAIL_HEADER_BYTES; a message of headers only ends at its end."""
    head = raw[:MAX_EMAIL_HEADER_BYTES]
    ends = [i for i in (head.find(b"\r\n\r\n"), head.find(b"\n\n")) if i >= 0]
    if ends:
        return min(ends)
    return len(raw) if len(raw) <= MAX_EMAIL_HEADER_BYTES else -1


def parse_form_body(content_type: str, body: bytes) -> tuple[dict[str, bytes], list[FilePart]]:
    """The fields (raw bytes) and files of a multipart/form-data body (framed by form_parts),
    every text field kept as bytes for its own charset (a form parser would decode them all
    as UTF-8). Parts are taken as sent: RFC 7578 drops Content-Transfer-Encoding."""
    fields: dict[str, bytes] = {}
    files: list[FilePart] = []
    for part in form_parts(content_type, body):
        if part.name is None:
            continue
        if part.filename is not None or ATTACHMENT_FIELD.fullmatch(part.name):
            files.append(FilePart(part.name, part.filename or part.name, part.content_type,
                                  part.data))
        else:
            fields[part.name] = part.data
    return fields, files


@dataclass(frozen=True)
class EmailForm:
    """A post's form, framed (`read_form`): read its sender cheaply (`read_sender`), and only
    then, for a sender worth it, the whole email (`read_record`)."""

    fields: Mapping[str, bytes]
    files: list[FilePart]


def _guarded(read: Any, *args: Any) -> Any:
    """`read(*args)`, every failure an InvalidEmail with a reason, none quoting the email."""
    try:
        return read(*args)
    except InvalidEmail:
        raise
    except RecursionError:
        raise InvalidEmail("the email is nested too deeply", "email-too-complex") from None
    except Exception as exc:  # a hostile email must end as a dead letter, and the
        # exception's text can quote it: only its type is kept.
        raise InvalidEmail(f"unreadable ({type(exc).__name__})", "unreadable-email") from None


def read_form(content_type: str, body: bytes) -> EmailForm:
    """The framed form of a post (the checks the receiver made, again). Raises InvalidEmail."""
    fields, files = _guarded(parse_form_body, content_type, body)
    _one_mode(set(fields), bool(files))
    return EmailForm(fields, files)


def read_sender(form: EmailForm) -> dict[str, Any]:
    """Stage one: the sender part of the record (`sender_fields`). Raises InvalidEmail."""
    return dict(_guarded(sender_fields, form.fields))


def read_record(form: EmailForm, max_bytes: int) -> dict[str, Any]:
    """Stage two: the whole email record (`parse_request`). Raises InvalidEmail."""
    return dict(_guarded(parse_request, form.fields, form.files, max_bytes))


def read_post(content_type: str, body: bytes, max_bytes: int) -> dict[str, Any]:
    """The email record of a whole Inbound Parse post, in the worker. Raises InvalidEmail
    (with a reason) for anything it cannot read; nothing else, and nothing that quotes it."""
    return read_record(read_form(content_type, body), max_bytes)


def sender_fields(fields: Mapping[str, bytes]) -> dict[str, Any]:
    """What `sender_authentication` and the known-sender lookup need (`from`, `spf`, `dkim`,
    `envelope_from`, `envelope_to`, `auth_results`), from cheap, bounded reads only: SendGrid's
    small fields, and the header block (raw mode's, or parsed mode's `headers` field, both at
    most MAX_EMAIL_HEADER_BYTES) split by the linear compat32 parser, of which only From and
    the topmost Authentication-Results are read. Nothing of the body and no policy.default
    header parse (0.17 s per 30 KB header): a stranger's email costs milliseconds. Raises
    InvalidEmail. The whole record (`parse_request`) takes these values as they are."""
    charsets = _json_object(fields.get("charsets", b"")[:MAX_FROM_BYTES])
    envelope = _json_object(fields.get("envelope", b"")[:MAX_EMAIL_HEADER_BYTES])

    def small(name: str) -> str:
        value = fields.get(name, b"")[:MAX_FROM_BYTES]
        return decode_text(value, str(charsets.get(name) or "utf-8")) if value else ""

    if "email" in fields:
        raw = fields["email"]
        end = _header_block_end(raw)
        if end < 0:
            raise InvalidEmail("the email's headers do not end within "
                               f"{MAX_EMAIL_HEADER_BYTES // 1024} KB", "email-too-complex")
        head = _flat_headers(raw[:end])
        from_field = _unfolded(head.get("From"))
    elif "from" in fields or "headers" in fields:
        block = fields.get("headers", b"")
        # Raw mode's bound on its header block, for parsed mode's copy of it (F1 of the
        # hostile review: 100 Authentication-Results of 30 KB took 17.5 s unbounded).
        if len(block) > MAX_EMAIL_HEADER_BYTES:
            raise InvalidEmail(f"the headers field is over {MAX_EMAIL_HEADER_BYTES // 1024} KB",
                               "email-too-complex")
        head = _flat_headers(block)
        if len(fields.get("from", b"")) > MAX_FROM_BYTES:
            raise InvalidEmail("the from field is too long")
        from_field = small("from")
    else:
        raise InvalidEmail("neither an `email` field (raw mode) nor `from`/`headers` (parsed)")
    if len(from_field) > MAX_FROM_BYTES:
        raise InvalidEmail("the From header is too long")
    sender = parseaddr(from_field)[1].strip()
    if not sender or "@" not in sender:
        raise InvalidEmail("From holds no address")
    top = _unfolded(head.get("Authentication-Results"))[:MAX_AUTH_RESULTS_CHARS]
    return {
        "from": sender,
        "spf": small("SPF").strip().lower(),
        "dkim": small("dkim").strip(),
        "envelope_from": str(envelope.get("from") or "").strip()[:MAX_FROM_BYTES],
        "envelope_to": [a for a in _list(envelope.get("to")) if isinstance(a, str)],
        # Only the topmost is ever used (sender_authentication): the others are not read.
        "auth_results": [top] if top else [],
    }


def _flat_headers(block: bytes) -> Any:
    """A header block split into raw (name, value) pairs by compat32: linear, nothing parsed
    (see _part_headers)."""
    return BytesParser(policy=policy.compat32).parsebytes(block.strip() + b"\r\n\r\n",
                                                          headersonly=True)


def _unfolded(value: Any) -> str:
    """A raw header value (compat32: a str, or a Header for 8-bit bytes) on one line."""
    return re.sub(r"\r?\n(?=[ \t])", "", str(value or "")).strip()


def parse_request(fields: Mapping[str, bytes], files: list[FilePart], max_bytes: int
                  ) -> dict[str, Any]:
    """The email record of one Inbound Parse post (either mode). Raises InvalidEmail."""
    charsets = _json_object(fields.get("charsets", b""))

    def text(name: str) -> str:
        value = fields.get(name)
        return decode_text(value, str(charsets.get(name) or "utf-8")) if value else ""

    _one_mode(set(fields), bool(files))
    common = sender_fields(fields)
    if "email" in fields:
        return {**_from_raw(fields["email"], max_bytes), **common}
    headers = _headers(fields.get("headers", b""))
    check_headers(headers)
    info = _json_object(fields.get("attachment-info", b""))
    attachments: list[tuple[str, str, bytes]] = []
    for f in files:
        found = info.get(f.field)
        meta: dict[str, Any] = found if isinstance(found, dict) else {}
        attachments.append((str(meta.get("filename") or meta.get("name") or f.filename),
                            str(meta.get("type") or f.content_type), f.data))
    body_text, body_html = text("text"), text("html")
    size = sum(len(v) for v in fields.values()) + sum(len(f.data) for f in files)
    return {**_record(headers, text("subject"), body_text, body_html, attachments, size,
                      max_bytes), **common}


def mime_problem(raw: bytes) -> str | None:
    """Why a raw MIME message is too complex to parse (see MAX_MIME_MULTIPARTS), else None.
    An upper bound read from the bytes: every multipart declares a boundary, and every part
    starts at a line of one."""
    declared = set()
    for n, match in enumerate(_BOUNDARY_DECLARED.finditer(raw)):
        if n >= MAX_MIME_MULTIPARTS:
            return f"more than {MAX_MIME_MULTIPARTS} multipart boundaries"
        declared.add(match.group(1))
    # After any line ending: CRLF and LF end in \n, a lone CR (which the parser also splits
    # on) in \r.
    lines = sum(raw.count(b"\n--" + b) + raw.count(b"\r--" + b) for b in declared)
    if lines > MAX_MIME_PARTS:
        return f"more than {MAX_MIME_PARTS} MIME parts"
    return None


def parse_mime(raw: bytes, deadline: float | None = None) -> EmailMessage:
    """A raw MIME message parsed with the standard library, within the bounds above: raises
    InvalidEmail (reason `email-too-complex` or `email-parse-timeout`)."""
    problem = mime_problem(raw)
    if problem:
        raise InvalidEmail(problem, "email-too-complex")
    deadline = time.monotonic() + MAX_PARSE_SECONDS if deadline is None else deadline
    parser = BytesFeedParser(_factory=_PartCounter(), policy=policy.default)
    view = memoryview(raw)
    for start in range(0, len(raw), _PARSE_CHUNK):
        if time.monotonic() > deadline:
            raise InvalidEmail(f"parsing took over {MAX_PARSE_SECONDS:.0f} s",
                               "email-parse-timeout")
        parser.feed(bytes(view[start:start + _PARSE_CHUNK]))
    message = parser.close()
    if not isinstance(message, EmailMessage):
        return EmailMessage()
    for part in message.walk():  # raw values: nothing parsed yet
        if time.monotonic() > deadline:
            raise InvalidEmail(f"parsing took over {MAX_PARSE_SECONDS:.0f} s",
                               "email-parse-timeout")
        check_headers(part)
    return message


class _PartCounter:
    """The parser's message factory (the stdlib's hook for it): makes EmailMessages, and stops
    the parse, as it goes, at the (MAX_MIME_PARTS + 1)th. Whatever the bytes look like (CR-only
    line ends, RFC 2231 boundaries: F2 of the hostile review, 20k parts took 17.7 s), the
    parser's cost stays bounded by what it has made."""

    def __init__(self) -> None:
        self.made = -1  # FeedParser makes one to try the factory's signature

    def __call__(self, policy: Any = policy.default) -> EmailMessage:
        self.made += 1
        if self.made > MAX_MIME_PARTS + 1:  # the message itself and its parts
            raise InvalidEmail(f"more than {MAX_MIME_PARTS} MIME parts", "email-too-complex")
        return EmailMessage(policy=policy)


def check_headers(message: EmailMessage) -> None:
    """Raises InvalidEmail (`email-too-complex`) when a header of `message` (not its parts) is
    past MAX_HEADER_CHARS or its parameter bound; reads raw values only."""
    for name, value in message.raw_items():
        mime = name.lower() in _MIME_HEADERS
        params = MAX_MIME_HEADER_PARAMS if mime else MAX_HEADER_PARAMS
        if len(value) > (MAX_MIME_HEADER_CHARS if mime else MAX_HEADER_CHARS) or \
                value.count(";") > params:
            raise InvalidEmail("a header is too long", "email-too-complex")


def _from_raw(raw: bytes, max_bytes: int) -> dict[str, Any]:
    deadline = time.monotonic() + MAX_PARSE_SECONDS
    message = parse_mime(raw, deadline)
    body_text = body_html = ""
    chosen = []
    for kind in ("plain", "html"):
        try:
            part = message.get_body(preferencelist=(kind,))
        except Exception:  # a malformed structure: no body of that kind
            part = None
        if isinstance(part, EmailMessage):
            chosen.append(part)
            if kind == "plain":
                body_text = _part_text(part)
            else:
                body_html = _part_text(part)
    attachments: list[tuple[str, str, bytes]] = []
    for part in message.walk():  # reads each part's headers: the deadline holds here too
        if time.monotonic() > deadline:
            raise InvalidEmail(f"parsing took over {MAX_PARSE_SECONDS:.0f} s",
                               "email-parse-timeout")
        if part.is_multipart() or any(part is c for c in chosen) or not isinstance(
                part, EmailMessage):
            continue
        if not (part.is_attachment() or part.get_filename()
                or part.get_content_maintype() not in ("text", "multipart")):
            continue
        raw_part = part.get_payload(decode=True)
        data = raw_part if isinstance(raw_part, bytes) else b""
        attachments.append((part.get_filename() or f"attachment{len(attachments) + 1}",
                            part.get_content_type(), data))
    return _record(message, _header(message, "Subject"), body_text, body_html, attachments,
                   len(raw), max_bytes)


def _record(headers: Any, subject: str, body_text: str, body_html: str,
            attachments: list[tuple[str, str, bytes]], size: int, max_bytes: int
            ) -> dict[str, Any]:
    """The record's fields read from the email; the sender's are `sender_fields`'."""
    kept: list[dict[str, Any]] = []
    omitted: list[dict[str, Any]] = []
    for name, content_type, data in attachments:
        item = {"name": name[:255], "content_type": _content_type(content_type),
                "size": len(data)}
        if size > max_bytes:
            omitted.append(item)
        else:
            kept.append({**item, "data": base64.b64encode(data).decode()})
    return {
        "message_id": _first_id(_header(headers, "Message-ID")),
        "in_reply_to": _ids(_header(headers, "In-Reply-To")),
        "references": _ids(_header(headers, "References")),
        "date": _header(headers, "Date"),
        "to": [a for _, a in getaddresses([_header(headers, "To")]) if a],
        "subject": subject.strip(),
        "text": body_text,
        "html": body_html,
        "size": size,
        "attachments": kept,
        "omitted": omitted,
    }


def _headers(raw: bytes) -> EmailMessage:
    message = BytesParser(policy=policy.default).parsebytes(raw.strip() + b"\r\n\r\n",
                                                            headersonly=True)
    return message if isinstance(message, EmailMessage) else EmailMessage()


def _header(headers: Any, name: str) -> str:
    try:
        value = headers.get(name)
        return str(value or "")
    except Exception:  # a malformed header reads as absent
        return ""


def _ids(value: str) -> list[str]:
    return _MSG_ID.findall(value)


def _first_id(value: str) -> str:
    found = _ids(value)
    return found[0] if found else ""


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value] if value else []


def _content_type(value: str) -> str:
    # A FHIR code: a hostile or broken type would make the server refuse the whole message.
    value = value.strip().lower()
    return value if _CONTENT_TYPE.fullmatch(value) else "application/octet-stream"


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw.decode("utf-8", errors="replace")) if raw else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


# -- sender authenticity -------------------------------------------------------------------------

_DKIM_RESULT = re.compile(r"@([A-Za-z0-9.\-]+)\s*:\s*([a-z]+)")
_AR_DKIM = re.compile(r"\bdkim=([a-z]+)\b[^;]*?\bheader\.(?:d|i)=@?([A-Za-z0-9.\-]+)", re.I)
_AR_SPF = re.compile(r"\bspf=([a-z]+)\b[^;]*?\bsmtp\.mailfrom=([^\s;]+)", re.I)


def domain_of(address: str) -> str:
    """The lower-cased domain of an email address ("" when there is none)."""
    return address.rsplit("@", 1)[-1].strip().strip(">").lower() if "@" in address else ""


def aligned(domain: str, from_domain: str) -> bool:
    """DMARC's relaxed alignment, without the public-suffix list: the same domain, or one a
    subdomain of the other when the shorter has at least two labels (`mail.example.org` and
    `example.org` align; `org` aligns with nothing)."""
    domain, from_domain = domain.lower().strip("."), from_domain.lower().strip(".")
    if not domain or not from_domain:
        return False
    if domain == from_domain:
        return True
    shorter, longer = sorted((domain, from_domain), key=len)
    return shorter.count(".") >= 1 and longer.endswith("." + shorter)


def sender_authentication(record: Mapping[str, Any]) -> str | None:
    """How the From domain was authenticated ("dkim" or "spf"), or None.

    DKIM: SendGrid's `dkim` field (`{@example.org : pass, @other.net : fail}`) has a pass for a
    domain aligned with From. SPF: SendGrid's `SPF` field says pass and the envelope sender is
    in a domain aligned with From (SPF passing for some other domain proves nothing). Without
    those fields (raw mode posts them too), only the topmost Authentication-Results header
    counts, and only when SendGrid's own receiving host wrote it: any lower one may be the
    sender's own invention.
    """
    from_domain = domain_of(str(record.get("from") or ""))
    dkim = str(record.get("dkim") or "")
    for domain, result in _DKIM_RESULT.findall(dkim):
        if result.lower() == "pass" and aligned(domain, from_domain):
            return "dkim"
    if str(record.get("spf") or "").lower() == "pass" and aligned(
            domain_of(str(record.get("envelope_from") or "")), from_domain):
        return "spf"
    if dkim or record.get("spf"):
        return None
    results = list(record.get("auth_results") or [])
    top = str(results[0]) if results else ""
    if not top.split(";", 1)[0].strip().lower().endswith(".sendgrid.net"):
        return None
    for result, domain in _AR_DKIM.findall(top):
        if result.lower() == "pass" and aligned(domain, from_domain):
            return "dkim"
    for result, mailfrom in _AR_SPF.findall(top):
        if result.lower() == "pass" and aligned(domain_of(mailfrom), from_domain):
            return "spf"
    return None


# -- the message ---------------------------------------------------------------------------------

def _for_sender(record: Mapping[str, Any], value: str) -> str:
    """`value` scoped by the sender: `sender:<digest of the lower-cased From>:<value>`.

    Message-IDs are chosen by the sender's side: mailers reuse them, and anyone can copy one
    from a header they have seen (a reply-all, a forward). Scoped this way, another sender's
    Message-ID can neither make their email a "repeat" of ours nor put it in our thread. The
    digest keeps the address out of identifiers and Redis keys."""
    sender = str(record.get("from") or "").strip().lower()
    return f"sender:{hashlib.sha256(sender.encode('utf-8', 'replace')).hexdigest()[:16]}:{value}"


def message_key(record: Mapping[str, Any]) -> str:
    """The email's idempotency key: (sender, Message-ID), else a digest of (from, date,
    subject, body) that a resend of the same email reproduces."""
    if record.get("message_id"):
        return _for_sender(record, str(record["message_id"]))
    parts = [str(record.get(k) or "") for k in ("from", "date", "subject", "text", "html")]
    return "sha256:" + hashlib.sha256("\x1f".join(parts).encode("utf-8", "replace")).hexdigest()


def conversation_id(record: Mapping[str, Any]) -> str:
    """The conversation an email belongs to, for this sender: the root of References, else
    In-Reply-To, else the email's own key. A thread another sender started is never joined
    through its Message-ID (a reply-all from a relative opens the relative's own thread);
    answering an email we sent is matched by ownership instead (threads.by_conversation)."""
    refs = list(record.get("references") or [])
    replies = list(record.get("in_reply_to") or [])
    root = str(refs[0]) if refs else str(replies[0]) if replies else ""
    return _for_sender(record, root) if root else message_key(record)


def replied_ids(record: Mapping[str, Any]) -> tuple[str, ...]:
    """The Message-IDs this email answers, newest first (In-Reply-To, then References from
    its end), at most MAX_REFERENCES."""
    seen: list[str] = []
    for mid in [*(record.get("in_reply_to") or []), *reversed(record.get("references") or [])]:
        if mid not in seen:
            seen.append(str(mid))
    return tuple(seen[:MAX_REFERENCES])


_SUBJECT_PREFIX = re.compile(r"^\s*((re|fwd?|aw|wg|sv|vs|tr|rv)\s*(\[[0-9]+\])?\s*:\s*)+", re.I)


def topic(subject: str) -> str:
    """The subject on one line (no control characters: it becomes the thread's topic, and the
    subject of every reply) without its `Re:` / `Fwd:` prefixes (also AW:, WG:, SV:, TR:, RV:)."""
    return _SUBJECT_PREFIX.sub("", clean_subject(subject)).strip()


@dataclass(frozen=True)
class EmailBody:
    """The text to show and, when it is not all the email said, the full original."""

    text: str
    original: str  # "" when `text` is the whole body
    original_type: str  # text/plain or text/html
    cut: bool = False  # `text` was cut to MAX_TEXT_BYTES (the original holds all of it)


def body_of(record: Mapping[str, Any]) -> EmailBody:
    """The text part (else the HTML as readable text) with quoted history stripped, cut to
    what a FHIR server takes in one string (the full original is then kept)."""
    plain, html = str(record.get("text") or ""), str(record.get("html") or "")
    if plain.strip():
        latest = strip_quoted(plain)
        body = EmailBody(latest, plain if latest != plain.strip() else "", "text/plain")
        source = plain
    elif html.strip():
        body = EmailBody(strip_quoted(html_to_text(html)), html, "text/html")
        source = html
    else:
        return EmailBody("", "", "text/plain")
    text, cut = fit_text(body.text)
    if not cut:
        return body
    return EmailBody(text, body.original or source, body.original_type, cut=True)


def clinic_mailbox(record: Mapping[str, Any]) -> str:
    """The clinic address the email was delivered to (SMTP envelope, else the first To)."""
    for address in [*(record.get("envelope_to") or []), *(record.get("to") or [])]:
        if "@" in str(address):
            return str(address).strip().lower()
    return ""


def to_inbound(record: Mapping[str, Any], received_at: str,
               attachments: tuple[Attachment, ...], body: EmailBody) -> InboundMessage:
    """The channel-neutral message of an email record (attachments already stored; `body` is
    body_of(record), made once per email by the caller: it also decides the kept original)."""
    sender = str(record.get("from") or "").strip()
    try:
        Address(addr_spec=sender)
    except (ValueError, IndexError, TypeError) as exc:
        raise PermanentError("invalid-sender", "From is not an email address") from exc
    notes = [f"Attachment left out (the email was over the size limit): "
             f"{a.get('name')} ({a.get('content_type')}, {a.get('size')} bytes)"
             for a in record.get("omitted") or []]
    if body.cut:
        notes.append(f"The text was too long to show in full: the first {len(body.text)} "
                     f"characters are shown; the whole email is attached as "
                     f"{ORIGINAL_TITLE[body.original_type]}.")
    mid = str(record.get("message_id") or "")
    return InboundMessage(
        channel=CHANNEL, medium_code=MEDIUM_CODE, provider_message_id=message_key(record),
        sender=sender, clinic_address=clinic_mailbox(record), body=body.text,
        received_at=received_at, attachments=attachments,
        provider_conversation_id=conversation_id(record), replies_to=replied_ids(record),
        topic=topic(str(record.get("subject") or "")), notes=tuple(notes),
        identifiers=((EMAIL_INBOUND_MESSAGE_ID_SYSTEM, mid),) if mid else ())
