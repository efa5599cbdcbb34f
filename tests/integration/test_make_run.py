"""`make run` shows the whole loop: the stack it starts on embedded defaults, then each
`switchboard demo …` sends its flow through that stack and says what happened."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import eventually
from worker.ops.devstack import free_port

pytestmark = pytest.mark.integration
SWITCHBOARD = [sys.executable, "-m", "worker.ops.cli"]
# What each demo prints once its flow finished (any failure exits 1 with the reason).
EXPECTED = {
    "sms": r"^SMS SM[0-9a-f]{32} accepted \(HTTP 200\); landed as Communication/\S+ in thread "
           r"Communication/\S+$",
    "reply": r"^reply written as Communication/\S+ in thread Communication/\S+; sent by sms as "
             r"SM[0-9a-f]{32} ",
    "email": r"^request \w+: sent by email as \S+ \(Communication/\S+\), now delivered$",
    "inbound-email": r"^email accepted \(HTTP 200\); landed as Communication/\S+ in thread "
                     r"Communication/\S+$",
    "push": r"^request \w+: sent by push \(Communication/\S+;",
    "conversations": r"^message IM[0-9a-f]{32} accepted \(HTTP 200\); landed as "
                     r"Communication/\S+ in thread Communication/\S+ \(https://twilio\.com\|"
                     r"CH[0-9a-f]{32}\); reply Communication/\S+ posted into the Conversation "
                     r"as IM[0-9a-f]{32} ",
    "whatsapp": r"^request \w+: held \(template sent\), released by the patient's WhatsApp "
                r"answer \(Communication/\S+ in thread Communication/\S+\); sent by whatsapp "
                r"as SM[0-9a-f]{32} ",
}


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """`switchboard run` (what `make run` starts), on free ports, with no configuration."""
    log_dir = tmp_path_factory.mktemp("make-run")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("FHIR_", "REDIS_", "TWILIO_", "SENDGRID_", "API_TOKENS"))}
    out = (log_dir / "run.out").open("wb")
    proc = subprocess.Popen([*SWITCHBOARD, "run", "--port", str(free_port()),
                             "--flower-port", str(free_port()), "--log-dir", str(log_dir)],
                            stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        eventually(lambda: proc.poll() is not None or "Next, in another shell" in
                   (log_dir / "run.out").read_text(), timeout=120, what="make run's page")
        assert proc.poll() is None, (log_dir / "run.out").read_text()
        yield log_dir
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        out.close()


def test_make_run_prints_a_page_not_a_wall(running: Path) -> None:
    page = (running / "run.out").read_text()
    assert len(page.splitlines()) <= 20, page
    assert "demo sms" in page and "curl" not in page


@pytest.mark.parametrize("flow", list(EXPECTED))
def test_each_demo_goes_through_the_running_stack(running: Path, flow: str) -> None:
    done = subprocess.run([*SWITCHBOARD, "demo", flow, "--log-dir", str(running)],
                          capture_output=True, text=True, timeout=90, check=False)
    assert done.returncode == 0, done.stderr
    assert re.search(EXPECTED[flow], done.stdout.strip()), done.stdout


def test_a_demo_without_a_running_stack_says_so(tmp_path: Path) -> None:
    done = subprocess.run([*SWITCHBOARD, "demo", "sms", "--log-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 1
    assert "no running `make run` found" in done.stderr
