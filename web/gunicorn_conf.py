"""gunicorn's settings for the receiver (`gunicorn -c python:web.gunicorn_conf ...`).

gunicorn runs WEB_CONCURRENCY worker processes, and a scrape of /metrics reaches one of them.
So the workers keep their counts in files of one directory, prometheus_client's multiprocess
mode, and /metrics adds up every worker's (worker/ops/metrics.py). prometheus_client picks the
mode from PROMETHEUS_MULTIPROC_DIR when it is imported, so the master sets the variable before
it forks the workers, which import the app (and prometheus_client) only then.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

_made: list[str] = []  # a directory this master created, removed when it exits


def on_starting(server: Any) -> None:
    """In the master, before any worker: a clean directory for the workers' metric files."""
    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if given:
        # prometheus_client: the directory must be emptied between runs, or the files of the
        # previous run's processes are counted again.
        Path(given).mkdir(parents=True, exist_ok=True)
        for stale in Path(given).glob("*.db"):
            stale.unlink()
    else:
        made = tempfile.mkdtemp(prefix="switchboard-metrics-")
        _made.append(made)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = made


def post_worker_init(worker: Any) -> None:
    """In each worker, once the app is loaded (and gevent has patched threading): start its
    spool flusher (docs/spool.md). A thread started in the master would not survive the fork,
    and every worker flushes, so a spool empties while any of them lives."""
    app = worker.wsgi
    flusher = getattr(app, "extensions", {}).get("switchboard.spool_flusher")
    if flusher is not None:
        flusher.start()


def child_exit(server: Any, worker: Any) -> None:
    """A worker exited: its live gauges go (its counters keep counting in the total)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]


def on_exit(server: Any) -> None:
    """The master is leaving: remove the directory it made (not one an operator gave)."""
    for made in _made:
        shutil.rmtree(made, ignore_errors=True)
