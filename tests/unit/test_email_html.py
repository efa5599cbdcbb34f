"""HTML bodies become text in bounded time and memory, and an email's body is read once
(hostile review F3: html2text's time and output grow with the square of list nesting, and it
ran twice per email)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from tests.email_payloads import parsed_post
from worker.channels.sendgrid_inbound import (
    MAX_HTML_CHARS,
    MAX_HTML_NESTING,
    MAX_HTML_TEXT_CHARS,
    EmailBody,
    body_of,
    html_to_text,
    parse_form_body,
    parse_request,
    scan_html,
)
from worker.inbound.email import email_message
from worker.messages import Attachment

PATIENT = "pat.html@example.org"

# The reviewer's payloads: `<ol><li>` x4000 took html2text 2.2 s and made 24 MB of text
# (x8000: 19.7 s, 96 MB); quotes grow the same way.
BOMBS = {
    "ol-li": "<ol><li>" * 4000,
    "ul-li": "<ul><li>" * 4000,
    "blockquote": "<blockquote>x<br>" * 4000,
    "list-lines": "<ol><li>" * 100 + "x<br>" * 5000,
    # Second review: lists inside <title> or <template>, which the scan skipped as hidden while
    # html.parser (so html2text) reads inside them (11,000 levels: 55 s).
    "in-title": "<title>" + "<ol><li>x" * 4000 + "</title>",
    "in-template": "<template>" + "<ol><li>x" * 4000 + "</template>",
}
# Tags and comments that never end: the standard library's HTMLParser (under html2text) rescans
# the rest of the input after each one (100 KB of `<a `: 278 s).
UNENDED = {
    "tag": "<a " * 20_000,
    "quoted attribute": "<a b='" * 10_000,
    "comment": "<!--" * 20_000,
    "end tag": "</" * 30_000,
    "script": "<p>hi</p><script>" + "x" * 1000,
}


@pytest.mark.parametrize("html", BOMBS.values(), ids=BOMBS.keys())
def test_deep_lists_and_quotes_are_read_as_plain_text_of_bounded_size(html: str) -> None:
    scan = scan_html(html)
    assert scan.nesting > MAX_HTML_NESTING
    text = html_to_text(html)
    assert text == scan.text  # the plain extractor, not html2text
    assert len(text) <= len(html)  # the old code made megabytes from these


@pytest.mark.parametrize("html", UNENDED.values(), ids=UNENDED.keys())
def test_html_with_unended_tags_never_reaches_html2text(html: str) -> None:
    scan = scan_html(html)
    assert not scan.closed
    assert html_to_text(html) == scan.text
    assert len(scan.text) <= len(html)


def test_only_the_head_of_a_long_html_body_is_converted() -> None:
    html = "x<br>" * 100_000  # 500 KB: the old code converted all of it (400,000 characters)
    text = html_to_text(html)
    assert 0 < len(text) <= MAX_HTML_CHARS <= MAX_HTML_TEXT_CHARS
    assert text.startswith("x")


def test_ordinary_html_still_goes_through_html2text() -> None:
    thread = ('<div dir="ltr"><p>My <b>rash</b> is <a href="https://example.org/a">better'
              '</a>.</p>' + '<div class="gmail_quote">On Mon, Pat wrote:<blockquote>' * 5
              + "older text" + "</blockquote></div>" * 5 + "</div>")
    scan = scan_html(thread)
    assert scan.closed and scan.nesting == 5
    text = html_to_text(thread)
    assert text.startswith("My rash is [better](https://example.org/a).")
    assert ">>>>> older text" in text  # html2text's quoting, kept for the quote stripper


def test_the_plain_extractor_keeps_the_words_and_drops_the_markup() -> None:
    html = ("<!DOCTYPE html><html><head><title>T</title><style>p > b { x: 1 }</style></head>"
            "<body><p>My  rash&amp;itch</p><script>if (a<b) {}</script><!-- c < d -->"
            "<ol><li>one<li>two</ol>caf&eacute; <br/>bye</body></html>")
    # The title is read as text, as html.parser reads it (a script's or style's content is not).
    assert scan_html(html).text == "T\nMy rash&itch\n\none\ntwo\ncafé\nbye"


def test_the_body_is_read_once_per_email() -> None:
    content_type, post = parsed_post(PATIENT, text=None, html="<p>Hello</p><blockquote>old"
                                                              "</blockquote>")
    fields, files = parse_form_body(content_type, post)
    record = parse_request(fields, files, 10 * 1024 * 1024)
    reads: list[EmailBody] = []
    stored: list[list[tuple[str, str, bytes]]] = []

    def read_body(rec: Mapping[str, Any]) -> EmailBody:
        reads.append(body_of(rec))
        return reads[-1]

    def store(files: list[tuple[str, str, bytes]]) -> tuple[Attachment, ...]:
        stored.append(files)
        return tuple(Attachment(f"Binary/{n}", t, title, len(d))
                     for n, (title, t, d) in enumerate(files))

    msg = email_message(record, "2026-12-07T10:00:00Z", store, read_body)
    assert len(reads) == 1  # the old code read it twice (the files, then the message)
    assert msg.body == reads[0].text and "Hello" in msg.body
    assert [f[0] for f in stored[0]] == ["original-message.html"]
    assert stored[0][0][2] == reads[0].original.encode()
    assert [a.title for a in msg.attachments] == ["original-message.html"]
