"""Redis behind Sentinel (docs/redis-ha.md): a real primary, two replicas and three Sentinels on
loopback (worker/ops/devstack.py SentinelGroup). Every process follows the primary through a
failover by itself, an idle worker blocked in BRPOP included (celery/celery#6348), and with
REDIS_MIN_REPLICAS_ACK a 2xx means replicated."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis

from tests.conftest import make_env
from tests.integration.test_inbound_sms import PATIENT
from tests.integration.test_operations import cli
from tests.support import Sandbox, eventually, our_logs, post_signed, sms_params
from worker.ops import devstack
from worker.settings import load_settings

# Failure deadlines far above the goals: the machine is shared with parallel runs.
WRITTEN_WITHIN = 90.0
SENTINEL_PASSWORD = "sentinel-test-pw-4c1d"


# An upstream bug (kombu 5.7's Sentinel channel, seen intermittently on this machine): when the
# connection drops under the consumer, Celery closes it, the close restores unacked messages
# through a pool kombu has just discarded, and `_connparams` dereferences the transport's
# client, already None: "AttributeError: 'NoneType' object has no attribute 'hostname'", and
# the worker exits with "Unrecoverable error". It is not ours to patch (no overrides of kombu
# internals); deployments supervise workers (compose `restart: unless-stopped`, docs/redis-ha.md).
KOMBU_CLOSE_BUG = "'NoneType' object has no attribute 'hostname'"


class SupervisedWorker:
    """A worker restarted when it exits, as compose or a Procfile runner does, but only for
    KOMBU_CLOSE_BUG: any other exit is recorded and fails the test."""

    def __init__(self, env: dict[str, str], log_dir: Path, name: str) -> None:
        self.env, self.log_dir, self.name = env, log_dir, name
        self.workers = [devstack.start_worker(env, log_dir, name=name, concurrency=8)]
        self.restarts = 0
        self.unexpected: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(0.2):
            current = self.workers[-1]
            if current.proc.poll() is None:
                continue
            if KOMBU_CLOSE_BUG not in current.output():
                self.unexpected.append(current.output()[-2000:])
                return
            self.restarts += 1
            self.workers.append(devstack.start_worker(
                self.env, self.log_dir, name=f"{self.name}-{self.restarts}", concurrency=8))

    def output(self) -> str:
        return "\n".join(w.output() for w in self.workers)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for w in self.workers:
            w.stop()


@pytest.fixture()
def group(log_dir: Path, tmp_path: Path) -> Iterator[devstack.SentinelGroup]:
    """A fresh primary + 2 replicas + 3 Sentinels (each test may kill some of it)."""
    g = devstack.start_sentinel_group(log_dir, tmp_path / "ha", password=SENTINEL_PASSWORD)
    yield g
    g.stop()


def ha_env(group: devstack.SentinelGroup, fhir: devstack.FhirSandbox, **overrides: str
           ) -> dict[str, str]:
    """A worker's or receiver's environment pointing at the Sentinels."""
    return make_env(group.env()["REDIS_URL"], fhir.base_url, **{**group.env(), **overrides})


@pytest.mark.parametrize("fault", ["sigkill", "sigstop"])
def test_an_idle_worker_follows_a_failover_without_a_restart(
        group: devstack.SentinelGroup, fhir_server: devstack.FhirSandbox, sandbox: Sandbox,
        log_dir: Path, fault: str) -> None:
    # celery/celery#6348: a worker waiting in BRPOP on the primary that dies. SIGKILL closes
    # its sockets (the worker gets a reset at once); SIGSTOP is a host gone silent (a power
    # cut, a partition): no reset, the BRPOP just never answers.
    env = ha_env(group, fhir_server)
    sandbox.patient(PATIENT)
    worker = devstack.start_worker(env, log_dir, name="worker-ha-idle", concurrency=4)
    app = _app(env)
    try:
        first = sms_params(PATIENT, "before the failover")
        assert post_signed(app, first).status_code == 200
        eventually(lambda: sandbox.messages(first["MessageSid"]), timeout=WRITTEN_WITHIN,
                   what="the first message written")
        time.sleep(1.0)  # the worker is back in BRPOP, idle
        old = group.primary().port
        group.server(old).kill() if fault == "sigkill" else group.server(old).pause()
        killed = time.monotonic()
        new = group.wait_for_new_primary(old)
        promoted = time.monotonic()
        after = sms_params(PATIENT, "after the failover")
        resp = eventually(lambda: _accepted(app, after), timeout=30,
                          what="the receiver accepting again")
        answered = time.monotonic()
        eventually(lambda: sandbox.messages(after["MessageSid"]), timeout=WRITTEN_WITHIN,
                   what="the message after the failover written by the same worker")
        written = time.monotonic()
        assert worker.proc.poll() is None  # the same process, never restarted
        assert resp.status_code == 200
        print(f"{fault} failover {old}->{new}: promoted {promoted - killed:.1f}s after the kill, "
              f"accepted {answered - promoted:.1f}s and written {written - promoted:.1f}s "
              "after the promotion")
    finally:
        worker.stop()


def _app(env: dict[str, str]):  # type: ignore[no-untyped-def]
    from web.app import create_app

    return create_app(load_settings(env)).test_client()


def _accepted(client, params):  # type: ignore[no-untyped-def]
    resp = post_signed(client, params)
    return resp if resp.status_code == 200 else None


@dataclass
class Answer:
    """One webhook of a steady stream: when it was sent and what the receiver said."""

    sid: str
    sent: float
    answered: float
    status: int  # 0: no answer (connection error, timeout)


def steady_webhooks(port: int, stop: threading.Event, per_second: float,
                    answers: list[Answer]) -> None:
    """Post signed inbound SMS at a steady pace until `stop`, recording every answer."""
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        next_at = time.monotonic()
        n = 0
        while not stop.is_set():
            params = sms_params(PATIENT, f"steady {n}")
            sent = time.monotonic()
            try:
                status = post_signed(client, params).status_code
            except httpx.HTTPError:
                status = 0
            answers.append(Answer(params["MessageSid"], sent, time.monotonic(), status))
            n += 1
            next_at += 1 / per_second
            stop.wait(max(0.0, next_at - time.monotonic()))


def test_a_primary_killed_under_steady_webhooks_loses_nothing_and_duplicates_nothing(
        group: devstack.SentinelGroup, fhir_server: devstack.FhirSandbox, sandbox: Sandbox,
        log_dir: Path) -> None:
    # The "done when", at test scale: REDIS_MIN_REPLICAS_ACK=1, so a 2xx means a
    # replica holds the message and the promotion cannot lose it.
    env = ha_env(group, fhir_server, REDIS_MIN_REPLICAS_ACK="1")
    sandbox.patient(PATIENT)
    worker = SupervisedWorker(env, log_dir, "worker-ha-steady")
    port = devstack.free_port()
    web = devstack.start_web(env, log_dir, port, workers=2, name="web-ha-steady")
    answers: list[Answer] = []
    stop = threading.Event()
    sender = threading.Thread(target=steady_webhooks, args=(port, stop, 15.0, answers),
                              daemon=True)
    try:
        sender.start()
        time.sleep(4)
        old = group.primary().port
        group.server(old).kill()
        new = group.wait_for_new_primary(old)
        promoted = time.monotonic()
        time.sleep(12)
        stop.set()
        sender.join(15)
        accepted = [a for a in answers if a.status == 200]
        refused = [a for a in answers if a.status != 200]
        assert all(a.status in (0, 503) for a in refused), {a.status for a in refused}
        before = [a for a in accepted if a.sent < promoted]
        after = [a for a in accepted if a.sent >= promoted]
        assert before and after
        # Answered 2xx again within 10 s of the promotion, and from then on every time.
        back = min(a.answered for a in after)
        assert back - promoted < 10, back - promoted
        assert all(a.status == 200 for a in answers if a.sent > back)
        # Every 2xx written exactly once. The worker resumes by itself; the one exit allowed
        # is kombu's close bug above, after which the supervisor starts it again (counted).
        for a in accepted:
            eventually(lambda a=a: sandbox.messages(a.sid), timeout=WRITTEN_WITHIN,
                       what=f"accepted {a.sid} written")
        counts = {a.sid: len(sandbox.messages(a.sid)) for a in accepted}
        assert set(counts.values()) == {1}, {s: c for s, c in counts.items() if c != 1}
        assert not worker.unexpected, worker.unexpected
        # Through the failover, no message text and no Sentinel password in our logs (the
        # broker URL is printed with its password masked).
        logs = "\n".join((worker.output(), web.output()))
        assert "steady " not in logs and PATIENT not in logs
        assert SENTINEL_PASSWORD not in logs and SENTINEL_PASSWORD not in our_logs(log_dir)
        print(f"failover {old}->{new}: {len(answers)} webhooks, {len(accepted)} accepted "
              f"(all written once), {len(refused)} refused; 2xx again "
              f"{back - promoted:.1f}s after the promotion; worker restarts for kombu's close "
              f"bug: {worker.restarts}")
    finally:
        stop.set()
        web.stop()
        worker.stop()


def test_a_write_no_replica_acknowledged_is_not_answered_2xx(
        group: devstack.SentinelGroup, fhir_server: devstack.FhirSandbox) -> None:
    # REDIS_MIN_REPLICAS_ACK=N: the one-step publish is followed by WAIT N on its own
    # connection; fewer acknowledgements is the answer of a Redis that is down (503, and the
    # disk spool where that lands), never a 2xx for a write only the primary holds.
    one = _app(ha_env(group, fhir_server, REDIS_MIN_REPLICAS_ACK="1"))
    two = _app(ha_env(group, fhir_server, REDIS_MIN_REPLICAS_ACK="2"))
    assert post_signed(two, sms_params(PATIENT, "both replicas up")).status_code == 200
    replicas = [s for s in group.servers if s.port != group.primary().port]
    replicas[0].pause()
    try:
        started = time.monotonic()
        resp = post_signed(two, sms_params(PATIENT, "one replica silent"))
        took = time.monotonic() - started
        assert resp.status_code == 503, resp.get_data(as_text=True)
        assert resp.get_json()["error"] == "unavailable"
        assert took < 5, took  # WAIT is bounded within the enqueue's step
        assert post_signed(one, sms_params(PATIENT, "one is enough")).status_code == 200
        replicas[1].pause()
        assert post_signed(one, sms_params(PATIENT, "no replica")).status_code == 503
    finally:
        for r in replicas:
            r.resume()
    eventually(lambda: _accepted(one, sms_params(PATIENT, "replicas back")), timeout=30,
               what="2xx once the replicas acknowledge again")


def test_switchboard_check_shows_the_topology_it_sees(
        group: devstack.SentinelGroup, fhir_server: devstack.FhirSandbox) -> None:
    env = ha_env(group, fhir_server, REDIS_MIN_REPLICAS_ACK="2")
    primary = group.primary().port
    proc = cli(env, "check")
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    for port in group.sentinel_ports:
        assert f"ok   sentinel 127.0.0.1:{port}: names the primary 127.0.0.1:{primary}" in out
    assert "ok   sentinels: 3 of 3 reachable" in out
    assert f"ok   redis-primary: 127.0.0.1:{primary} role=master, 2 replica(s)" in out
    assert out.count("ok   replica 127.0.0.1:") == 2 and "state=online" in out
    assert "ok   replica-acks: REDIS_MIN_REPLICAS_ACK=2: 2 replica(s) acknowledged" in out
    assert SENTINEL_PASSWORD not in out + proc.stderr
    silent = next(s for s in group.servers if s.port != primary)
    group.sentinels[0].kill()
    silent.pause()
    try:
        proc = cli(env, "check")
    finally:
        silent.resume()
    out = proc.stdout
    assert proc.returncode == 1, out
    assert f"warn sentinel 127.0.0.1:{group.sentinel_ports[0]}: ConnectionError" in out
    assert "ok   sentinels: 2 of 3 reachable" in out
    assert "FAIL replica-acks: REDIS_MIN_REPLICAS_ACK=2: 1 replica(s) acknowledged" in out


def test_the_compose_sentinel_command_runs_a_sentinel_that_finds_the_primary(
        log_dir: Path, tmp_path: Path) -> None:
    # docker-compose.yml's Sentinel command, run here with the container's names mapped to
    # loopback (`redis` -> `localhost`, which needs resolve-hostnames as in the container).
    from tests.unit.test_compose import _compose, _shell_command

    primary = devstack.start_redis(log_dir, data_dir=tmp_path / "primary")
    port = devstack.free_port()
    command = _shell_command(_compose()["services"]["sentinel-1"]).replace(
        "/data/", f"{tmp_path}/").replace("port 26379", f"port {port}").replace(
        "switchboard redis 6379", f"switchboard localhost {primary.port}").replace(
        "exec redis-server", f"exec {devstack.redis_server_binary()}")
    child = devstack._spawn(f"sentinel-compose-{port}", ["sh", "-c", command], log_dir)
    try:
        with redis.Redis(port=port, socket_timeout=1) as sentinel:
            found = eventually(lambda: _master_addr(sentinel), timeout=20,
                               what="the Sentinel naming the primary")
        assert found == ["localhost", str(primary.port)]
        assert (tmp_path / "sentinel.conf").exists()
    finally:
        child.stop()
        primary.stop()


def _master_addr(sentinel: redis.Redis) -> list[str] | None:
    try:
        found = sentinel.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", "switchboard")
    except redis.exceptions.RedisError:
        return None
    return [v.decode() for v in found] if found else None


def test_flower_follows_the_failover(group: devstack.SentinelGroup,
                                     fhir_server: devstack.FhirSandbox, log_dir: Path) -> None:
    # Flower reads the app's broker URL and transport options (master_name, sentinel_kwargs).
    env = ha_env(group, fhir_server)
    port = devstack.free_port()
    flower = devstack.start_flower(env, log_dir, port, "admin:flower-ha-pw")
    app = _app(env)
    try:
        def queued() -> int | None:
            resp = httpx.get(f"http://127.0.0.1:{port}/api/queues/length",
                             auth=("admin", "flower-ha-pw"), timeout=10)
            if resp.status_code != 200:
                return None
            return sum(q["messages"] for q in resp.json()["active_queues"]) + 1  # truthy

        assert eventually(queued, timeout=30, what="queue lengths from Flower") == 1
        old = group.primary().port
        group.server(old).kill()
        group.wait_for_new_primary(old)
        eventually(lambda: _accepted(app, sms_params(PATIENT, "queued, no worker")),
                   timeout=30, what="a message queued on the new primary")
        eventually(lambda: queued() == 2, timeout=30,
                   what="Flower counting it on the new primary")
    finally:
        flower.stop()
