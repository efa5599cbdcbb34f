"""Receiver throughput: a signed Twilio webhook → 200 through Switchboard's receiver, against a
bare Flask handler doing one Redis LPUSH (gunicorn, 2 workers each, one Redis with AOF
`appendfsync always` as in production, the same signed form from `wrk -t2 -c32`, alternating
rounds). The ratio is the figure that matters; absolute numbers depend on the machine. Then the
receiver behind a Sentinel with REDIS_MIN_REPLICAS_ACK 0 and 1: what WAIT costs."""

from __future__ import annotations

import re
import shutil
import statistics
import subprocess
from pathlib import Path
from urllib.parse import urlencode

import redis

from tests.support import AUTH_TOKEN, DATA_KEY, PUBLIC_BASE_URL, sign
from worker.ops import devstack
from worker.settings import load_settings

PATH = "/webhooks/twilio/sms"
_REQS = re.compile(r"Requests/sec:\s+([\d.]+)")
_LAT = re.compile(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$", re.MULTILINE)
_UNIT = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _form() -> dict[str, str]:
    """A realistic Twilio SMS webhook form (about 800 bytes, as Twilio sends)."""
    return {"ToCountry": "US", "ToState": "CA", "SmsMessageSid": "SM" + "7" * 32,
            "NumMedia": "0", "ToCity": "SAN FRANCISCO", "FromZip": "94107", "SmsSid":
            "SM" + "7" * 32, "FromState": "CA", "SmsStatus": "received", "FromCity":
            "SAN FRANCISCO", "Body": "Hello, I have a question about my appointment next "
            "Tuesday; can I move it to the afternoon? Thanks", "FromCountry": "US", "To":
            "+15557654321", "MessagingServiceSid": "MG" + "1" * 32, "ToZip": "94107",
            "NumSegments": "1", "MessageSid": "SM" + "7" * 32, "AccountSid": "ACbench",
            "From": "+15551234567", "ApiVersion": "2010-04-01"}


def _wrk_script(directory: Path, form: dict[str, str]) -> Path:
    body = urlencode(form)
    script = directory / "post.lua"
    script.write_text(
        'wrk.method = "POST"\n'
        f'wrk.body = "{body}"\n'
        'wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"\n'
        f'wrk.headers["X-Twilio-Signature"] = "{sign(form, PATH)}"\n')
    return script


def wrk(port: int, script: Path, seconds: int) -> tuple[float, float, float, int]:
    """(requests/s, p50 ms, p99 ms, non-2xx) of one wrk run against 127.0.0.1:port."""
    out = subprocess.run(["wrk", "-t2", "-c32", f"-d{seconds}s", "--latency", "-s",
                          str(script), f"http://127.0.0.1:{port}{PATH}"],
                         capture_output=True, text=True, timeout=seconds + 30, check=True).stdout
    rate = float(_REQS.search(out).group(1))  # type: ignore[union-attr]
    lat = {p: float(v) * _UNIT[u] for p, v, u in _LAT.findall(out)}
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    return rate, lat.get("50", 0.0), lat.get("99", 0.0), int(bad.group(1)) if bad else 0


def run(log_dir: Path, quick: bool = False) -> list[str]:
    """Alternating rounds of the bare handler and the receiver; the Markdown section."""
    if shutil.which("wrk") is None:
        return ["## Receiver", "", "wrk is not installed (`apt-get install wrk`): skipped."]
    rounds, seconds = (2, 5) if quick else (3, 10)
    rds = devstack.start_redis(log_dir, data_dir=log_dir / "bench-redis")
    # Acknowledged = replicated (docs/redis-ha.md): the receiver behind a Sentinel, on a primary
    # with one replica (AOF always on both), with REDIS_MIN_REPLICAS_ACK 0 and 1.
    group = devstack.start_sentinel_group(log_dir, log_dir / "bench-ha", replicas=1,
                                          sentinels=1)
    base = rds.url.rsplit("/", 1)[0]
    env = {"REDIS_URL": base + "/1", "FHIR_BASE_URL": "http://127.0.0.1:9/fhir/R4/",
           "FHIR_CLIENT_ID": "bench", "FHIR_CLIENT_SECRET": "bench",
           "TWILIO_ACCOUNT_SID": "ACbench", "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
           "PUBLIC_BASE_URL": PUBLIC_BASE_URL, "LOG_FORMAT": "json",
           "DATA_ENCRYPTION_KEYS": DATA_KEY}  # the receiver seals every message it queues
    load_settings(env)  # fail here, not inside gunicorn, on a bad environment
    ports = {name: devstack.free_port() for name in ("bare", "bare-gevent", "ours", "ha-0",
                                                      "ha-1")}
    servers = [devstack.start_web(env, log_dir, ports["ours"], workers=2)]
    for acks in (0, 1):
        servers.append(devstack.start_web(
            {**env, **group.env(db=1), "REDIS_MIN_REPLICAS_ACK": str(acks)}, log_dir,
            ports[f"ha-{acks}"], workers=2, name=f"bench-ha-{acks}"))
    for name, worker_class in (("bare", "sync"), ("bare-gevent", "gevent")):
        servers.append(devstack.start_web(
            {**env, "BENCH_REDIS_URL": base + "/2"}, log_dir, ports[name], workers=2,
            app="tests.bench.bare_lpush:app", worker_class=worker_class, name=f"bench-{name}"))
    script = _wrk_script(log_dir, _form())
    results: dict[str, list[tuple[float, float, float, int]]] = {n: [] for n in ports}
    try:
        for port in ports.values():  # warm up
            wrk(port, script, 2)
        for _ in range(rounds):
            for name, port in ports.items():
                results[name].append(wrk(port, script, seconds))
            for db in (1, 2):  # keep Redis small between rounds (nothing consumes)
                with redis.Redis.from_url(f"{base}/{db}") as client:
                    client.flushdb()
            with group.node(group.primary().port) as client:
                client.flushdb()
    finally:
        for server in servers:
            server.stop()
        rds.stop()
        group.stop()
    rate = {name: statistics.median(r[0] for r in rows) for name, rows in results.items()}
    lines = ["## Receiver", "",
             f"Signed Twilio webhook → 200, `wrk -t2 -c32`, {rounds} alternating rounds of "
             f"{seconds} s, Redis with AOF `appendfsync always`; medians.", "",
             "| handler | req/s | p50 ms | p99 ms | non-2xx |", "|---|---:|---:|---:|---:|"]
    for name, label in (("bare", "bare Flask + one LPUSH (gunicorn sync, 2 workers)"),
                        ("bare-gevent", "bare Flask + one LPUSH (gunicorn gevent, 2 workers)"),
                        ("ours", "Switchboard receiver as deployed (gunicorn gevent, 2 workers)"),
                        ("ha-0", "the receiver behind Sentinel, REDIS_MIN_REPLICAS_ACK=0"),
                        ("ha-1", "the receiver behind Sentinel, REDIS_MIN_REPLICAS_ACK=1 "
                                 "(WAIT 1)")):
        rows = results[name]
        lines.append(f"| {label} | {statistics.median(r[0] for r in rows):.0f} | "
                     f"{statistics.median(r[1] for r in rows):.1f} | "
                     f"{statistics.median(r[2] for r in rows):.1f} | {sum(r[3] for r in rows)} |")
    lines += ["", f"**Receiver / bare LPUSH (sync, the issue's baseline): "
              f"{rate['ours'] / rate['bare']:.2f}** (goal ≥ 0.80); like for like, against the "
              f"bare handler under gevent too: {rate['ours'] / rate['bare-gevent']:.2f}.",
              "", "Behind Sentinel the primary has one replica (AOF always on both, loopback); "
              f"acknowledged = replicated (WAIT 1 after the one-step publish) keeps "
              f"{rate['ha-1'] / rate['ha-0']:.2f} of the rate without it."]
    return lines
