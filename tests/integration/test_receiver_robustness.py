"""The receiver under gunicorn against slow clients and a stalled Redis (hardening review 6, 7)."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode

import httpx
import pytest
import redis

from tests.conftest import Services, make_env
from tests.support import post_signed, sign, sms_params
from worker.ops import devstack
from worker.settings import load_settings
from worker.stores.inbox import INDEX as INBOX_INDEX


def slow_client(port: int, stop: threading.Event, every: float = 0.5) -> None:
    """A client that dribbles a webhook request one byte at a time and never finishes it."""
    request = b"POST /webhooks/twilio/sms HTTP/1.1\r\nHost: x\r\nContent-Length: 9999\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        for byte in request * 100:
            if stop.wait(every):
                return
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                return  # the server gave up on us: fine


@pytest.mark.parametrize("attackers", [2, 50])
def test_slow_clients_do_not_starve_genuine_webhooks(services: Services, log_dir: Path,
                                                     attackers: int) -> None:
    svc = services.get(worker=False)
    port = devstack.free_port()
    web = devstack.start_web(svc.env, log_dir, port, workers=2)
    stop = threading.Event()
    threads = [threading.Thread(target=slow_client, args=(port, stop), daemon=True)
               for _ in range(attackers)]
    try:
        for t in threads:
            t.start()
        time.sleep(2.0)  # every attacker connected and dribbling
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=15) as client:
            for _ in range(3):
                started = time.monotonic()
                resp = post_signed(client, sms_params("+15551230000", "still here"))
                took = time.monotonic() - started
                assert resp.status_code == 200, resp.text
                # Twilio gives up after 15 s; a sync worker held by a slow socket took 48 s.
                assert took < 5.0, took
    finally:
        stop.set()
        for t in threads:
            t.join(5)
        web.stop()
        svc.redis.delete("inbound", *svc.redis.scan_iter("switchboard:inbox:*"))


@pytest.fixture()
def private_redis(log_dir: Path, tmp_path: Path) -> Iterator[devstack.RedisServer]:
    """A redis-server of its own: this test stops it with SIGSTOP."""
    server = devstack.start_redis(log_dir, data_dir=tmp_path / "redis")
    yield server
    if server.child:
        os.kill(server.child.proc.pid, signal.SIGCONT)
    server.stop()


def test_a_stalled_redis_gets_a_prompt_503_and_keeps_nothing(
        private_redis: devstack.RedisServer, services: Services) -> None:
    fhir = services.get(worker=False).settings.fhir_base_url
    settings = load_settings(make_env(private_redis.url, fhir))
    from web.app import create_app

    client = create_app(settings).test_client()
    assert post_signed(client, sms_params("+15551230001", "before")).status_code == 200
    r = redis.Redis.from_url(private_redis.url)
    r.delete("inbound", INBOX_INDEX)
    assert private_redis.child is not None
    os.kill(private_redis.child.proc.pid, signal.SIGSTOP)
    try:
        params = sms_params("+15551230001", "while Redis is stalled")
        started = time.monotonic()
        resp = client.post("/webhooks/twilio/sms", data=urlencode(params),
                           headers={"X-Twilio-Signature": sign(params),
                                    "Content-Type": "application/x-www-form-urlencoded"})
        took = time.monotonic() - started
    finally:
        os.kill(private_redis.child.proc.pid, signal.SIGCONT)
    assert resp.status_code == 503
    assert took < 3.5, took  # was up to 25 s
    # "Answered 503" means "not kept": whatever reached Redis before it stalled is taken back,
    # so no sweep publishes it half an hour later.
    time.sleep(1.0)
    assert r.zcard(INBOX_INDEX) == 0
    r.close()


def test_a_body_that_does_not_arrive_in_time_gets_408(services: Services, log_dir: Path) -> None:
    svc = services.get(worker=False, RECEIVER_BODY_TIMEOUT_SECONDS="2")
    port = devstack.free_port()
    web = devstack.start_web(svc.env, log_dir, port, workers=1)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"POST /webhooks/twilio/sms HTTP/1.1\r\nHost: x\r\nContent-Type: "
                         b"application/x-www-form-urlencoded\r\nContent-Length: 100000\r\n\r\n")
            started = time.monotonic()
            answer = b""
            for _ in range(20):  # a byte a second; the deadline is 2 s
                try:
                    sock.sendall(b"a")
                    sock.settimeout(1.0)
                    answer += sock.recv(4096)
                except TimeoutError:
                    continue
                except OSError:
                    break
                if answer:
                    break
            took = time.monotonic() - started
        assert answer.startswith(b"HTTP/1.1 408"), answer[:80]
        assert took < 6, took  # the slot is free again after the deadline, not after 100 s
    finally:
        web.stop()


def test_no_request_is_smuggled_behind_a_timed_out_chunked_body(services: Services,
                                                                 log_dir: Path) -> None:
    """A chunk that promises more bytes than arrive in time: after the 408 the connection is
    over, so the chunk's late bytes are never parsed as a request of their own."""
    svc = services.get(worker=False, RECEIVER_BODY_TIMEOUT_SECONDS="2", API_TOKENS="t0k")
    port = devstack.free_port()
    web = devstack.start_web(svc.env, log_dir, port, workers=1)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t0k\r\n"
                         b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"38\r\n{")
            time.sleep(3.5)  # past the deadline
            smuggled = b"GET /v1/openapi.json?smuggled=1 HTTP/1.1\r\nHost: x\r\n\r\n"
            try:
                sock.sendall(smuggled + b"\r\n0\r\n\r\n")
            except OSError:
                pass  # already closed: what we want
            answer = b""
            sock.settimeout(3.0)
            try:
                while chunk := sock.recv(65536):
                    answer += chunk
            except (TimeoutError, OSError):
                pass
        assert answer.startswith(b"HTTP/1.1 408"), answer[:80]
        assert b"200 OK" not in answer and b"openapi" not in answer
        assert "smuggled=1" not in web.output()
    finally:
        web.stop()
