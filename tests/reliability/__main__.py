"""`make reliability`: run every fault scenario at full size and print the counted results.

python -m tests.reliability [--quick] [--only NAME ...]   (loopback only; stops by itself)

NAME: faults (scenarios 1-11, on one stack), clinic-day (scenario 12, about five minutes of
traffic on its own stack at the default pacing), findings (issue #26's hostile-input classes,
on their own stack), multihost (issue #28's hosts as network namespaces and their faults:
primary SIGKILLed, a worker host cut off, every Redis stopped; needs root and `ip`).
Default: all of them.
"""

from __future__ import annotations

import argparse
import sys
import time

from tests.reliability import scenarios
from tests.reliability.harness import Counts, Stack, email_address, phone, profile_name

HEADER = ("scenario", "sent", "accepted", "written", "duplicates", "lost", "dead-lettered",
          "seconds", "recover s")


def table(rows: list[Counts]) -> str:
    """The results as a fixed-width table, with notes under it."""
    lines = ["{:<30} {:>7} {:>9} {:>8} {:>11} {:>5} {:>14} {:>8} {:>9}".format(*HEADER)]
    for c in rows:
        recover = "-" if c.seconds_to_recover is None else f"{c.seconds_to_recover:.1f}"
        lines.append(f"{c.scenario:<30} {c.sent:>7} {c.accepted:>9} {c.written:>8} "
                     f"{c.duplicates:>11} {c.lost:>5} {c.dead_lettered:>14} {c.seconds:>8.1f} "
                     f"{recover:>9}")
    for c in rows:
        for note in c.notes:
            lines.append(f"  {c.scenario}: {note}")
        for problem in c.problems:
            lines.append(f"  {c.scenario}: FAILED BAR: {problem}")
    return "\n".join(lines)


def hostile_input(stack: Stack, examples: int, n: int) -> list[Counts]:
    """Scenarios 6 and 7 against the stack's receiver, on a Redis database no worker reads
    (so every enqueued message is still there to count)."""
    import logging

    import redis

    from tests.reliability import input_scenarios
    from tests.support import AUTH_TOKEN, PUBLIC_BASE_URL
    from web.app import create_app
    from worker.settings import load_settings

    # Thousands of rejections are logged by design; keep the table readable.
    logging.getLogger("switchboard.web").setLevel(logging.ERROR)
    url = stack.redis.url.rsplit("/", 1)[0] + "/9"
    app = create_app(load_settings({**stack.env, "REDIS_URL": url}))
    client = redis.Redis.from_url(url)
    started = time.monotonic()
    bad = input_scenarios.run_bad_input(app, client, examples=examples)
    six = Counts("6 bad input", sent=bad["requests"],
                 accepted=bad.get("accepted_without_auth", 0), written=bad.get("enqueued", 0),
                 duplicates=bad.get("status_5xx", 0) + bad.get("exceptions", 0),
                 seconds=time.monotonic() - started)
    six.notes.append("accepted = 2xx without a valid signature/token, written = enqueued, "
                     "duplicates = 5xx or crashes: all must be 0")
    six.lost = six.accepted + six.written  # a breach counts as a failed guarantee
    started = time.monotonic()
    forged = input_scenarios.run_forgery(app, client, PUBLIC_BASE_URL, AUTH_TOKEN, n)
    seven = Counts("7 forgery", sent=forged["attacks"], accepted=forged["accepted"],
                   written=forged["enqueued"], duplicates=forged.get("status_5xx", 0),
                   seconds=time.monotonic() - started)
    rejected = 100.0 * forged["rejected"] / max(1, forged["attacks"])
    seven.notes.append(f"{rejected:.1f}% of attacks rejected with 403; controls accepted "
                       f"{forged['controls_accepted']}/{forged['controls']}; exact replays "
                       f"accepted {forged.get('replays_accepted', 0)} (no timestamp in Twilio's "
                       "signature: MessageSid idempotency makes them harmless)")
    seven.lost = seven.accepted + seven.written
    if forged["controls_accepted"] != forged["controls"]:
        seven.lost += 1  # the check itself would be vacuous
    client.flushdb()
    return [six, seven]


def main(argv: list[str] | None = None) -> int:
    """Run the scenarios; exit 1 if any guarantee failed."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes (about a minute)")
    parser.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS),
                        help="run only these parts")
    args = parser.parse_args(argv)
    started = time.monotonic()
    rows: list[Counts] = []
    if "faults" in args.only:
        rows += faults(args.quick)
    if "clinic-day" in args.only:
        rows += clinic_day_row(args.quick)
    if "findings" in args.only:
        rows += findings_rows()
    if "multihost" in args.only:
        rows += multihost_rows(args.quick)
    print(table(rows))
    print(f"total {time.monotonic() - started:.0f}s")
    failed = [r.scenario for r in rows if not r.ok()]
    if failed:
        print("FAILED: " + ", ".join(failed))
        return 1
    print("all guarantees held")
    return 0


PARTS = ("faults", "clinic-day", "findings", "multihost")


def multihost_rows(quick: bool) -> list[Counts]:
    """Issue #28's hosts (network namespaces) and their faults (multihost.py); needs root."""
    from tests.reliability import multihost

    why = multihost.missing_requirement()
    if why:
        print(f"multihost skipped: {why}", flush=True)
        return [Counts("mh skipped", notes=[f"could not run: {why}"])]
    return multihost.run(multihost.CI if quick else multihost.FULL)


def clinic_day_row(quick: bool) -> list[Counts]:
    """Scenario 12 on its own stack, at the service's default pacing (clinic_day.py)."""
    from tests.reliability.clinic_day import FULL, REDUCED, clinic_day, default_overrides

    stack = Stack(**default_overrides())
    print(f"clinic-day stack up (logs in {stack.log_dir}); about "
          f"{(REDUCED if quick else FULL).seconds:.0f}s of traffic...", flush=True)
    try:
        counts, _ = clinic_day(stack, REDUCED if quick else FULL)
    finally:
        stack.stop()
    return [counts]


def findings_rows() -> list[Counts]:
    """Issue #26's findings as hostile inputs, each with its expected outcome, on their own
    stack at the default pacing (input_scenarios.run_findings)."""
    from tests.reliability import input_scenarios
    from tests.reliability.clinic_day import default_overrides

    stack = Stack(**default_overrides())
    print(f"findings stack up (logs in {stack.log_dir})...", flush=True)
    started = time.monotonic()
    try:
        results = input_scenarios.run_findings(stack)
    finally:
        stack.stop()
    row = Counts("13 issue-26 input classes", sent=len(results),
                 accepted=sum(1 for r in results if r.ok),
                 seconds=time.monotonic() - started)
    for r in results:
        row.notes.append(r.line())
        if not r.ok:
            row.problems.append(r.line())
    return [row]


def faults(q: bool) -> list[Counts]:
    """Scenarios 1-11 on one stack."""
    stack = Stack()
    print(f"stack up (logs in {stack.log_dir}); running scenarios...", flush=True)
    rows: list[Counts] = []
    try:
        rows.append(scenarios.duplicate_storm(stack, 50 if q else 500))
        rows.extend(scenarios.worker_killed(stack, 50 if q else 500, 20 if q else 200,
                                            every=2.0 if q else 3.0,
                                            duration=6.0 if q else 30.0))
        rows.append(scenarios.fhir_outage(stack, 30 if q else 200,
                                          phase_seconds=2.0 if q else 10.0))
        rows.append(scenarios.redis_restart(stack, 80 if q else 400,
                                            down_seconds=1.5 if q else 3.0))
        rows.append(scenarios.provider_faults(stack, 21 if q else 70))
        rows.append(scenarios.contention(stack, 150 if q else 1000, 15 if q else 50))
        rows.append(scenarios.inbound_email(stack, 30 if q else 200, 10))
        rows.append(scenarios.conversations(stack, 10 if q else 50))
        rows.extend(hostile_input(stack, examples=300 if q else 2000, n=30 if q else 200))
        wa = 10 if q else 100
        rows.append(scenarios.whatsapp(stack, wa))
        numbers = [phone(i) for i in range(25)] + [phone(5000 + i)
                                                   for i in range(200)]
        numbers += [email_address(i) for i in range(10)]
        numbers += [phone(7000 + i) for i in range(50 if not q else 10)]
        numbers += [phone(8000 + i) for i in range(wa)] + [phone(8500 + i)
                                                          for i in range(wa // 2)]
        bodies = ["storm 1", "kill 3", "outage 2", "redis 4", "faults reply 1",
                  "email body 1", "email body 4", "conversation 1", "conversation reply 2",
                  "whatsapp reply", *(profile_name(i) for i in range(wa))]
        rows.append(scenarios.privacy(stack, numbers, bodies))
        rows.append(scenarios.at_rest(stack, numbers, [
            f"{what} {i}" for what in ("storm", "kill", "outage", "redis", "faults reply",
                                       "email body", "conversation", "conversation reply",
                                       "whatsapp") for i in range(50)]
            + [profile_name(i) for i in range(wa)]))
    finally:
        stack.stop()
    return rows


if __name__ == "__main__":
    sys.exit(main())
