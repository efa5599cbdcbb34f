"""The receiver's disk spool (worker/broker/spool.py, web/spooling.py) on a real disk, a real
redis-server, and under gunicorn with a real Celery worker and the FHIR sandbox."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.conftest import API_TOKEN, make_env
from tests.support import DATA_KEY, Sandbox, eventually, post_signed, sms_params
from web.enqueue import Enqueuer
from web.spooling import SpoolingEnqueuer
from web.webhooks.sendgrid import post_store
from worker.broker.spool import (
    FLUSHING,
    OPEN,
    PROGRESS,
    Record,
    Spool,
    Spooled,
    SpoolRefused,
    last_offset,
    scan,
    spool_from_settings,
)
from worker.ops import devstack
from worker.ops.metrics import Metrics
from worker.settings import Settings, load_settings
from worker.stores.email_posts import EmailPosts, post_ref
from worker.stores.inbox import ENTRIES as INBOX_ENTRIES

PHONE = "+15551237700"


def entry(n: int) -> Spooled:
    return Spooled("switchboard.inbound_sms", "inbound", [{"n": n, "Body": f"body {n}"}],
                   f"sms:test-{n}")


def spool_at(path: Path, settings: Settings | None = None, max_bytes: int = 1 << 30) -> Spool:
    sealer = settings.sealer() if settings else load_settings(
        make_env("redis://127.0.0.1:1/0", "http://127.0.0.1:1/fhir/R4/")).sealer()
    return Spool(path, sealer, max_bytes, 12 << 20)


class Recorder:
    """The flush's publish as a recording fake: keeps what it was given; fails on demand."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.got: list[int] = []
        self.fail_after = fail_after
        self.lock = threading.Lock()

    def __call__(self, e: Spooled) -> None:
        with self.lock:
            if self.fail_after is not None and len(self.got) >= self.fail_after:
                raise ConnectionError("redis is away")
            self.got.append(e.args[0]["n"])


# -- the spool on disk ------------------------------------------------------------------------

def test_every_entry_is_published_once_oldest_first_and_the_files_go(tmp_path: Path) -> None:
    spool = spool_at(tmp_path)
    for n in range(20):
        spool.append(entry(n))
    assert spool.status().entries == 20
    rec = Recorder()
    done = spool.flush(rec)
    assert rec.got == list(range(20)) and done.published == 20 and done.failed is None
    assert os.listdir(tmp_path) == [] and spool.status().entries == 0
    spool.append(entry(20))  # the writer starts a new segment after its old one was claimed
    assert spool.status().entries == 1 and spool.flush(rec).published == 1
    assert rec.got == list(range(21))


def test_status_counts_what_was_appended_since_it_last_looked(tmp_path: Path) -> None:
    spool = spool_at(tmp_path)
    first = Spooled("t", "inbound", [{"n": 0}], "k0", received_at=time.time() - 60)
    spool.append(first)
    spool.append(entry(1))
    before = spool.status()
    assert (before.entries, before.segments) == (2, 1)
    for n in range(2, 5):
        spool.append(entry(n))
    after = spool.status()
    assert after.entries == 5 and after.bytes > before.bytes
    assert after.oldest_received_at == first.received_at and after.oldest_age(time.time()) >= 60
    assert spool_at(tmp_path).status() == after  # a fresh reader (another process) agrees


def test_a_flush_stopped_by_redis_resumes_where_it_stopped(tmp_path: Path) -> None:
    spool = spool_at(tmp_path)
    for n in range(10):
        spool.append(entry(n))
    rec = Recorder(fail_after=4)
    done = spool.flush(rec)
    assert done.published == 4 and done.failed == "ConnectionError"
    names = sorted(os.listdir(tmp_path))
    assert [n.rsplit(".", 1)[1] for n in names] == ["flushing", "progress"]
    assert spool.status().entries == 6
    spool.append(entry(10))  # meanwhile: a new segment, behind the claimed one
    rec.fail_after = None
    assert spool.flush(rec).published == 7
    assert rec.got == list(range(11))


def test_flushers_and_writers_at_once_publish_each_entry_exactly_once(tmp_path: Path) -> None:
    # Two "processes" (their own Spool objects, so their own file descriptors and locks)
    # each appending while two flushers claim segments under them.
    writers = [spool_at(tmp_path), spool_at(tmp_path)]
    flushers = [spool_at(tmp_path), spool_at(tmp_path)]
    rec = Recorder()
    done = threading.Event()

    def write(w: int) -> None:
        for n in range(w * 1000, w * 1000 + 150):
            writers[w].append(entry(n))

    def flush(f: int) -> None:
        while not done.is_set():
            flushers[f].flush(rec)

    threads = [threading.Thread(target=flush, args=(f,)) for f in range(2)]
    for t in threads:
        t.start()
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(write, range(2)))
    done.set()
    for t in threads:
        t.join(30)
    flushers[0].flush(rec)
    assert sorted(rec.got) == sorted([*range(150), *range(1000, 1150)])
    assert len(rec.got) == len(set(rec.got))
    for w in range(2):  # each writer's entries in its order
        mine = [n for n in rec.got if n // 1000 == w]
        assert mine == sorted(mine)


def test_a_torn_tail_left_by_a_crash_is_dropped_once(tmp_path: Path) -> None:
    spool = spool_at(tmp_path)
    for n in range(3):
        spool.append(entry(n))
    (segment,) = tmp_path.glob("*" + OPEN)
    with segment.open("ab") as f:
        f.write(b"SBS1\x00\x00\x01\x00")  # a record whose append never finished
    rec = Recorder()
    done = spool.flush(rec)
    assert rec.got == [0, 1, 2] and done.torn == 1 and os.listdir(tmp_path) == []


def test_a_record_sealed_with_a_missing_key_is_kept_aside_and_flushed_once_it_is_back(
        tmp_path: Path) -> None:
    spool_at(tmp_path).append(entry(1))  # sealed with DATA_KEY
    spool_at(tmp_path).append(entry(2))
    new_key_env = make_env("redis://127.0.0.1:1/0", "http://127.0.0.1:1/fhir/R4/",
                           DATA_ENCRYPTION_KEYS=_other_key())
    without_old = spool_at(tmp_path, load_settings(new_key_env))
    rec = Recorder()
    done = without_old.flush(rec)
    assert done.kept == 2 and rec.got == []
    assert without_old.status().kept == 2 and without_old.status().entries == 0
    assert without_old.flush(rec).kept == 0  # the periodic flush leaves them alone
    both = spool_at(tmp_path, load_settings({**new_key_env, "DATA_ENCRYPTION_KEYS":
                                             _other_key() + "," + DATA_KEY}))
    assert both.flush(rec, kept=True).published == 2
    assert sorted(rec.got) == [1, 2] and both.status().kept == 0


_OTHER: list[str] = []


def _other_key() -> str:
    from worker.crypto import generate_key

    if not _OTHER:
        _OTHER.append(generate_key())
    return _OTHER[0]


def test_past_its_size_cap_the_spool_refuses(tmp_path: Path) -> None:
    spool = spool_at(tmp_path, max_bytes=8192)
    spool.append(entry(0))
    with pytest.raises(SpoolRefused) as refused:
        for n in range(1, 100):
            spool.append(entry(n))
    assert refused.value.reason == "full"
    kept = spool.status().entries
    assert 1 <= kept < 100
    rec = Recorder()
    assert spool.flush(rec).published == kept  # what was accepted is whole


def test_a_full_disk_refuses_and_leaves_every_accepted_record_whole(tmp_path: Path) -> None:
    mount = tmp_path / "tiny"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "ha-spool-test", str(mount)],
                          capture_output=True, check=False)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    try:
        spool = spool_at(mount)
        big = [Spooled("t", "inbound", [{"n": n, "pad": "x" * 5000}], f"k{n}")
               for n in range(100)]
        accepted = 0
        with pytest.raises(SpoolRefused) as refused:
            for e in big:
                spool.append(e)
                accepted += 1
        assert refused.value.reason == "disk-full"
        (segment,) = mount.glob("*" + OPEN)
        found = scan(segment.read_bytes())
        assert found.torn == 0 and len(found.records) == accepted  # no half record left
        rec = Recorder()
        assert spool.flush(rec).published == accepted and rec.got == list(range(accepted))
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_a_spool_directory_that_cannot_be_written_refuses(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.raises(SpoolRefused) as refused:
        spool_at(not_a_dir / "spool").append(entry(0))
    assert refused.value.reason == "disk-error"


# -- the receiver with Redis away -------------------------------------------------------------

@pytest.fixture()
def private_redis(log_dir: Path, tmp_path: Path) -> Iterator[devstack.RedisServer]:
    """A redis-server of this test's own, to stop and kill."""
    server = devstack.start_redis(log_dir, data_dir=tmp_path / "redis")
    yield server
    if server.child and server.child.proc.poll() is None:
        os.kill(server.child.proc.pid, signal.SIGCONT)
    server.stop()


def closed_port_env(tmp_path: Path, **overrides: str) -> dict[str, str]:
    return make_env(f"redis://127.0.0.1:{devstack.free_port()}/0", "http://127.0.0.1:9/fhir/R4/",
                    **{"SPOOL_DIR": str(tmp_path / "spool"), "API_TOKENS": API_TOKEN,
                       **overrides})


def test_with_redis_away_a_webhook_is_spooled_sealed_and_answered_200(tmp_path: Path) -> None:
    from web.app import create_app

    settings = load_settings(closed_port_env(tmp_path))
    client = create_app(settings).test_client()
    body = "my chest hurts since Tuesday, call me"
    resp = post_signed(client, sms_params(PHONE, body))
    assert resp.status_code == 200, resp.text
    spool = spool_from_settings(settings)
    assert spool is not None and spool.status().entries == 1
    files = list((tmp_path / "spool").iterdir())
    assert files and all(f.stat().st_mode & 0o077 == 0 for f in files)  # owner only
    for f in files:
        raw = f.read_bytes()
        for secret in (body, "chest", PHONE, PHONE[2:]):
            assert secret.encode() not in raw, f.name
    # The API does not spool: its request state lives in Redis (docs/spool.md).
    api = client.post("/v1/messages", json={"communication": "Communication/c1"},
                      headers={"Authorization": f"Bearer {API_TOKEN}"})
    assert api.status_code == 503


@pytest.mark.parametrize("spool_dir", ["", "unwritable"])
def test_without_a_spool_that_takes_it_the_answer_is_503(tmp_path: Path, spool_dir: str) -> None:
    from web.app import create_app

    if spool_dir:
        (tmp_path / "file").write_text("x")
        spool_dir = str(tmp_path / "file" / "spool")
    client = create_app(load_settings(closed_port_env(tmp_path, SPOOL_DIR=spool_dir))
                        ).test_client()
    resp = post_signed(client, sms_params(PHONE, "hello"))
    assert resp.status_code == 503 and resp.get_json()["error"] == "unavailable"


@pytest.mark.parametrize("lost", ["post-and-task", "task-only"])
def test_a_spooled_email_carries_its_post_when_redis_did_not_take_it(
        tmp_path: Path, private_redis: devstack.RedisServer, lost: str) -> None:
    from tests.email_payloads import INBOUND_PATH, raw_email, raw_post
    from web.app import create_app

    settings = load_settings(make_env(private_redis.url, "http://127.0.0.1:9/fhir/R4/",
                                      SPOOL_DIR=str(tmp_path / "spool"),
                                      SENDGRID_INBOUND_BASIC_AUTH="sendgrid:s3cret"))
    content_type, body = raw_post("pat@example.org", raw_email("pat@example.org"))
    if lost == "task-only":
        # The post store reaches Redis; the task's publish does not (gone between the two).
        away = load_settings({**settings.as_env(),
                              "REDIS_URL": f"redis://127.0.0.1:{devstack.free_port()}/0"})
        client = create_app(settings, Enqueuer.from_settings(away)).test_client()
    else:
        client = create_app(settings).test_client()
        private_redis.kill()  # the post store is in Redis too
    resp = client.post(INBOUND_PATH, data=body, headers={
        "Content-Type": content_type,
        "Authorization": "Basic " + base64.b64encode(b"sendgrid:s3cret").decode()})
    assert resp.status_code == 200, resp.text
    spool = spool_from_settings(settings)
    assert spool is not None and spool.status().entries == 1
    # The post's bytes ride along only when Redis does not have them.
    assert (spool.status().bytes > len(body)) == (lost == "post-and-task")
    if lost == "post-and-task":
        private_redis.start()
    assert spool.flush(_spooling(settings).republish).published == 1
    r = redis.Redis.from_url(private_redis.url)
    assert EmailPosts.from_settings(r, settings).get(post_ref(body)) == body
    assert r.llen("inbound") == 1


def _spooling(settings: Settings) -> SpoolingEnqueuer:
    return SpoolingEnqueuer(Enqueuer.from_settings(settings), spool_from_settings(settings),
                            post_store(settings), Metrics(_fresh_registry()))


def _fresh_registry() -> Any:
    from prometheus_client import CollectorRegistry

    return CollectorRegistry()


# -- exactly once through a crash -------------------------------------------------------------

KILL_MID_FLUSH = """
import os, signal, sys
from tests.integration.test_spool import _spooling
from worker.settings import load_settings
import json
settings = load_settings(json.loads(sys.argv[1]))
spooling = _spooling(settings)
published = []
def publish(entry):
    spooling.republish(entry)
    published.append(entry)
    if len(published) == int(sys.argv[2]):
        os.kill(os.getpid(), signal.SIGKILL)  # published; its progress not yet recorded
spooling.spool.flush(publish)
"""


def test_a_flusher_killed_between_publish_and_progress_publishes_nothing_twice(
        tmp_path: Path, private_redis: devstack.RedisServer) -> None:
    env = make_env(private_redis.url, "http://127.0.0.1:9/fhir/R4/",
                   SPOOL_DIR=str(tmp_path / "spool"))
    settings = load_settings(env)
    spooling = _spooling(settings)
    assert spooling.spool is not None
    for n in range(30):
        spooling.spool.append(entry(n))
    proc = subprocess.run([sys.executable, "-c", KILL_MID_FLUSH, json.dumps(env), "12"],
                          cwd=Path(__file__).resolve().parents[2], capture_output=True,
                          check=False, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    r = redis.Redis.from_url(private_redis.url)
    assert r.llen("inbound") == 12
    (progress,) = (tmp_path / "spool").glob("*" + PROGRESS)
    assert last_offset(progress.read_bytes()) > 0  # 11 recorded, the 12th not
    assert len(list((tmp_path / "spool").glob("*" + FLUSHING))) == 1
    done = spooling.spool.flush(spooling.republish)  # takes the dead flusher's segment over
    assert done.failed is None and done.published == 19  # the 12th again, as a no-op
    assert r.llen("inbound") == 30 and r.hlen(INBOX_ENTRIES) == 30
    assert list((tmp_path / "spool").iterdir()) == []


def test_the_publish_of_one_entry_twice_is_a_no_op(
        tmp_path: Path, private_redis: devstack.RedisServer) -> None:
    settings = load_settings(make_env(private_redis.url, "http://127.0.0.1:9/fhir/R4/",
                                      SPOOL_DIR=str(tmp_path / "spool")))
    spooling = _spooling(settings)
    e = entry(7)
    spooling.republish(e)
    spooling.republish(e)
    spooling.republish(entry(8))
    assert redis.Redis.from_url(private_redis.url).llen("inbound") == 2


# -- gunicorn, Redis stopped or killed, a real worker, FHIR ------------------------------------

def _post_all(port: int, messages: list[dict[str, str]], over: float) -> list[int]:
    """Post every message, at a steady pace spread over `over` seconds."""
    started = time.monotonic()
    pace = over / len(messages)

    def post(i: int) -> int:
        time.sleep(max(0.0, started + i * pace - time.monotonic()))
        return int(post_signed(client, messages[i]).status_code)

    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client, \
            ThreadPoolExecutor(16) as pool:
        return list(pool.map(post, range(len(messages))))


def _web_children(web: devstack.Child) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(web.proc.pid)], capture_output=True, text=True,
                         check=False).stdout
    return [int(p) for p in out.split()]


# Issue #28's figure: Redis stopped for 15 s while 100 webhooks arrive at a steady pace: all
# answered 2xx, all written within 90 s of SIGCONT. Killed: the same, at once.
@pytest.mark.parametrize(("outage", "n", "over"), [("sigstop", 100, 15.0), ("killed", 60, 0.0)])
def test_webhooks_during_a_redis_outage_are_answered_200_and_written_once(
        tmp_path: Path, log_dir: Path, private_redis: devstack.RedisServer, sandbox: Sandbox,
        fhir_server: devstack.FhirSandbox, outage: str, n: int, over: float) -> None:
    env = make_env(private_redis.url, fhir_server.base_url, SPOOL_DIR=str(tmp_path / "spool"))
    settings = load_settings(env)
    sandbox.patient(PHONE)
    port = devstack.free_port()
    web = devstack.start_web(env, log_dir, port, workers=2, name=f"web-spool-{outage}")
    worker: devstack.Child | None = None
    try:
        assert private_redis.child is not None
        if outage == "sigstop":
            os.kill(private_redis.child.proc.pid, signal.SIGSTOP)
        else:
            private_redis.kill()
        messages = [sms_params(PHONE, f"during the outage {i}") for i in range(n)]
        codes = _post_all(port, messages, over)
        assert codes == [200] * n
        spool = spool_from_settings(settings)
        assert spool is not None and spool.status().entries == n
        back = time.monotonic()
        if outage == "sigstop":
            os.kill(private_redis.child.proc.pid, signal.SIGCONT)
        else:
            private_redis.start()
        eventually(lambda: spool.status().entries == 0, timeout=30, what="the spool flushed")
        r = redis.Redis.from_url(private_redis.url)
        # Published exactly once each: as many task messages as webhooks, before any worker.
        assert r.llen("inbound") == n and r.hlen(INBOX_ENTRIES) == n
        worker = devstack.start_worker(env, log_dir, name=f"worker-spool-{outage}")
        for m in messages:
            eventually(lambda m=m: len(sandbox.messages(m["MessageSid"])) == 1, timeout=90,
                       what="written")
        took = time.monotonic() - back
        assert all(len(sandbox.messages(m["MessageSid"])) == 1 for m in messages)
        print(f"{outage}: {n} spooled webhooks written {took:.1f} s after Redis came back")
        assert took < 90
    finally:
        if worker:
            worker.stop()
        web.stop()


def test_a_web_process_killed_mid_flush_loses_nothing_and_publishes_nothing_twice(
        tmp_path: Path, log_dir: Path, private_redis: devstack.RedisServer) -> None:
    env = make_env(private_redis.url, "http://127.0.0.1:9/fhir/R4/",
                   SPOOL_DIR=str(tmp_path / "spool"), SPOOL_FLUSH_INTERVAL_SECONDS="0.2")
    settings = load_settings(env)
    spool = spool_from_settings(settings)
    assert spool is not None
    n = 400
    private_redis.kill()
    for i in range(n):  # as the receiver would have, while Redis was away
        spool.append(Spooled("switchboard.inbound_sms", "inbound",
                             [sms_params(PHONE, f"m{i}"), {}], f"sms:spool-kill-{i}"))
    port = devstack.free_port()
    web = devstack.start_web(env, log_dir, port, workers=2, name="web-spool-kill")
    try:
        eventually(lambda: len(_web_children(web)) == 2, what="two gunicorn workers")
        private_redis.start()
        caught = None
        deadline = time.monotonic() + 30
        while caught is None and time.monotonic() < deadline:
            for p in (tmp_path / "spool").glob("*" + PROGRESS):
                try:
                    done_to = last_offset(p.read_bytes())
                except FileNotFoundError:
                    continue
                if done_to > 0:
                    for pid in _web_children(web):
                        os.kill(pid, signal.SIGKILL)
                    caught = done_to
                    break
            time.sleep(0.002)
        assert caught is not None, "the flush was never seen in progress"
        (segment,) = (tmp_path / "spool").glob("*" + FLUSHING)
        total = len([r for r in scan(segment.read_bytes()).records if isinstance(r, Record)])
        assert total == n
        r = redis.Redis.from_url(private_redis.url)
        published_at_kill = r.llen("inbound")
        assert 0 < published_at_kill < n, published_at_kill  # killed mid-flush
        # gunicorn starts new workers; one of them takes the dead one's segment over.
        eventually(lambda: spool.status().entries == 0, timeout=60, what="the rest flushed")
        assert r.llen("inbound") == n and r.hlen(INBOX_ENTRIES) == n
        print(f"killed after {published_at_kill} of {n} published; all {n} published once")
    finally:
        web.stop()


# -- operations: the command and the metrics --------------------------------------------------

def _switchboard(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("switchboard")
    return subprocess.run([str(exe), *args], env={**os.environ, **env}, capture_output=True,
                          text=True, check=False, timeout=60)


def test_spool_status_and_flush_show_and_drain_it_and_metrics_count_it(
        tmp_path: Path, private_redis: devstack.RedisServer) -> None:
    from web.app import create_app

    env = make_env(private_redis.url, "http://127.0.0.1:9/fhir/R4/",
                   SPOOL_DIR=str(tmp_path / "spool"))
    settings = load_settings(env)
    private_redis.kill()
    client = create_app(settings).test_client()
    for i in range(3):
        assert post_signed(client, sms_params(PHONE, f"while away {i}")).status_code == 200
    time.sleep(0.2)
    shown = _switchboard(env, "spool", "status", "--json")
    assert shown.returncode == 0, shown.stderr
    status = json.loads(shown.stdout)
    assert status["entries"] == 3 and status["bytes"] > 0 and status["oldest_age_seconds"] >= 0.2
    page = client.get("/metrics").get_data(as_text=True)
    assert "switchboard_spool_entries 3.0" in page
    assert "switchboard_spool_appended_total" in page
    refused = _switchboard(env, "spool", "flush")  # Redis still away: nothing lost
    assert refused.returncode == 1 and "published 0" in refused.stdout
    private_redis.start()
    flushed = _switchboard(env, "spool", "flush")
    assert flushed.returncode == 0 and "published 3" in flushed.stdout, flushed.stderr
    assert json.loads(_switchboard(env, "spool", "status", "--json").stdout)["entries"] == 0
    assert redis.Redis.from_url(private_redis.url).llen("inbound") == 3
    page = client.get("/metrics").get_data(as_text=True)
    assert "switchboard_spool_entries 0.0" in page
    assert "switchboard_spool_oldest_age_seconds 0.0" in page
