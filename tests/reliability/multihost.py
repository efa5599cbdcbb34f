"""Workers and receivers on several hosts (issue #28, item 4): network namespaces as hosts.

python -m tests.reliability --only multihost      (root and `ip` needed; stops by itself)

The hosts (`ip netns`, names prefixed `sbmh-`), each with a veth onto the bridge `sbmh-br0` in
the root namespace, on the private network 10.231.0.0/24 (nothing else is reachable from them):

    sbmh-r1  Redis 10.231.0.11 (the first primary)   Sentinel 10.231.0.21
    sbmh-r2  Redis 10.231.0.12 (replica)             Sentinel 10.231.0.22
    sbmh-r3  Redis 10.231.0.13 (replica)             Sentinel 10.231.0.23
    sbmh-wk1 Celery worker 10.231.0.31               sbmh-wk2 Celery worker (+ beat) 10.231.0.32
    sbmh-rcv the receiver under gunicorn, as the Procfile starts it, 10.231.0.41:8000
    root     the FHIR sandbox and the provider sandbox on the bridge address 10.231.0.1, and
             this driver (the provider's webhooks come from here)

Three faults, each counted (accepted = 2xx, written to FHIR / sent, lost, duplicated, time to
recover), with the bars of the issue's "Done when":
  a. SIGKILL the primary while ~400 webhooks arrive at a steady pace;
  b. cut one worker host off (its link down at the bridge) for 20 s while webhooks arrive and
     sends are in flight;
  c. SIGSTOP every Redis server for 15 s while 100 webhooks arrive.

One run at a time (a lock file); a run killed outright leaves namespaces behind, which the next
run removes before it starts. Every step is bounded in time.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import redis
from redis.sentinel import Sentinel

from tests import at_rest
from tests.reliability.harness import Counts, Stack, phone, sms
from tests.reliability.scenarios import (
    _inbound_tally,
    _outbound_messages,
    _outbound_tally,
    _patients,
)
from tests.support import Sandbox, metric
from worker.ops import devstack
from worker.settings import Settings, load_settings

PREFIX = "sbmh-"
BRIDGE = PREFIX + "br0"
NET = "10.231.0"
GATEWAY = f"{NET}.1"  # the root namespace's address on the bridge
MASTER_NAME = "switchboard"
REDIS_PORT, SENTINEL_PORT, WEB_PORT = 6379, 26379, 8000
LOCK_FILE = Path(tempfile.gettempdir()) / "switchboard-multihost.lock"
# Sentinel's failure detection, shortened from its 30 s default so a run is minutes long: the
# promotion then follows a primary's death by about 3 s. (A deployment picks its own.)
DOWN_AFTER_MS, FAILOVER_TIMEOUT_MS = 2000, 10000


@dataclass(frozen=True)
class Host:
    """A network namespace with its addresses on the bridge (the first one is its own)."""

    name: str
    addresses: tuple[str, ...]

    @property
    def ns(self) -> str:
        """The namespace's name (also the root-side veth's name)."""
        return PREFIX + self.name

    @property
    def address(self) -> str:
        """The host's primary address."""
        return self.addresses[0]


REDIS_HOSTS = [Host(f"r{i}", (f"{NET}.1{i}", f"{NET}.2{i}")) for i in (1, 2, 3)]
WORKER_HOSTS = [Host("wk1", (f"{NET}.31",)), Host("wk2", (f"{NET}.32",))]
RECEIVER_HOST = Host("rcv", (f"{NET}.41",))
HOSTS = [*REDIS_HOSTS, *WORKER_HOSTS, RECEIVER_HOST]


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check,
                          timeout=30)


def missing_requirement() -> str | None:
    """Why the multi-host suite cannot run here (None: it can)."""
    if os.geteuid() != 0:
        return "needs root (ip netns, veth and bridge links)"
    if not shutil.which("ip"):
        return "needs the `ip` tool (iproute2)"
    try:
        devstack.redis_server_binary()
    except devstack.StartError as exc:
        return str(exc)
    return None


class Network:
    """The namespaces, their veths and the bridge; `clean()` removes every `sbmh-` leftover."""

    def __init__(self) -> None:
        self._lock_fd: int | None = None

    def up(self) -> None:
        """Take the run lock, clean leftovers of a killed run, and build the network."""
        self._lock_fd = os.open(LOCK_FILE, os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)  # another run finishes first
        self.clean()
        _ip("link", "add", BRIDGE, "type", "bridge")
        _ip("addr", "add", f"{GATEWAY}/24", "dev", BRIDGE)
        _ip("link", "set", BRIDGE, "up")
        for host in HOSTS:
            _ip("netns", "add", host.ns)
            _ip("link", "add", host.ns, "type", "veth", "peer", "name", "eth0", "netns", host.ns)
            _ip("link", "set", host.ns, "master", BRIDGE, "up")
            for address in host.addresses:  # the first one added is the source address
                _ip("-n", host.ns, "addr", "add", f"{address}/24", "dev", "eth0")
            _ip("-n", host.ns, "link", "set", "eth0", "up")
            _ip("-n", host.ns, "link", "set", "lo", "up")

    def down(self) -> None:
        """Remove everything and release the lock."""
        self.clean()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    @staticmethod
    def clean() -> None:
        """Kill what still runs inside `sbmh-` namespaces, delete them and the bridge."""
        for line in _ip("netns", "list", check=False).stdout.splitlines():
            name = line.split()[0] if line.split() else ""
            if not name.startswith(PREFIX):
                continue
            for pid in _ip("netns", "pids", name, check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            _ip("netns", "del", name, check=False)
        for line in _ip("-o", "link", "show", check=False).stdout.splitlines():
            parts = line.split(":")
            if len(parts) > 1 and parts[1].strip().split("@")[0].startswith(PREFIX):
                _ip("link", "del", parts[1].strip().split("@")[0], check=False)

    @staticmethod
    def cut(host: Host) -> None:
        """Unplug the host's cable at the bridge: its packets go nowhere (a partition)."""
        _ip("link", "set", host.ns, "down")

    @staticmethod
    def mend(host: Host) -> None:
        """Plug it back in."""
        _ip("link", "set", host.ns, "master", BRIDGE, "up")


@dataclass
class RedisNode:
    """One redis-server (AOF, every write fsynced, as in the loopback suite) on its own host."""

    host: Host
    log_dir: Path
    child: devstack.Child | None = None
    starts: int = 0

    @property
    def address(self) -> str:
        """Where it listens."""
        return self.host.address

    def start(self, replicaof: str | None = None) -> None:
        """Start it (as a replica of `replicaof`, if given) and wait until it answers."""
        data = self.log_dir / f"redis-{self.host.name}"
        data.mkdir(parents=True, exist_ok=True)
        cmd = [devstack.redis_server_binary(), "--port", str(REDIS_PORT), "--bind", self.address,
               "--dir", str(data), "--appendonly", "yes", "--appendfsync", "always",
               "--save", "", "--maxmemory-policy", "noeviction", "--protected-mode", "no",
               "--databases", "64", "--replica-announce-ip", self.address]
        if replicaof:
            cmd += ["--replicaof", replicaof, str(REDIS_PORT)]
        self.starts += 1
        self.child = devstack._spawn(f"redis-{self.host.name}-{self.starts}", cmd, self.log_dir,
                                     netns=self.host.ns)
        _wait_ping(self.address, REDIS_PORT, self.child)

    def signal(self, sig: int) -> None:
        """SIGKILL / SIGSTOP / SIGCONT the server."""
        if self.child and self.child.proc.poll() is None:
            self.child.proc.send_signal(sig)
            if sig == signal.SIGKILL:
                self.child.proc.wait(5)

    def stop(self) -> None:
        """Stop it (continued first, in case it was stopped)."""
        if self.child:
            self.signal(signal.SIGCONT)
            self.child.stop()


def _wait_ping(address: str, port: int, child: devstack.Child, timeout: float = 20) -> None:
    client = redis.Redis(host=address, port=port, socket_connect_timeout=0.5, socket_timeout=1)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                client.ping()
                return
            except redis.exceptions.RedisError:
                if child.proc.poll() is not None or time.monotonic() > deadline:
                    raise devstack.StartError(f"{child.name} did not start:\n"
                                              + child.output()[-2000:]) from None
                time.sleep(0.1)
    finally:
        client.close()


def start_sentinel(host: Host, primary: str, log_dir: Path) -> devstack.Child:
    """A Sentinel on the host's second address, monitoring `primary` (quorum 2 of 3)."""
    address = host.addresses[1]
    conf = log_dir / f"sentinel-{host.name}.conf"  # Sentinel rewrites its config: a file
    conf.write_text("\n".join([
        f"port {SENTINEL_PORT}", f"bind {address}", f"sentinel announce-ip {address}",
        f"dir {log_dir}", "protected-mode no",
        f"sentinel monitor {MASTER_NAME} {primary} {REDIS_PORT} 2",
        f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}",
        f"sentinel failover-timeout {MASTER_NAME} {FAILOVER_TIMEOUT_MS}",
        f"sentinel parallel-syncs {MASTER_NAME} 1", ""]))
    child = devstack._spawn(f"sentinel-{host.name}", [devstack.redis_server_binary(),
                                                     str(conf), "--sentinel"],
                            log_dir, netns=host.ns)
    _wait_ping(address, SENTINEL_PORT, child)
    return child


SENTINELS = [(h.addresses[1], SENTINEL_PORT) for h in REDIS_HOSTS]


def _sentinel_state(address: str, port: int) -> dict[str, str]:
    """`SENTINEL MASTER <name>` of one Sentinel as text ({} when it does not answer)."""
    client = redis.Redis(host=address, port=port, socket_timeout=1, socket_connect_timeout=1)
    try:
        return devstack.sentinel_master_state(client, MASTER_NAME)
    except redis.exceptions.RedisError:
        return {}
    finally:
        client.close()


def supports(setting: str) -> bool:
    """Whether this build of Switchboard knows a setting (the HA settings land separately)."""
    return setting in Settings.model_fields


class MultihostStack(Stack):
    """The deployment above; the loopback Stack's traffic and counting helpers work on it."""

    def __init__(self, log_dir: Path | None = None, **overrides: str) -> None:
        self.log_dir = log_dir or Path(tempfile.mkdtemp(prefix="switchboard-multihost-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.net = Network()
        self.redis_nodes = [RedisNode(h, self.log_dir) for h in REDIS_HOSTS]
        self.sentinels: list[devstack.Child] = []
        self.workers = []
        self._started: list[Any] = []  # what stop() stops, in reverse
        self.spool_snapshot = b""  # the spool's files while fault c kept webhooks in it
        self.net.up()
        try:
            self._start(overrides)
        except BaseException:
            self.stop()
            raise

    def _start(self, overrides: dict[str, str]) -> None:
        primary = self.redis_nodes[0]
        primary.start()
        for node in self.redis_nodes[1:]:
            node.start(replicaof=primary.address)
        self.sentinels = [start_sentinel(h, primary.address, self.log_dir) for h in REDIS_HOSTS]
        self.wait_sentinels_ready()
        self.start_sandboxes(host=GATEWAY)
        self._started += [self.providers_child, self.fhir_server]
        redis_env = {"REDIS_URL": f"redis://{primary.address}:{REDIS_PORT}/0"}
        # Without the Sentinel settings (an older build) every process keeps the first
        # primary's address: fault a then shows what a failover costs without them.
        self.follows_sentinel = supports("redis_sentinels")
        if self.follows_sentinel:
            redis_env.update(REDIS_SENTINELS=",".join(f"{a}:{p}" for a, p in SENTINELS),
                             REDIS_SENTINEL_MASTER=MASTER_NAME)
        self.env = self.app_env(redis_env, overrides)
        self.settings: Settings = load_settings(self.env)
        self.sandbox = Sandbox(self.fhir_server.origin, self.settings)
        self.port = WEB_PORT
        self.web = devstack.start_web(self.env, self.log_dir, WEB_PORT, workers=2,
                                      host=RECEIVER_HOST.address, netns=RECEIVER_HOST.ns)
        self._started.append(self.web)
        self.http = httpx.Client(base_url=f"http://{RECEIVER_HOST.address}:{WEB_PORT}",
                                 timeout=60, limits=httpx.Limits(max_connections=48))
        self.workers = [self.start_worker(n) for n in range(len(WORKER_HOSTS))]
        # One beat per deployment (inbox sweeps), on the host that stays connected.
        self.beat = devstack.start_beat(self.env, self.log_dir, netns=WORKER_HOSTS[1].ns)
        self._started.append(self.beat)
        self.start_supervisor()
        # The driver's own view of Redis follows the primary, whatever the service does.
        self._r = Sentinel(SENTINELS, socket_timeout=2).master_for(
            MASTER_NAME, socket_timeout=5, socket_connect_timeout=2)

    def start_worker(self, n: int) -> devstack.Child:
        """A worker process (threads pool, 16 threads) on worker host n."""
        host = WORKER_HOSTS[n]
        return devstack.start_worker(self.env, self.log_dir,
                                     name=f"worker-{host.name}-{uuid.uuid4().hex[:6]}",
                                     concurrency=16, netns=host.ns, host=host.address)

    def stop(self) -> None:
        """Stop every process, then remove the namespaces (even after a failed start)."""
        try:
            if hasattr(self, "_stopping"):
                self._stopping.set()
                self._supervisor.join(5)
            if hasattr(self, "http"):
                self.http.close()
            for child in [*self.workers, *reversed(self._started), *self.sentinels,
                          *self.redis_nodes]:
                with contextlib.suppress(Exception):
                    child.stop()
            for client in ("providers", "sandbox"):
                if hasattr(self, client):
                    getattr(self, client).close()
        finally:
            self.net.down()

    # -- the topology as Sentinel sees it -------------------------------------------------------

    def tasks_done_since(self, n: int, since: float) -> int:
        """Tasks worker host n finished after `since` (epoch seconds), from its workers' logs
        (every process it ran: a supervised restart writes a new file)."""
        done = 0
        for path in self.log_dir.glob(f"worker-{WORKER_HOSTS[n].name}-*.log"):
            for line in path.read_text(errors="replace").splitlines():
                if "] succeeded in " not in line:
                    continue
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    stamp = json.loads(line)["timestamp"].replace("Z", "+00:00")
                    done += datetime.fromisoformat(stamp).timestamp() >= since
        return done

    def spooled(self) -> float:
        """Webhooks the receiver has kept in its disk spool so far (its /metrics)."""
        try:
            return metric(self.http.get("/metrics").text, "switchboard_spool_appended_total")
        except httpx.HTTPError:
            return float("nan")

    def held_by(self, n: int) -> int:
        """Messages worker n has received and not yet acknowledged (its liveness record,
        worker/broker/liveness.py, names it by host:pid:...; `ip netns exec` keeps the pid)."""
        from worker.broker.liveness import HELD

        pid = self.workers[n].proc.pid
        try:
            keys = [k for k in self._r.scan_iter(match=HELD + "*", count=1000)
                    if f":{pid}:".encode() in k]
            held = {t for k in keys for t in self._r.smembers(k)}
            unacked = set(self._r.hkeys("unacked"))
        except redis.exceptions.RedisError:
            return 0
        return len(held & unacked)

    def primary_address(self) -> str | None:
        """The primary's address according to the first Sentinel that answers."""
        for address, port in SENTINELS:
            client = redis.Redis(host=address, port=port, socket_timeout=1,
                                 socket_connect_timeout=1)
            try:
                found = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME",
                                               MASTER_NAME)
                if found:
                    return str(found[0].decode() if isinstance(found[0], bytes) else found[0])
            except redis.exceptions.RedisError:
                continue
            finally:
                client.close()
        return None

    def wait_sentinels_ready(self, timeout: float = 30) -> None:
        """Until every Sentinel knows the other two and both replicas (before that a failover
        cannot happen, or may pick a replica not yet in sync)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = [_sentinel_state(a, p) for a, p in SENTINELS]
            if all(st.get("num-other-sentinels") == "2" and st.get("num-slaves") == "2"
                   for st in states):
                return
            time.sleep(0.2)
        raise devstack.StartError(f"Sentinels not ready after {timeout:.0f}s: {states}")

    def node_at(self, address: str | None) -> RedisNode:
        """The Redis node listening on `address`."""
        return next(n for n in self.redis_nodes if n.address == address)

    def replicas_in_sync(self, want: int = 2, timeout: float = 60) -> bool:
        """Wait until the primary reports `want` connected replicas (the topology healed)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.exceptions.RedisError):
                info = self._r.info("replication")
                if int(info.get("connected_slaves", 0)) >= want:
                    return True
            time.sleep(0.5)
        return False


# -- traffic ------------------------------------------------------------------------------------


@dataclass
class Answer:
    """One paced request: when it went out and came back (monotonic), and its status."""

    sent_at: float
    answered_at: float
    status: int


@dataclass
class Paced:
    """Requests fired at a steady pace in a background thread."""

    answers: dict[int, Answer] = field(default_factory=dict)
    thread: threading.Thread | None = None

    def join(self) -> None:
        """Wait for the last answer."""
        if self.thread:
            self.thread.join()


def paced(fn: Callable[[Any], int], items: list[Any], rate: float, threads: int = 32) -> Paced:
    """Call fn(item) for each item at `rate` per second (concurrently: a slow answer does not
    hold the next request back), in the background."""
    out = Paced()

    def one(i: int, item: Any) -> None:
        sent = time.monotonic()
        status = fn(item)
        out.answers[i] = Answer(sent, time.monotonic(), status)

    def run() -> None:
        import concurrent.futures as cf

        start = time.monotonic()
        with cf.ThreadPoolExecutor(threads) as pool:
            for i, item in enumerate(items):
                delay = start + i / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                pool.submit(one, i, item)

    out.thread = threading.Thread(target=run, daemon=True)
    out.thread.start()
    return out


def _ok(status: int) -> bool:
    return 200 <= status < 300


def _accepted_sids(messages: list[dict[str, str]], flow: Paced) -> set[str]:
    return {m["MessageSid"] for i, m in enumerate(messages) if _ok(flow.answers[i].status)}


def _answer_times(flow: Paced) -> str:
    """The webhooks' answer times, p50 and max, as a note."""
    times = sorted(a.answered_at - a.sent_at for a in flow.answers.values())
    if not times:
        return "no answers"
    return f"answered in p50 {times[len(times) // 2]:.2f}s, max {times[-1]:.2f}s"


def _refusals(flow: Paced) -> list[Answer]:
    return sorted((a for a in flow.answers.values() if not _ok(a.status)),
                  key=lambda a: a.answered_at)


@contextlib.contextmanager
def _watch_primary(stack: MultihostStack) -> Iterator[dict[str, float | str]]:
    """Record when Sentinel names a new primary (polls every 0.1 s, in a thread)."""
    seen: dict[str, float | str] = {"first": stack.primary_address() or ""}
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.1):
            now = stack.primary_address()
            if now and now != seen["first"] and "promoted_at" not in seen:
                seen.update(promoted_at=time.monotonic(), promoted_wall=time.time(), new=now)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    try:
        yield seen
    finally:
        stop.set()
        t.join(5)


# -- the faults ---------------------------------------------------------------------------------


def _begin(stack: MultihostStack, scenario: str, patients: int, n: int, prefix: str
           ) -> tuple[float, Counts, list[dict[str, str]]]:
    """A fault's start: (its start time, its row, n fresh webhooks from `patients` senders)."""
    stack.reset()
    started = time.monotonic()
    senders = _patients(stack, patients)
    return started, Counts(scenario), [sms(senders[i % patients], f"{prefix} {i}")
                                       for i in range(n)]


def primary_killed(stack: MultihostStack, n: int = 400, rate: float = 25.0,
                   kill_after: float = 4.0, recover_bar: float = 10.0) -> Counts:
    """a. SIGKILL the primary while n webhooks arrive at `rate`/s: every 2xx written once, and
    2xx again within `recover_bar` s of the promotion (or throughout, with the spool)."""
    started, counts, messages = _begin(stack, "mh-a primary SIGKILLed", 20, n, "mh primary")
    spooled_before = stack.spooled()
    with _watch_primary(stack) as seen:
        flow = paced(stack.post_sms, messages, rate)
        time.sleep(kill_after)
        victim = stack.node_at(str(seen["first"]))
        killed_at = time.monotonic()
        victim.signal(signal.SIGKILL)
        flow.join()
        deadline = time.monotonic() + 30
        while "promoted_at" not in seen and time.monotonic() < deadline:
            time.sleep(0.2)
    counts.sent = len(messages)
    accepted = _accepted_sids(messages, flow)
    counts.accepted = len(accepted)
    refused = _refusals(flow)
    restarts_before = stack.restarts
    if "promoted_at" in seen:
        promoted = float(seen["promoted_at"])
        counts.notes.append(f"promotion {promoted - killed_at:.1f}s after the kill "
                            f"({seen['first']} -> {seen['new']})")
        # Time to recover: from the promotion to the last refusal (0: none after it).
        late = [a for a in refused if a.answered_at > promoted]
        counts.seconds_to_recover = max((a.answered_at - promoted for a in late), default=0.0)
        if counts.seconds_to_recover > recover_bar:
            counts.problems.append(f"webhooks refused {counts.seconds_to_recover:.1f}s after "
                                   f"the promotion (bar {recover_bar:.0f}s)")
        # The ex-primary comes back as a replica of the new one, as a restarted host would.
        victim.start(replicaof=str(seen["new"]))
    else:
        counts.problems.append("Sentinel promoted no replica within 30s")
        victim.start()
    if refused:
        counts.notes.append(f"refusals from {refused[0].answered_at - killed_at:.1f}s to "
                            f"{refused[-1].answered_at - killed_at:.1f}s after the kill")
    counts.notes.append(f"{len(refused)} webhooks refused (non-2xx), "
                        f"{stack.spooled() - spooled_before:g} kept in the spool; "
                        + _answer_times(flow))
    _inbound_tally(stack, counts, accepted, timeout=90 + n / 5)
    if stack.restarts > restarts_before:
        counts.notes.append(f"{stack.restarts - restarts_before} workers exited and were "
                            "restarted by the supervisor")
    if "promoted_wall" in seen:
        # Each worker host took work from the new primary (celery#6348: a worker blocked in
        # BRPOP on the dead one may never do so).
        done = [stack.tasks_done_since(i, float(seen["promoted_wall"]))
                for i in range(len(WORKER_HOSTS))]
        counts.notes.append("tasks finished after the promotion per worker host: "
                            + ", ".join(f"{h.name} {d}" for h, d in zip(WORKER_HOSTS, done,
                                                                       strict=True)))
        if not all(done):
            counts.problems.append("a worker host ran nothing after the promotion")
    if not stack.replicas_in_sync():
        counts.problems.append("the topology did not heal (2 replicas) within 60s")
    counts.seconds = time.monotonic() - started
    return counts


def worker_cut_off(stack: MultihostStack, n_in: int = 200, n_out: int = 60,
                   duration: float = 30.0, cut_after: float = 5.0,
                   cut_seconds: float = 20.0) -> tuple[Counts, Counts]:
    """b. Inbound webhooks and outbound sends spread over `duration` s while worker host 1 is
    cut off for `cut_seconds`: nothing it held is lost or sent twice. Every send is answered
    slowly by the provider (2 s), so sends are in flight when the cable goes."""
    stack.reset()
    started = time.monotonic()
    senders = _patients(stack, 10)
    inbound = [sms(senders[i % len(senders)], f"mh cut {i}") for i in range(n_in)]
    outbound = _outbound_messages(stack, n_out, "mh cut")
    for i in range(n_out):
        stack.providers.fault(provider="twilio", to=phone(5000 + i), delay_ms=2000)
    items: list[tuple[str, Any]] = [("in", m) for m in inbound] + [("out", c) for c in outbound]
    items = [items[i] for i in sorted(range(len(items)), key=lambda i: (i * 7919) % len(items))]

    def post(item: tuple[str, Any]) -> int:
        return stack.post_sms(item[1]) if item[0] == "in" else stack.send(item[1][0])[0]

    restarts_before = stack.restarts
    flow = paced(post, items, len(items) / duration)
    time.sleep(cut_after)
    # Cut while the host holds messages (a send waiting on the slow provider, most likely):
    # those are what must be neither lost nor sent twice.
    deadline = time.monotonic() + duration / 2
    while not (held := stack.held_by(0)) and time.monotonic() < deadline:
        time.sleep(0.05)
    host = WORKER_HOSTS[0]
    stack.net.cut(host)
    cut_at = time.monotonic()
    time.sleep(cut_seconds)
    stack.net.mend(host)
    mended_at = time.monotonic()
    flow.join()
    answers = [flow.answers[i].status for i in range(len(items))]
    cin = Counts("mh-b worker host cut 20s (in)", sent=n_in)
    cout = Counts("mh-b worker host cut 20s (out)", sent=n_out)
    accepted_in = {item[1]["MessageSid"] for item, s in zip(items, answers, strict=True)
                   if item[0] == "in" and _ok(s)}
    accepted_out = {item[1][0] for item, s in zip(items, answers, strict=True)
                    if item[0] == "out" and _ok(s)}
    cin.accepted, cout.accepted = len(accepted_in), len(accepted_out)
    _inbound_tally(stack, cin, accepted_in, timeout=120 + n_in / 5)
    _outbound_tally(stack, cout, outbound, accepted_out, timeout=120 + n_out / 2)
    cin.seconds_to_recover = cout.seconds_to_recover = time.monotonic() - mended_at
    cin.notes.append(f"{host.ns} held {held} unacknowledged messages when cut for "
                     f"{mended_at - cut_at:.1f}s; recover s = until all settled after the mend")
    if stack.restarts > restarts_before:
        cin.notes.append(f"{stack.restarts - restarts_before} workers exited and were "
                         "restarted by the supervisor")
    if not held:
        cin.problems.append(f"{host.ns} held nothing when cut: the fault tested nothing")
    cin.seconds = cout.seconds = time.monotonic() - started
    return cin, cout


def redis_frozen(stack: MultihostStack, n: int = 100, frozen_seconds: float = 15.0,
                 written_bar: float = 90.0) -> Counts:
    """c. SIGSTOP every Redis server for `frozen_seconds` while n webhooks arrive: all n
    answered 2xx (spooled), all n written within `written_bar` s of SIGCONT."""
    started, counts, messages = _begin(stack, "mh-c all Redis SIGSTOPped 15s", 10, n,
                                       "mh frozen")
    spooled_before = stack.spooled()
    for node in stack.redis_nodes:
        node.signal(signal.SIGSTOP)
    try:
        # The webhooks arrive while Redis is stopped, spread over the first 80 % of the pause.
        flow = paced(stack.post_sms, messages, n / (frozen_seconds * 0.8))
        time.sleep(frozen_seconds)
        spool = stack.settings.spool_path
        stack.spool_snapshot = at_rest.files(spool) if spool and spool.exists() else b""
    finally:
        for node in stack.redis_nodes:
            node.signal(signal.SIGCONT)
    resumed_at = time.monotonic()
    flow.join()
    counts.sent = n
    accepted = _accepted_sids(messages, flow)
    counts.accepted = len(accepted)
    if counts.accepted < n:
        counts.problems.append(f"{n - counts.accepted} of {n} webhooks not answered 2xx")
    everyone = {m["MessageSid"] for m in messages}

    def all_written() -> bool:
        return everyone <= set(stack.inbound_written())

    deadline = resumed_at + written_bar
    while time.monotonic() < deadline and not all_written():
        time.sleep(0.5)
    counts.seconds_to_recover = time.monotonic() - resumed_at
    counts.notes.append(f"{stack.spooled() - spooled_before:g} kept in the spool, "
                        f"{_answer_times(flow)}; recover s = from SIGCONT until all written")
    if not all_written():
        counts.problems.append(f"not all {n} written within {written_bar:.0f}s of SIGCONT")
    _inbound_tally(stack, counts, accepted, timeout=60)
    counts.seconds = time.monotonic() - started
    return counts


def no_phi(stack: MultihostStack, numbers: list[str], bodies: list[str]) -> list[Counts]:
    """After the faults: our processes' logs (web, workers, beat), and every Redis node's files
    (the replicas' and a promoted one's too) and the receiver's spool, searched for the phone
    numbers and bodies used. Hits are counted in the "duplicates" column."""
    from tests.reliability.scenarios import privacy

    logs = privacy(stack, numbers, bodies)
    logs.scenario = "mh PHI in logs"
    counts = Counts("mh PHI at rest (3 Redis, spool)")
    started = time.monotonic()
    seen = {f"redis-{h.name}": at_rest.files(stack.log_dir / f"redis-{h.name}")
            for h in REDIS_HOSTS}
    seen["spool"] = stack.spool_snapshot  # taken while it held fault c's webhooks
    needles = sorted({*numbers, *(n[1:] for n in numbers), *bodies})
    found = {name: at_rest.hits(blob, needles) for name, blob in seen.items()}
    counts.sent = sum(len(b) for b in seen.values())
    counts.written = len(needles)
    counts.duplicates = sum(len(h) for h in found.values())
    counts.notes.append("searched " + ", ".join(f"{k} {len(v) // 1024} KiB"
                                                for k, v in seen.items())
                        + f" for {len(needles)} values; hits: "
                        + str({k: v[:3] for k, v in found.items() if v}))
    counts.seconds = time.monotonic() - started
    return [logs, counts]


@dataclass(frozen=True)
class Size:
    """How big a run is: full (make reliability) or CI-sized (the integration test)."""

    primary_webhooks: int
    primary_rate: float
    cut_in: int
    cut_out: int
    cut_duration: float
    frozen_webhooks: int


FULL = Size(400, 25.0, 200, 60, 30.0, 100)
CI = Size(120, 20.0, 40, 12, 24.0, 40)


def run(size: Size = FULL, min_replicas_ack: int = 1, log_dir: Path | None = None,
        faults: tuple[str, ...] = ("a", "b", "c"), spool: bool = True) -> list[Counts]:
    """Build the hosts, run the faults, tear everything down; the counted rows. `spool`
    False runs without the receiver's disk spool (fault c cannot pass then)."""
    overrides = {"REDIS_MIN_REPLICAS_ACK": str(min_replicas_ack)} \
        if supports("redis_min_replicas_ack") else {}
    if not spool:
        overrides["SPOOL_DIR"] = ""
    stack = MultihostStack(log_dir=log_dir, **overrides)
    print(f"multihost stack up (logs in {stack.log_dir}; Sentinel-aware: "
          f"{stack.follows_sentinel}; spool: {stack.settings.spool_path is not None}; "
          f"REDIS_MIN_REPLICAS_ACK: {overrides.get('REDIS_MIN_REPLICAS_ACK', 'unsupported')})",
          flush=True)
    rows: list[Counts] = []
    try:
        if "a" in faults:
            rows.append(primary_killed(stack, size.primary_webhooks, size.primary_rate))
        if "b" in faults:
            rows.extend(worker_cut_off(stack, size.cut_in, size.cut_out,
                                       duration=size.cut_duration))
        if "c" in faults:
            rows.append(redis_frozen(stack, size.frozen_webhooks))
        numbers = [phone(i) for i in range(20)] + [phone(5000 + i) for i in range(size.cut_out)]
        bodies = [f"mh {what} {i}" for what, n in (
            ("primary", size.primary_webhooks), ("cut", size.cut_in),
            ("cut reply", size.cut_out), ("frozen", size.frozen_webhooks)) for i in range(n)]
        rows.extend(no_phi(stack, numbers, bodies))
    finally:
        stack.stop()
    return rows
