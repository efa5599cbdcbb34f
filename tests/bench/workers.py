"""What several benchmark sections need from a running Celery worker: how many tasks it has
finished (read from its own log, so Switchboard and a bare baseline are counted the same way)
and how much memory its processes hold."""

from __future__ import annotations

import os
import time
from pathlib import Path

from worker.ops.devstack import Child

SUCCEEDED = "succeeded in"  # Celery's own INFO line for a finished task, in every log format


def finished(child: Child) -> int:
    """Tasks this worker reported as succeeded so far."""
    with child.log_path.open("rb") as f:
        f.seek(child.log_offset)
        return f.read().decode("utf-8", "replace").count(SUCCEEDED)


def wait_finished(children: list[Child], count: int, timeout: float) -> float:
    """Wait until `children` together finished `count` tasks; seconds it took (raises when the
    benchmark cannot finish: a figure from a run that stalled would mislead)."""
    started = time.monotonic()
    while sum(finished(c) for c in children) < count:
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"only {sum(finished(c) for c in children)} of {count} tasks "
                               f"finished in {timeout:.0f} s")
        time.sleep(0.05)
    return time.monotonic() - started


def _tree(pid: int) -> list[int]:
    """A process and all its descendants (prefork children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return out


def rss_mib(pid: int) -> float:
    """Resident memory of a process and all its descendants (prefork children), MiB."""
    total = 0
    for p in _tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total / 1024


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) used so far by a process and its live descendants."""
    total = 0
    for p in _tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (clock ticks)
    return total / os.sysconf("SC_CLK_TCK")
