"""What an attacker with Redis's files, a dump of its keys, Flower or /metrics would read: the
test bed's one collector, shared by the pytest suite and the fault suite's at-rest scan."""

from __future__ import annotations

import json
import re
import time
import uuid
from pathlib import Path

import httpx
import redis

CANARY_KEY = "switchboard:test:canary"


def files(root: Path) -> bytes:
    """Every file under `root` (Redis's RDB and AOF, whatever their layout)."""
    return b"".join(p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file())


def dump_every_key(client: redis.Redis) -> bytes:
    """Each key's name and DUMP, in every database of the server."""
    out = []
    port = client.connection_pool.connection_kwargs["port"]
    for db in range(int(client.config_get("databases")["databases"])):
        c = redis.Redis(port=port, db=db)
        for key in c.scan_iter(count=1000):
            out.append(key + (c.dump(key) or b""))
        c.close()
    return b"".join(out)


def persisted(client: redis.Redis, data_dir: Path, timeout: float = 120.0
              ) -> dict[str, bytes]:
    """The AOF as it was (every write since the server started), then a SAVE and an AOF
    rewrite, the files again and a DUMP of every key. A canary in clear text is written first
    and must be found in each (else the search could not see clear text at all: it raises)."""
    canary = f"canary {uuid.uuid4().hex} " * 4
    client.set(CANARY_KEY, canary)
    # RDB and DUMP compress strings with LZF unless told not to, which would hide clear text.
    client.config_set("rdbcompression", "no")
    try:
        out = {"AOF history": files(data_dir)}
        client.save()
        client.bgrewriteaof()
        deadline = time.monotonic() + timeout
        while True:
            info = client.info("persistence")
            if not (info["aof_rewrite_in_progress"] or info["aof_rewrite_scheduled"]):
                break
            if time.monotonic() > deadline:
                raise AssertionError("AOF rewrite did not finish")
            time.sleep(0.1)
        out["RDB and AOF files"] = files(data_dir)
        out["key dumps"] = dump_every_key(client)
    finally:
        client.config_set("rdbcompression", "yes")
        client.delete(CANARY_KEY)
    for name, blob in out.items():
        if canary.encode() not in blob:
            raise AssertionError(f"the clear-text canary is not in the {name}: the search "
                                 "cannot see what it looks for")
    return out


def flower(origin: str, auth: tuple[str, str], pages: int = 300) -> bytes:
    """Flower's task list and up to `pages` task pages."""
    listing = httpx.get(f"{origin}/api/tasks", auth=auth, timeout=60)
    listing.raise_for_status()
    ids = list(json.loads(listing.content))[:pages]
    with httpx.Client(base_url=origin, auth=auth, timeout=30) as http:
        return listing.content + b"".join(http.get(f"/task/{tid}").content for tid in ids)


def flower_tasks(origin: str, auth: tuple[str, str]) -> int:
    """How many tasks Flower shows (0 while it is not answering)."""
    try:
        resp = httpx.get(f"{origin}/api/tasks", auth=auth, timeout=5)
    except httpx.HTTPError:
        return 0
    return len(resp.json()) if resp.status_code == 200 else 0


def hits(blob: bytes, needles: list[str]) -> list[str]:
    """The needles found in `blob`; a phone number counts only on its own (not inside a longer
    run of digits, which random bytes can hold)."""
    # A plain substring search first (fast); the regex only for what it finds.
    return [n for n in needles if n and n.encode() in blob and re.search(
        rb"(?<![0-9])" + re.escape(n.encode()) + rb"(?![0-9])", blob)]
