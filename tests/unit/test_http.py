"""The default HTTP boundary (urllib3) against a real HTTP server on loopback."""

from __future__ import annotations

import gzip
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from tests.support import eventually
from worker.fhir.client import FhirClient
from worker.fhir.outcome import FhirTransientError
from worker.http import (
    DirectHttp,
    HttpTimeout,
    HttpTransportError,
    Urllib3Http,
    environment_proxy,
)

THROTTLED = {"resourceType": "OperationOutcome", "issue": [{"code": "throttled"}]}


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
                elif self.path.endswith("/Patient/chunked"):
                    # Chunked and gzip, with a folded header line: what a proxy or a
                    # compressing server may send.
                    data = gzip.compress(json.dumps({"resourceType": "Patient",
                                                     "id": "chunked"}).encode())
                    self.send_response(200)
                    self.send_header("Content-Type", "application/fhir+json")
                    self.send_header("Content-Encoding", "gzip")
                    self.send_header("Transfer-Encoding", "chunked")
                    self.send_header("X-Folded", "first\r\n second")
                    self.end_headers()
                    for part in (data[:7], data[7:]):
                        self.wfile.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
                    self.wfile.write(b"0\r\n\r\n")
                elif self.path.endswith("/Patient/throttled"):
                    # Two header lines: the blocking quota comes first, so a reader that kept
                    # only the last line would wait 3 s instead of 56.
                    self._send(429, THROTTLED, [("RateLimit", '"fhirInteractions";r=0;t=56'),
                                                ("ratelimit", '"requests";r=99;t=3')])
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
    finally:
        c.close()
    token, create, read, search = server.seen
    assert (token.method, token.target) == ("POST", "/oauth2/token")
    assert token.body == b"grant_type=client_credentials&client_id=cid&client_secret=se%2Bcret"
    assert token.headers["content-type"] == "application/x-www-form-urlencoded"
    assert (create.method, create.target) == ("POST", "/fhir/R4/Patient")
    assert create.body == '{"resourceType":"Patient","name":[{"text":"Zoë"}]}'.encode()
    assert create.headers["content-type"] == create.headers["accept"] == "application/fhir+json"
    assert create.headers["authorization"] == "Bearer tok"
    assert create.headers["if-none-exist"] == "phone=%2B15551234567"
    assert "gzip" in create.headers["accept-encoding"]
    assert (read.method, read.target) == ("GET", "/fhir/R4/Patient/p1")
    # '+' stays percent-encoded on the wire; urllib3 also percent-encodes '|' (same value).
    assert search.target == "/fhir/R4/Communication?identifier=sys%7C%2B1&phone=%2B15551234567"
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
    assert exc.value.detail == "NewConnectionError on GET Patient"

    no_token = FhirClient(refused + "/fhir/R4/", refused + "/oauth2/token", "cid", "secret")
    with pytest.raises(FhirTransientError) as exc:
        no_token.read("Patient", "p1")
    no_token.close()
    assert exc.value.detail == "token endpoint unreachable: NewConnectionError"


def test_repeated_ratelimit_lines_are_read_as_one_header(server: Server) -> None:
    c = server.client()
    try:
        with pytest.raises(FhirTransientError) as exc:
            c.read("Patient", "throttled")
    finally:
        c.close()
    assert exc.value.status == 429 and exc.value.retry_after == 56


def test_a_proxy_gets_the_absolute_url(server: Server) -> None:
    http = Urllib3Http(proxy=server.origin)
    try:
        answer = http("GET", "http://fhir.test/fhir/R4/Patient/p1",
                      {"Accept": "application/fhir+json"}, None, 5.0)
    finally:
        http.close()
    assert answer.status == 200 and json.loads(answer.body)["id"] == "p1"
    assert answer.headers["content-type"] == "application/fhir+json"  # any case
    (seen,) = server.seen
    assert seen.target == "http://fhir.test/fhir/R4/Patient/p1"


def test_the_proxy_comes_from_the_environment_as_httpx_read_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    assert environment_proxy("https://fhir.example/fhir/R4/") is None
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    assert environment_proxy("https://fhir.example/fhir/R4/") == "http://proxy.internal:3128"
    assert environment_proxy("http://fhir.example/fhir/R4/") is None  # no HTTP_PROXY
    assert environment_proxy("https://127.0.0.1:8103/fhir/R4/") is None  # NO_PROXY (conftest)
    monkeypatch.setenv("HTTPS_PROXY", "proxy.internal:3128")  # no scheme: http, as httpx
    assert environment_proxy("https://fhir.example/fhir/R4/") == "http://proxy.internal:3128"
    monkeypatch.setenv("NO_PROXY", "fhir.example")
    assert environment_proxy("https://fhir.example:443/fhir/R4/") is None


def test_chunked_and_compressed_answers_keep_the_connection(server: Server) -> None:
    http = DirectHttp()
    try:
        first = http("GET", server.origin + "/fhir/R4/Patient/chunked", {}, None, 5.0)
        second = http("GET", server.origin + "/fhir/R4/Patient/p1", {}, None, 5.0)
    finally:
        http.close()
    assert first.status == 200 and json.loads(first.body)["id"] == "chunked"
    assert first.headers["x-folded"] == "first second"  # unfolded, as urllib3 does
    assert json.loads(second.body)["id"] == "p1"
    assert len({s.port for s in server.seen}) == 1  # the chunked body was read to its end


class RawServer:
    """Answers each request on a connection with the next canned reply, then does what the
    reply says: keep the connection, or close it."""

    def __init__(self, replies: list[tuple[bytes, bool]]) -> None:
        self.replies = list(replies)
        self.connections = 0
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
            with conn:
                while self.replies:
                    data = b""
                    while b"\r\n\r\n" not in data:
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        data += chunk
                    if not data:
                        break
                    reply, keep = self.replies.pop(0)
                    conn.sendall(reply)
                    if not keep:
                        break

    def close(self) -> None:
        self.listener.close()


def test_a_connection_the_server_closed_while_idle_is_not_reused() -> None:
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    # The server answers and then closes (no Connection: close said): the next request must
    # go on a new connection, not fail on the dead one.
    raw = RawServer([(ok, False), (ok, False)])
    http = DirectHttp()
    try:
        assert http("GET", raw.origin + "/a", {}, None, 5.0).body == b"ok"
        time.sleep(0.1)  # the server's close reaches us
        assert http("POST", raw.origin + "/b", {}, b"x", 5.0).body == b"ok"
    finally:
        http.close()
        raw.close()
    assert raw.connections == 2


def test_connection_close_and_a_body_to_the_end_of_the_connection() -> None:
    raw = RawServer([(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 3\r\n\r\none",
                      False),
                     (b"HTTP/1.0 201 Created\r\nContent-Type: text/plain\r\n\r\ntwo, to EOF",
                      False)])
    http = DirectHttp()
    try:
        first = http("GET", raw.origin + "/", {}, None, 5.0)
        second = http("GET", raw.origin + "/", {}, None, 5.0)
    finally:
        http.close()
        raw.close()
    assert (first.status, first.body) == (200, b"one")
    assert (second.status, second.body) == (201, b"two, to EOF")
    assert second.headers["content-type"] == "text/plain"
    assert raw.connections == 2


def test_a_full_pool_times_out_without_sending(server: Server) -> None:
    http = DirectHttp(maxsize=1)
    slow = threading.Thread(target=lambda: http("GET", server.origin + "/fhir/R4/Patient/slow",
                                                {}, None, 5.0))
    slow.start()
    try:
        eventually(lambda: server.seen, timeout=5, interval=0.01, what="the slow request")
        with pytest.raises(HttpTimeout) as caught:
            http("GET", server.origin + "/fhir/R4/Patient/p1", {}, None, 0.2)
        assert not caught.value.reached
    finally:
        server.release.set()
        slow.join()
        http.close()


def test_a_line_break_in_a_header_value_is_refused() -> None:
    http = DirectHttp()
    with pytest.raises(ValueError):
        http("GET", f"http://127.0.0.1:{closed_port()}/", {"X-A": "b\r\nX-Injected: 1"}, None,
             1.0)
    http.close()


def test_refused_means_nothing_was_sent() -> None:
    http = DirectHttp()
    with pytest.raises(HttpTransportError) as caught:
        http("POST", f"http://127.0.0.1:{closed_port()}/", {}, b"x", 1.0)
    http.close()
    assert not caught.value.reached and str(caught.value) == "NewConnectionError"


@pytest.fixture
def tls_server(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """An HTTPS server on 127.0.0.1 with a certificate of its own, trusted through
    SSL_CERT_FILE (which OpenSSL's default verify paths read)."""
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
    http = DirectHttp()
    try:
        first = http("PUT", tls_server + "/fhir/R4/Patient/p1", {}, b'{"a": 1}', 5.0)
        second = http("GET", tls_server + "/fhir/R4/Patient/p1", {}, None, 5.0)
    finally:
        http.close()
    assert json.loads(first.body)["echo"] == {"a": 1} and second.status == 200


def test_an_untrusted_certificate_sends_nothing(tls_server: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SSL_CERT_FILE")
    http = DirectHttp()
    with pytest.raises(HttpTransportError) as caught:
        http("POST", tls_server + "/fhir/R4/Patient", {}, b"{}", 5.0)
    http.close()
    assert not caught.value.reached and str(caught.value) == "SSLCertVerificationError"
