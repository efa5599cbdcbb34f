"""httpx as Switchboard uses it (worker.httpclient), against real servers on loopback: a small
FHIR server, and raw sockets that answer whatever bytes a hostile server would."""

from __future__ import annotations

import gzip
import json
import socket
import threading
import time
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from tests.support import eventually
from worker.fhir.client import FhirClient
from worker.fhir.outcome import FhirTransientError
from worker.httpclient import AnswerTooLarge, fetch, never_sent, new_client

THROTTLED = {"resourceType": "OperationOutcome", "issue": [{"code": "throttled"}]}
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@dataclass(frozen=True)
class Seen:
    method: str
    target: str  # the request target exactly as it arrived
    headers: dict[str, str]  # names lowercased
    body: bytes
    port: int  # the client's port: the same one for requests on one kept-alive connection


class Server:
    """A token endpoint and a tiny FHIR base in a thread; records every request."""

    def __init__(self) -> None:
        self.seen: list[Seen] = []
        self.release = threading.Event()  # lets the slow route answer
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive

            def do_GET(self) -> None:
                self._handle()

            def do_POST(self) -> None:
                self._handle()

            def do_PUT(self) -> None:
                self._handle()

            def log_message(self, *args: object) -> None:
                pass

            def _handle(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                server.seen.append(Seen(self.command, self.path,
                                        {k.lower(): v for k, v in self.headers.items()}, body,
                                        self.client_address[1]))
                if self.path == "/oauth2/token":
                    self._send(200, {"access_token": "tok", "expires_in": 3600})
                elif self.path.endswith("/Patient/slow"):
                    server.release.wait(10)
                    self._send(200, {"resourceType": "Patient", "id": "slow"})
                elif self.path.endswith("/Patient/throttled"):
                    # Two header lines: the blocking quota comes first, so a reader that kept
                    # only the last line would wait 3 s instead of 56.
                    self._send(429, THROTTLED, [("RateLimit", '"fhirInteractions";r=0;t=56'),
                                                ("ratelimit", '"requests";r=99;t=3')])
                elif self.path.endswith("/Binary"):
                    self._send(201, {"resourceType": "Binary", "id": "b1"})
                else:
                    echo = json.loads(body) if body else None
                    self._send(201 if self.command == "POST" else 200,
                               {"resourceType": "Patient", "id": "p1", "echo": echo})

            def _send(self, status: int, doc: object,
                      headers: list[tuple[str, str]] | None = None) -> None:
                data = json.dumps(doc).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/fhir+json")
                    self.send_header("Content-Length", str(len(data)))
                    for name, value in headers or []:
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass  # the client gave up (the timeout test)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.origin = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def client(self, base: str | None = None, timeout: float = 5.0) -> FhirClient:
        return FhirClient(base or self.origin + "/fhir/R4/", self.origin + "/oauth2/token",
                          "cid", "se+cret", timeout=timeout)

    def stop(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server()
    yield s
    s.stop()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_json_round_trip_on_one_kept_alive_connection(server: Server) -> None:
    c = server.client()
    try:
        created = c.create({"resourceType": "Patient", "name": [{"text": "Zoë"}]},
                           if_none_exist=[("phone", "+15551234567")])
        assert created.created
        assert created.resource["echo"] == {"resourceType": "Patient", "name": [{"text": "Zoë"}]}
        assert c.read("Patient", "p1").resource["id"] == "p1"
        c.search("Communication", [("identifier", "sys|+1"), ("phone", "+15551234567")])
        assert c.create_binary(b"\x89PNG\r\n", "image/png") == "b1"
    finally:
        c.close()
    token, create, read, search, binary = server.seen
    assert (token.method, token.target) == ("POST", "/oauth2/token")
    assert token.body == b"grant_type=client_credentials&client_id=cid&client_secret=se%2Bcret"
    assert token.headers["content-type"] == "application/x-www-form-urlencoded"
    assert (create.method, create.target) == ("POST", "/fhir/R4/Patient")
    assert create.body == '{"resourceType":"Patient","name":[{"text":"Zoë"}]}'.encode()
    assert create.headers["content-type"] == create.headers["accept"] == "application/fhir+json"
    assert create.headers["authorization"] == "Bearer tok"
    assert create.headers["if-none-exist"] == "phone=%2B15551234567"
    assert create.headers["accept-encoding"] == "identity"
    assert (read.method, read.target) == ("GET", "/fhir/R4/Patient/p1")
    # '+' stays percent-encoded on the wire.
    assert search.target == "/fhir/R4/Communication?identifier=sys|%2B1&phone=%2B15551234567"
    assert (binary.method, binary.target, binary.body) == ("POST", "/fhir/R4/Binary",
                                                           b"\x89PNG\r\n")
    assert binary.headers["content-type"] == "image/png"
    assert len({s.port for s in server.seen}) == 1  # one connection, kept alive


def test_a_timeout_is_a_transient_error_naming_the_type_only(server: Server) -> None:
    c = server.client(timeout=0.2)
    try:
        with pytest.raises(FhirTransientError) as exc:
            c.read("Patient", "slow")
    finally:
        c.close()
    assert exc.value.detail == "timeout on GET Patient"
    assert exc.value.reason == "fhir-unavailable" and exc.value.retryable


def test_a_refused_connection_is_a_transient_error(server: Server) -> None:
    refused = f"http://127.0.0.1:{closed_port()}"
    c = server.client(base=refused + "/fhir/R4/")  # the token endpoint still answers
    try:
        with pytest.raises(FhirTransientError) as exc:
            c.search("Patient", [("phone", "+15551234567")])
    finally:
        c.close()
    assert exc.value.detail == "ConnectError on GET Patient"

    no_token = FhirClient(refused + "/fhir/R4/", refused + "/oauth2/token", "cid", "secret")
    with pytest.raises(FhirTransientError) as exc:
        no_token.read("Patient", "p1")
    no_token.close()
    assert exc.value.detail == "token endpoint unreachable: ConnectError"


def test_repeated_ratelimit_lines_are_read_as_one_header(server: Server) -> None:
    c = server.client()
    try:
        with pytest.raises(FhirTransientError) as exc:
            c.read("Patient", "throttled")
    finally:
        c.close()
    assert exc.value.status == 429 and exc.value.retry_after == 56


def test_a_proxy_from_the_environment_gets_the_absolute_url(
        server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTP_PROXY", server.origin)
    monkeypatch.setenv("NO_PROXY", "")
    client = new_client("http://fhir.test/", 2, 5.0)
    try:
        answer = fetch(client, "GET", "http://fhir.test/fhir/R4/Patient/p1", timeout=5.0,
                       max_bytes=1 << 20)
    finally:
        client.close()
    assert answer.status == 200 and json.loads(answer.body)["id"] == "p1"
    assert answer.headers["CONTENT-TYPE"] == "application/fhir+json"  # any case
    (seen,) = server.seen
    assert seen.target == "http://fhir.test/fhir/R4/Patient/p1"


def test_a_full_pool_times_out_without_sending(server: Server) -> None:
    client = new_client(server.origin, 1, 5.0)
    slow = threading.Thread(target=lambda: fetch(
        client, "GET", server.origin + "/fhir/R4/Patient/slow", timeout=5.0, max_bytes=1000))
    slow.start()
    try:
        eventually(lambda: server.seen, timeout=5, interval=0.01, what="the slow request")
        with pytest.raises(httpx.PoolTimeout) as caught:
            fetch(client, "GET", server.origin + "/fhir/R4/Patient/p1", timeout=0.2,
                  max_bytes=1000)
        assert never_sent(caught.value)
    finally:
        server.release.set()
        slow.join()
        client.close()
    assert len(server.seen) == 1


def test_a_line_break_in_a_header_value_is_refused_before_sending() -> None:
    raw = RawServer([(OK, True)])
    client = new_client(raw.origin, 1, 1.0)
    try:
        with pytest.raises(httpx.LocalProtocolError) as caught:
            fetch(client, "GET", raw.origin + "/", headers={"X-A": "b\r\nX-Injected: 1"},
                  timeout=1.0, max_bytes=10)
        assert fetch(client, "GET", raw.origin + "/", timeout=1.0, max_bytes=10).body == b"ok"
    finally:
        client.close()
        raw.close()
    assert never_sent(caught.value)
    assert len(raw.requests) == 1 and b"X-Injected" not in raw.requests[0]


def test_refused_means_nothing_was_sent() -> None:
    client = new_client("http://127.0.0.1/", 1, 1.0)
    with pytest.raises(httpx.ConnectError) as caught:
        fetch(client, "POST", f"http://127.0.0.1:{closed_port()}/", content=b"x", timeout=1.0,
              max_bytes=10)
    client.close()
    assert never_sent(caught.value)


# -- hostile servers -----------------------------------------------------------------------------

class RawServer:
    """Answers each request with the next canned reply (bytes as they go on the wire), then
    keeps the connection or closes it, as the reply says; `drip` sends a reply a byte at a time
    that many seconds apart."""

    def __init__(self, replies: list[tuple[bytes, bool]], drip: float = 0.0) -> None:
        self.replies = list(replies)
        self.drip = drip
        self.connections = 0
        self.requests: list[bytes] = []
        self.sent_whole = 0  # replies sent to their last byte
        self.current: socket.socket
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen()
        self.origin = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while self.replies:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            self.current = conn
            with conn:
                try:
                    self._answer(conn)
                except OSError:
                    pass  # the client gave up

    def _answer(self, conn: socket.socket) -> None:
        while self.replies:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            self.requests.append(data)
            reply, keep = self.replies.pop(0)
            if self.drip:
                for i in range(len(reply)):
                    conn.sendall(reply[i:i + 1])
                    time.sleep(self.drip)
            else:
                conn.sendall(reply)
            self.sent_whole += 1
            if not keep:
                return

    def unasked(self, data: bytes) -> None:
        """Send `data` on the open connection, though nothing asked for it."""
        self.current.sendall(data)

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    c = new_client("http://127.0.0.1/", 4, 5.0)
    yield c
    c.close()


def get(client: httpx.Client, raw: RawServer, timeout: float = 5.0,
        max_bytes: int = 1 << 20) -> bytes:
    return fetch(client, "GET", raw.origin + "/", timeout=timeout, max_bytes=max_bytes).body


@pytest.mark.parametrize("first", [OK, b"HTTP/1.1 204 No Content\r\n\r\n"])
def test_a_stale_second_response_is_never_the_next_answer(client: httpx.Client,
                                                          first: bytes) -> None:
    # The server answers the first request twice in one write; the second answer must not be
    # taken as the answer to the next request (a connection with unasked bytes is not reused).
    stale = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstale"
    fresh = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfresh"
    raw = RawServer([(first + stale, True), (fresh, True)])
    try:
        assert get(client, raw) == first[first.index(b"\r\n\r\n") + 4:]
        assert get(client, raw) == b"fresh"
    finally:
        raw.close()
    assert raw.connections == 2


def test_an_unasked_answer_arriving_while_idle_is_never_the_next_answer(
        client: httpx.Client) -> None:
    stale = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstale"
    fresh = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfresh"
    raw = RawServer([(OK, True), (fresh, True)])
    try:
        assert get(client, raw) == b"ok"
        eventually(lambda: raw.sent_whole == 1, timeout=5, interval=0.01, what="the answer")
        raw.unasked(stale)
        time.sleep(0.2)  # it reaches us while the connection is idle
        assert get(client, raw) == b"fresh"
    finally:
        raw.close()
    assert raw.connections == 2


def test_a_kept_alive_connection_is_reused_when_the_answer_was_exact(
        client: httpx.Client) -> None:
    raw = RawServer([(OK, True), (OK, True)])
    try:
        assert get(client, raw) == get(client, raw) == b"ok"
    finally:
        raw.close()
    assert raw.connections == 1


def test_a_connection_the_server_closed_while_idle_is_not_used(client: httpx.Client) -> None:
    # The server answers and then closes (no Connection: close said): the next request must
    # go on a new connection, never be lost on the dead one.
    raw = RawServer([(OK, False), (OK, False)])
    try:
        assert get(client, raw) == b"ok"
        time.sleep(0.2)  # the server's close reaches us
        assert fetch(client, "POST", raw.origin + "/b", content=b"x", timeout=5.0,
                     max_bytes=10).body == b"ok"
    finally:
        raw.close()
    assert raw.connections == 2


def test_connection_close_and_a_body_to_the_end_of_the_connection(client: httpx.Client) -> None:
    raw = RawServer([(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 3\r\n\r\none",
                      False),
                     (b"HTTP/1.0 201 Created\r\nContent-Type: text/plain\r\n\r\ntwo, to EOF",
                      False)])
    try:
        assert get(client, raw) == b"one"
        second = fetch(client, "GET", raw.origin + "/", timeout=5.0, max_bytes=100)
    finally:
        raw.close()
    assert (second.status, second.body) == (201, b"two, to EOF")
    assert raw.connections == 2


def test_a_chunked_gzip_answer_is_read_whole(client: httpx.Client) -> None:
    data = gzip.compress(b'{"resourceType":"Patient","id":"chunked"}')
    body = b"".join(f"{len(part):x}\r\n".encode() + part + b"\r\n"
                    for part in (data[:7], data[7:])) + b"0\r\n\r\n"
    raw = RawServer([(b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\n"
                      b"Transfer-Encoding: chunked\r\n\r\n" + body, True), (OK, True)])
    try:
        assert json.loads(get(client, raw))["id"] == "chunked"
        assert get(client, raw) == b"ok"
    finally:
        raw.close()


def test_a_gzip_bomb_is_refused_after_the_limit() -> None:
    bomb = gzip.compress(b"\0" * 200_000_000)  # about 200 KB that decode to 200 MB
    assert len(bomb) < 250_000
    raw = RawServer([(b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: "
                      + str(len(bomb)).encode() + b"\r\n\r\n" + bomb, False)])
    client = new_client(raw.origin, 1, 5.0)
    # What a decoder that inflates each read whole holds at once: 64 KB of this gzip is about
    # 64 MB. Bounded inflation never holds much more than the limit.
    tracemalloc.start()
    try:
        with pytest.raises(AnswerTooLarge) as caught:
            fetch(client, "GET", raw.origin + "/", timeout=5.0, max_bytes=1 << 20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        client.close()
        raw.close()
    assert not never_sent(caught.value)
    assert peak < 8 << 20


@pytest.mark.parametrize("framing", [b"Content-Length: 300000000\r\n\r\n",
                                     b"Transfer-Encoding: chunked\r\n\r\n"])
def test_a_huge_body_is_refused_without_reading_it_whole(client: httpx.Client,
                                                         framing: bytes) -> None:
    head = b"HTTP/1.1 200 OK\r\n" + framing
    if framing.startswith(b"Transfer"):
        reply = head + b"".join(b"10000\r\n" + b"x" * 0x10000 + b"\r\n" for _ in range(40))
    else:
        reply = head + b"x" * (3 << 20)  # a declared length over the limit: never read
    raw = RawServer([(reply, False)])
    try:
        with pytest.raises(AnswerTooLarge):
            get(client, raw, max_bytes=1 << 20)
    finally:
        raw.close()


@pytest.mark.parametrize("reply", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n" + b"x" * 50,  # the body drips
    b"HTTP/1.1 200 OK\r\nX-Pad: " + b"y" * 50 + b"\r\nContent-Length: 2\r\n\r\nok",  # headers
])
def test_a_dripping_server_cannot_stretch_the_deadline(client: httpx.Client,
                                                       reply: bytes) -> None:
    # Every byte comes well within the per-read timeout: only a total deadline ends this
    # before the server is done (50 bytes at 0.1 s: over 5 s, against a 1 s timeout).
    raw = RawServer([(reply, False)], drip=0.1)
    try:
        with pytest.raises(httpx.ReadTimeout) as caught:
            get(client, raw, timeout=1.0)
        assert raw.sent_whole == 0  # given up while the server was still dripping
    finally:
        raw.close()
    assert not never_sent(caught.value)


@pytest.mark.parametrize("reply", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 5,7\r\n\r\nhello..",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1_0\r\n\r\nhellohello",
    b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\nx\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x1f\r\n" + b"a" * 31
    + b"\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcXY0\r\n\r\n",  # no CRLF
    b"HTTP/1.1 200 OK\r\nContent-Encoding: br\r\nContent-Length: 2\r\n\r\nok",  # unasked
    b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 2\r\n\r\nok",  # not gzip
])
def test_bad_framing_is_refused(client: httpx.Client, reply: bytes) -> None:
    raw = RawServer([(reply, False)])
    try:
        with pytest.raises(httpx.HTTPError):
            get(client, raw)
    finally:
        raw.close()


@pytest.fixture
def tls_server(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """An HTTPS server on 127.0.0.1 with a certificate of its own, trusted through
    SSL_CERT_FILE (which httpx reads instead of certifi's bundle when it is set)."""
    import datetime
    import ipaddress
    import ssl

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    server = Server()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    server.httpd.socket = context.wrap_socket(server.httpd.socket, server_side=True)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert_file))
    yield f"https://127.0.0.1:{server.httpd.server_address[1]}"
    server.stop()


def test_https_round_trips_on_one_verified_connection(tls_server: str) -> None:
    client = new_client(tls_server, 2, 5.0)
    try:
        first = fetch(client, "PUT", tls_server + "/fhir/R4/Patient/p1", content=b'{"a": 1}',
                      timeout=5.0, max_bytes=1000)
        second = fetch(client, "GET", tls_server + "/fhir/R4/Patient/p1", timeout=5.0,
                       max_bytes=1000)
    finally:
        client.close()
    assert json.loads(first.body)["echo"] == {"a": 1} and second.status == 200


def test_an_untrusted_certificate_sends_nothing(tls_server: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SSL_CERT_FILE")  # certifi's bundle, which does not hold it
    client = new_client(tls_server, 2, 5.0)
    with pytest.raises(httpx.ConnectError) as caught:
        fetch(client, "POST", tls_server + "/fhir/R4/Patient", content=b"{}", timeout=5.0,
              max_bytes=1000)
    client.close()
    assert never_sent(caught.value)


@pytest.mark.parametrize(("exc", "sent"), [
    (httpx.ConnectError("refused"), False),
    (httpx.ConnectTimeout("no SYN-ACK"), False),
    (httpx.PoolTimeout("no free connection"), False),
    (httpx.LocalProtocolError("bad header"), False),
    (httpx.UnsupportedProtocol("ftp"), False),
    (httpx.ReadTimeout("no answer"), True),
    (httpx.WriteTimeout("stalled mid-request"), True),
    (httpx.RemoteProtocolError("Server disconnected without sending a response"), True),
    (httpx.ReadError("reset"), True),
    (httpx.WriteError("broken pipe"), True),
    (AnswerTooLarge("too large"), True),
    (httpx.DecodingError("bad gzip"), True),
])
def test_what_may_have_reached_the_server(exc: httpx.HTTPError, sent: bool) -> None:
    # A send that never left is safe to retry; anything else may have been acted on.
    assert never_sent(exc) is not sent
