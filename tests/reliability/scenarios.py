"""Fault scenarios 1-5 and 8-11 of the reliability suite, each returning counted results.

Each takes a running `Stack` and a size; `make reliability` runs them at full size, the pytest
suite (tests/integration/test_reliability.py) small. All bounded in count and time.
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from typing import Any

from tests.email_payloads import new_message_id, parsed_post, raw_email, raw_post
from tests.reliability.harness import (
    API_TOKEN,
    CLINIC,
    CONVERSATIONS_IDENTITY,
    PUBLIC_BASE_URL,
    Counts,
    Stack,
    email_address,
    phone,
    profile_name,
    shuffled,
    sms,
)
from tests.reliability.harness import (
    whatsapp as whatsapp_message,
)
from tests.support import metric, our_log_files
from worker.channels.sendgrid import EMAIL_INBOUND_MESSAGE_ID_SYSTEM
from worker.channels.twilio_conversations import MESSAGE_SYSTEM, WEBHOOK_PATH
from worker.fhir.query import token


def _patients(stack: Stack, n: int) -> list[str]:
    """n registered patients; returns their numbers."""
    numbers = [phone(i) for i in range(n)]
    stack.parallel(lambda p: stack.sandbox.patient(p), numbers, threads=8)
    return numbers


def _inbound_tally(stack: Stack, counts: Counts, accepted_sids: set[str],
                   timeout: float) -> Counts:
    """Wait for the flow to settle, then count written / duplicates / lost / dead letters."""
    def all_there() -> bool:
        dead = {e.args[0].get("MessageSid") for e in stack.dead_letters()
                if e.args and isinstance(e.args[0], dict)}
        return accepted_sids <= set(stack.inbound_written()) | dead

    if not stack.settle(timeout, all_there):
        counts.notes.append(f"did not settle within {timeout:.0f}s")
    written = stack.inbound_written()
    entries = stack.dead_letters()
    dead = {e.args[0].get("MessageSid") for e in entries
            if e.args and isinstance(e.args[0], dict)}
    reasons = sorted({f"{e.task}:{e.reason}" for e in entries})
    if reasons:
        counts.notes.append("dead letters: " + ", ".join(reasons))
    counts.written = len(set(written) & accepted_sids)
    counts.duplicates = sum(n - 1 for n in written.values() if n > 1)
    counts.dead_lettered = len(dead & accepted_sids)
    counts.lost = len(accepted_sids - set(written) - dead)
    return counts


def duplicate_storm(stack: Stack, n: int) -> Counts:
    """1. n distinct inbound SMS, each delivered 5x concurrently and once more a bit later."""
    stack.reset()
    started = time.monotonic()
    counts = Counts("1 duplicate storm")
    senders = _patients(stack, min(n, 25))
    messages = [sms(senders[i % len(senders)], f"storm {i}") for i in range(n)]
    burst = shuffled([m for m in messages for _ in range(5)])
    codes = stack.parallel(stack.post_sms, burst, threads=32)
    time.sleep(2.0)
    codes += stack.parallel(stack.post_sms, messages, threads=16)
    counts.sent = len(codes)
    counts.accepted = sum(1 for c in codes if 200 <= c < 300)
    accepted = {m["MessageSid"] for m in messages}  # every copy was answered 2xx (checked)
    if counts.accepted != counts.sent:
        counts.notes.append(f"{counts.sent - counts.accepted} webhooks not accepted")
    _inbound_tally(stack, counts, accepted, timeout=60 + n / 5)
    counts.seconds = time.monotonic() - started
    return counts


def _outbound_messages(stack: Stack, n: int, prefix: str) -> list[tuple[str, str]]:
    """n clinician replies to n patients (each number distinct): (Communication id, body)."""
    out = []
    for i in range(n):
        number = phone(5000 + i)
        patient = stack.sandbox.patient(number)
        body = f"{prefix} reply {i}"
        comm = stack.sandbox.fhir.create({
            "resourceType": "Communication", "status": "in-progress",
            "recipient": [{"reference": f"Patient/{patient['id']}"}],
            "payload": [{"contentString": body}]}).resource
        out.append((str(comm["id"]), body))
    return out


def _outbound_tally(stack: Stack, counts: Counts, sent: list[tuple[str, str]],
                    accepted: set[str], timeout: float) -> Counts:
    def all_done() -> bool:
        bodies = {r["form"].get("Body") for r in stack.providers.requests("twilio")
                  if r["answered"] == 201}
        dead_now = {str(e.args[0].get("communication", "")).split("/")[-1]
                    for e in stack.dead_letters() if e.args}
        return all(b in bodies or c in dead_now for c, b in sent if c in accepted)

    if not stack.settle(timeout, all_done):
        counts.notes.append(f"did not settle within {timeout:.0f}s")
    entries = stack.dead_letters()
    dead_ids = {str(e.args[0].get("communication", "")).split("/")[-1]
                for e in entries if e.args}
    reasons: dict[str, int] = {}
    for e in entries:
        reasons[e.reason] = reasons.get(e.reason, 0) + 1
    if reasons:
        counts.notes.append("dead letters by reason: " + ", ".join(
            f"{k} {v}" for k, v in sorted(reasons.items())))
    created = [r["form"].get("Body") for r in stack.providers.requests("twilio")
               if r["answered"] == 201]
    per_body = {b: created.count(b) for b in set(created)}
    bodies = {c: b for c, b in sent}
    counts.written = sum(1 for c in accepted if per_body.get(bodies[c], 0) >= 1)
    counts.duplicates = sum(n - 1 for n in per_body.values() if n > 1)
    counts.dead_lettered = len(dead_ids & accepted)
    counts.lost = sum(1 for c in accepted
                      if per_body.get(bodies[c], 0) == 0 and c not in dead_ids)
    return counts


def worker_killed(stack: Stack, n_in: int, n_out: int, every: float = 3.0,
                  duration: float = 20.0) -> tuple[Counts, Counts]:
    """2. Inbound and outbound flow spread over `duration` seconds while a worker is SIGKILLed
    (and restarted) every `every` seconds. Returns (inbound counts, outbound counts)."""
    stack.reset()
    started = time.monotonic()
    senders = _patients(stack, 10)
    inbound = [sms(senders[i % len(senders)], f"kill {i}") for i in range(n_in)]
    outbound = _outbound_messages(stack, n_out, "kill")
    results: dict[str, Any] = {}

    gap = duration / max(1, n_in + n_out)

    def paced(fn: Any) -> Any:
        def run(item: Any) -> Any:
            time.sleep(gap * 4)  # 4 threads: about one request per `gap`
            return fn(item)
        return run

    def traffic() -> None:
        order = shuffled([("in", m) for m in inbound] + [("out", c) for c in outbound], seed=3)
        answers = stack.parallel(paced(lambda x: stack.post_sms(x[1]) if x[0] == "in"
                                       else stack.send(x[1][0])[0]), order, threads=4)
        by_item = dict(zip((id(x[1]) for x in order), answers, strict=True))
        results["in"] = [by_item[id(m)] for m in inbound]
        results["out"] = [by_item[id(c)] for c in outbound]

    flow = threading.Thread(target=traffic)
    flow.start()
    kills = 0
    while flow.is_alive() and kills < 50:
        time.sleep(every)
        stack.kill_worker(kills % len(stack.workers))
        kills += 1
    flow.join()
    # Keep killing while the backlog drains, then let it settle.
    for _ in range(3):
        if stack.queues_idle():
            break
        stack.kill_worker(kills % len(stack.workers))
        kills += 1
        time.sleep(every)
    cin = Counts("2 worker killed (inbound)", sent=len(inbound))
    cin.accepted = sum(1 for c in results["in"] if 200 <= c < 300)
    accepted_in = {m["MessageSid"] for m, c in zip(inbound, results["in"], strict=True)
                   if 200 <= c < 300}
    _inbound_tally(stack, cin, accepted_in, timeout=90 + n_in / 5)
    cout = Counts("2 worker killed (outbound)", sent=len(outbound))
    accepted_out = {c for (c, _), code in zip(outbound, results["out"], strict=True)
                    if 200 <= code < 300}
    cout.accepted = len(accepted_out)
    _outbound_tally(stack, cout, outbound, accepted_out, timeout=90 + n_out / 5)
    cin.notes.append(f"{kills} workers SIGKILLed")
    cin.seconds = cout.seconds = time.monotonic() - started
    return cin, cout


def fhir_outage(stack: Stack, n: int, phase_seconds: float = 10.0) -> Counts:
    """3. Mid-flow, FHIR answers 503, then drops every connection, then 429 without
    Retry-After, each for `phase_seconds` (about 30 s in all at full size), then recovers."""
    stack.reset()
    started = time.monotonic()
    counts = Counts("3 FHIR outage")
    senders = _patients(stack, 10)
    messages = [sms(senders[i % len(senders)], f"outage {i}") for i in range(n)]
    third = max(1, n // 3)
    codes = stack.parallel(stack.post_sms, messages[:third], threads=8)
    always = 10**9  # held until cleared
    for phase in ({"status": 503}, {"disconnect": True},
                  {"status": 429, "retry_after_seconds": 1}):
        stack.sandbox.clear_faults()
        stack.sandbox.fault(count=always, **phase)
        time.sleep(phase_seconds / 2)
        if phase.get("status") == 503:  # traffic keeps arriving during the outage
            codes += stack.parallel(stack.post_sms, messages[third:2 * third], threads=8)
        time.sleep(phase_seconds / 2)
    stack.sandbox.clear_faults()
    codes += stack.parallel(stack.post_sms, messages[2 * third:], threads=8)
    counts.sent = len(codes)
    counts.accepted = sum(1 for c in codes if 200 <= c < 300)
    accepted = {m["MessageSid"] for m, c in zip(messages, codes, strict=True) if 200 <= c < 300}
    _inbound_tally(stack, counts, accepted, timeout=120 + n / 5)
    if counts.dead_lettered:
        counts.notes.append("dead letters during a recoverable outage")
    counts.seconds = time.monotonic() - started
    return counts


def redis_restart(stack: Stack, n: int, down_seconds: float = 2.0) -> Counts:
    """4. SIGKILL redis-server mid-flow and restart it (AOF, appendfsync always)."""
    stack.reset()
    started = time.monotonic()
    counts = Counts("4 Redis restart")
    senders = _patients(stack, 10)
    messages = [sms(senders[i % len(senders)], f"redis {i}") for i in range(n)]
    codes: dict[str, int] = {}
    stop = threading.Event()
    spooled_before = metric(stack.http.get("/metrics").text, "switchboard_spool_appended_total")

    def traffic() -> None:
        for m in messages:
            codes[m["MessageSid"]] = stack.post_sms(m)
            time.sleep(0.01)
        stop.set()

    flow = threading.Thread(target=traffic)
    flow.start()
    time.sleep(0.5)
    stack.redis.kill()
    time.sleep(down_seconds)
    stack.redis.start()
    flow.join()
    counts.sent = len(codes)
    accepted = {sid for sid, c in codes.items() if 200 <= c < 300}
    counts.accepted = len(accepted)
    refused = sum(1 for c in codes.values() if c >= 500)
    spooled = metric(stack.http.get("/metrics").text, "switchboard_spool_appended_total") \
        - spooled_before
    counts.notes.append(f"{spooled:g} webhooks spooled to disk while Redis was down and "
                        f"published when it was back (docs/spool.md); {refused} refused with "
                        "5xx (Twilio retries those)")
    restarts_before = stack.restarts
    _inbound_tally(stack, counts, accepted, timeout=90 + n / 5)
    if stack.restarts > restarts_before:
        counts.notes.append(f"{stack.restarts - restarts_before} workers exited after the "
                            "reconnect (Celery bug) and were restarted by the supervisor")
    counts.seconds = time.monotonic() - started
    return counts


def provider_faults(stack: Stack, n: int) -> Counts:
    """5. Outbound sends meeting a mix of 429, 5xx, slow answers, dropped connections and
    permanent errors: transient ones go out exactly once, the rest are dead-lettered."""
    stack.reset()
    started = time.monotonic()
    counts = Counts("5 provider faults")
    outbound = _outbound_messages(stack, n, "faults")
    kinds = ["429", "503", "slow", "21211", "21610", "drop", "ok"]
    expect_sent: set[str] = set()
    expect_dead: set[str] = set()
    for i, (comm_id, _) in enumerate(outbound):
        kind, number = kinds[i % len(kinds)], phone(5000 + i)
        if kind == "429":
            stack.providers.fault(provider="twilio", to=number, status=429, twilio_code=20429,
                                  retry_after=1, count=2)
        elif kind == "503":
            stack.providers.fault(provider="twilio", to=number, status=503, count=3)
        elif kind == "slow":
            stack.providers.fault(provider="twilio", to=number, delay_ms=1500)
        elif kind in ("21211", "21610"):
            stack.providers.fault(provider="twilio", to=number, status=400,
                                  twilio_code=int(kind))
        elif kind == "drop":
            stack.providers.fault(provider="twilio", to=number, disconnect=True)
        (expect_dead if kind in ("21211", "21610", "drop") else expect_sent).add(comm_id)
    codes = stack.parallel(lambda c: stack.send(c[0])[0], outbound, threads=8)
    counts.sent = len(codes)
    accepted = {c for (c, _), code in zip(outbound, codes, strict=True) if 200 <= code < 300}
    counts.accepted = len(accepted)
    _outbound_tally(stack, counts, outbound, accepted, timeout=90 + n / 2)
    # "drop": the connection closed without an answer, so whether Twilio took the message is
    # unknown; Switchboard dead-letters it (outcome-unknown) rather than risk a second text.
    counts.notes.append(f"expected {len(expect_sent)} sent, {len(expect_dead)} dead-lettered")
    counts.seconds = time.monotonic() - started
    return counts


def inbound_email(stack: Stack, n: int, patients: int = 10) -> Counts:
    """10. n inbound emails (both Inbound Parse modes, every third with an attachment), each
    posted 3x concurrently while FHIR answers 503 to a run of writes: every email written once
    with all its attachments, none lost."""
    stack.reset()
    started = time.monotonic()
    counts = Counts("10 inbound email")
    senders = [email_address(i) for i in range(patients)]
    stack.parallel(lambda a: stack.sandbox.fhir.create({
        "resourceType": "Patient", "telecom": [{"system": "email", "value": a}]}), senders,
        threads=8)
    emails: list[tuple[str, tuple[str, bytes], int]] = []
    for i in range(n):
        sender, mid = senders[i % patients], new_message_id("reliability.example")
        files = [(f"scan-{i}.pdf", "application/pdf", bytes([i % 256]) * 4096)] if i % 3 == 0 \
            else []
        body = f"email body {i}"
        email = (parsed_post(sender, text=body, message_id=mid, attachments=files) if i % 2
                 else raw_post(sender, raw_email(sender, text=body, message_id=mid,
                                                 attachments=files)))
        emails.append((mid, email, len(files)))
    stack.sandbox.fault(status=503, count=max(3, n // 5), method="POST")
    burst = shuffled([e for e in emails for _ in range(3)])
    codes = stack.parallel(lambda e: stack.post_email(e[1]), burst, threads=16)
    counts.sent = len(codes)
    counts.accepted = sum(1 for c in codes if 200 <= c < 300)
    accepted = {mid for (mid, _, _), c in zip(burst, codes, strict=True) if 200 <= c < 300}

    def all_there() -> bool:
        return accepted <= set(stack.emails_written())

    if not stack.settle(60 + n, all_there):
        counts.notes.append(f"did not settle within {60 + n:.0f}s")
    written = stack.emails_written()
    entries = stack.dead_letters()
    if entries:
        counts.notes.append("dead letters: " + ", ".join(sorted({e.reason for e in entries})))
    counts.dead_lettered = len(entries)
    counts.written = len(set(written) & accepted)
    counts.duplicates = sum(m - 1 for m in written.values() if m > 1)
    counts.lost = len(accepted - set(written)) - counts.dead_lettered
    wanted = {mid: files for mid, _, files in emails}
    short = 0
    for mid in set(written) & accepted:
        (msg,) = stack.sandbox.all("Communication", identifier=token(
            EMAIL_INBOUND_MESSAGE_ID_SYSTEM, mid))
        got = sum(1 for p in msg.get("payload") or [] if "contentAttachment" in p)
        short += got != wanted[mid]
    if short:
        counts.notes.append(f"{short} emails without exactly their attachments")
        counts.lost += short
    counts.seconds = time.monotonic() - started
    return counts


def conversations(stack: Stack, n: int) -> Counts:
    """12b. Twilio Conversations: n patients each write into their own Conversation, every
    onMessageAdded delivered 5x at once; each thread's reply (POST /v1/messages) is posted once
    into its Conversation, and our replies' own onMessageAdded, delivered back twice, write
    nothing. Numbers phone(7000 + i), bodies `conversation <i>` / `conversation reply <i>`."""
    stack.reset()
    started = time.monotonic()
    counts = Counts("12b Twilio Conversations")
    control = stack.providers.origin
    http = stack.http  # the web's client; the sandbox is reached with absolute URLs
    http.post(f"{control}/__conversations/webhook",
              json={"url": PUBLIC_BASE_URL + WEBHOOK_PATH, "post": False}).raise_for_status()
    numbers = [phone(7000 + i) for i in range(n)]
    stack.parallel(lambda p: stack.sandbox.patient(p), numbers, threads=8)
    convs = [http.post(f"{control}/__conversations/setup", json={
        "address": p, "proxy_address": CLINIC}).json() for p in numbers]
    webhooks = [http.post(f"{control}/__conversations/write", json={
        "conversation": c["conversation_sid"], "participant": c["participant_sid"],
        "body": f"conversation {i}"}).json()["webhook"] for i, c in enumerate(convs)]
    codes = stack.parallel(stack.post_conversations,
                           shuffled([w for w in webhooks for _ in range(5)]), threads=32)
    counts.sent = len(codes)
    counts.accepted = sum(1 for c in codes if 200 <= c < 300)
    sids = [w["params"]["MessageSid"] for w in webhooks]

    def written() -> dict[str, list[dict[str, Any]]]:
        found = stack.sandbox.all("Communication", identifier=f"{MESSAGE_SYSTEM}|")
        by_sid: dict[str, list[dict[str, Any]]] = {}
        for c in found:
            for ident in c.get("identifier") or []:
                if ident.get("system") == MESSAGE_SYSTEM:
                    by_sid.setdefault(str(ident["value"]), []).append(c)
        return by_sid

    if not stack.settle(60 + n, lambda: set(sids) <= set(written())):
        counts.notes.append("inbound did not settle")
    inbound = written()
    counts.written = sum(1 for s in sids if s in inbound)
    counts.duplicates = sum(len(inbound.get(s, [])) - 1 for s in sids if s in inbound)
    counts.lost = n - counts.written
    # One reply per thread, into its Conversation.
    replies = []
    for i, s in enumerate(sids):
        if s not in inbound:
            continue
        header = inbound[s][0]["partOf"][0]["reference"]
        resp = http.post("/v1/messages", json={
            "resourceType": "Communication", "status": "in-progress",
            "partOf": [{"reference": header}],
            "payload": [{"contentString": f"conversation reply {i}"}]},
            headers={"Authorization": f"Bearer {API_TOKEN}"})
        replies.append((convs[i]["conversation_sid"], resp.status_code))

    def ours() -> list[dict[str, Any]]:
        rows = http.get(f"{control}/__conversations/messages").json()
        return [m for m in rows if m["author"] == CONVERSATIONS_IDENTITY]

    stack.settle(60 + n, lambda: len(ours()) >= sum(1 for _, c in replies if c == 202))
    posted = ours()
    per_conversation = Counter(m["conversation_sid"] for m in posted)
    counts.duplicates += sum(c - 1 for c in per_conversation.values() if c > 1)
    missing = [conv for conv, code in replies if code != 202 or conv not in per_conversation]
    if missing:
        counts.problems.append(f"{len(missing)} replies not posted into their Conversation")
    # Our replies' echoes, delivered twice each: nothing new may land.
    before = sum(len(v) for v in written().values())
    echoes = [w for w in http.get(f"{control}/__conversations/webhooks").json()
              if w["params"].get("Author") == CONVERSATIONS_IDENTITY]
    stack.parallel(stack.post_conversations, echoes * 2, threads=16)
    stack.settle(30)
    after = sum(len(v) for v in written().values())
    if after != before:
        counts.problems.append(f"{after - before} echoes of our replies were written")
    counts.dead_lettered = len(stack.dead_letters())
    counts.notes.append(f"{len(posted)} replies posted for {len(replies)} threads; "
                        f"{len(echoes)} echoes delivered twice, none written")
    counts.seconds = time.monotonic() - started
    return counts


def privacy(stack: Stack, numbers: list[str], bodies: list[str]) -> Counts:
    """8. Every log line of the stack's web, workers and tools, scanned for every phone number
    and body used in the scenarios (the sandboxes, which play the outside world, excluded)."""
    counts = Counts("8 privacy (log lines with PHI)")
    logs = our_log_files(stack.log_dir)
    text = "\n".join(p.read_text(errors="replace") for p in logs)
    needles = {*numbers, *(n[2:] for n in numbers if n.startswith("+")), *bodies, CLINIC}
    # A number counts only on its own: "…0.0992555200000424s" (a task's run time) is no leak.
    hits = [n for n in needles if n and re.search(rf"(?<!\d){re.escape(n)}(?!\d)", text)]
    hits += re.findall(r"\+1555\d{7}|%2B1555\d{7}", text)[:5]
    # Any address of the test domains (patients' and the clinic's mailboxes, Message-IDs).
    hits += re.findall(r"[\w.+\-]+@(?:[\w\-]+\.)*(?:reliability\.example|example\.org|"
                       r"clinic\.example)", text)[:5]
    counts.sent = len(text.splitlines())
    counts.written = len(needles)
    counts.duplicates = len(hits)  # reported in the "duplicates" column as "hits"
    counts.notes.append(f"{len(logs)} log files, {len(needles)} values searched; "
                        f"hits: {sorted(set(hits))[:5]}")
    return counts


def at_rest(stack: Stack, numbers: list[str], bodies: list[str]) -> Counts:
    """11. After every other scenario: Redis's AOF (all writes since it started), a SAVE and
    an AOF rewrite (RDB and AOF files), a DUMP of every key, Flower's task pages, the web's
    and the workers' /metrics, searched for every phone number and body used. Sealing
    (worker/crypto.py) keeps them out."""
    from tests import at_rest as collect

    counts = Counts("11 PHI at rest (Redis, Flower)")
    started = time.monotonic()
    seen = collect.persisted(stack._r, stack.redis.data_dir)
    seen["Flower"] = collect.flower(stack.flower_origin, stack.flower_auth)
    seen["/metrics"] = stack.http.get("/metrics").content
    seen["workers' /metrics"] = stack.worker_metrics().encode()
    needles = sorted({*numbers, *(n[1:] for n in numbers), *bodies})
    found = {name: collect.hits(blob, needles) for name, blob in seen.items()}
    counts.sent = sum(len(b) for b in seen.values())
    counts.written = len(needles)
    counts.duplicates = sum(len(h) for h in found.values())  # the "duplicates" column: hits
    counts.seconds = time.monotonic() - started
    sizes = ", ".join(f"{name} {len(blob) // 1024} KiB" for name, blob in seen.items())
    counts.notes.append(f"searched {sizes} for {len(needles)} values; Flower showed "
                        f"{collect.flower_tasks(stack.flower_origin, stack.flower_auth)} tasks; "
                        f"hits: {({k: v[:3] for k, v in found.items() if v})}")
    return counts


def contention(stack: Stack, n: int, patients: int = 50) -> Counts:
    """9. n inbound SMS across `patients` patients, posted by 32 clients at once, while the FHIR
    sandbox aborts every overlapping conditional write as Medplum on PostgreSQL does (409,
    SQLSTATE 40001, after its own retry). Every message written once, none dead-lettered;
    conflicts and retries per message counted."""
    stack.reset()
    stack.sandbox.contention(rate=1)
    started = time.monotonic()
    counts = Counts("9 FHIR contention")
    senders = _patients(stack, patients)
    before = stack.contention_events()
    stack.sandbox.reset_counter()
    burst_started = time.monotonic()
    messages = shuffled([sms(senders[i % patients], f"contention {i}") for i in range(n)])
    codes = stack.parallel(stack.post_sms, messages, threads=32)
    counts.sent = len(codes)
    counts.accepted = sum(1 for c in codes if 200 <= c < 300)
    accepted = {m["MessageSid"] for m, c in zip(messages, codes, strict=True) if 200 <= c < 300}
    _inbound_tally(stack, counts, accepted, timeout=60 + n / 5)
    rate = counts.written / max(0.001, time.monotonic() - burst_started)
    events = stack.contention_events() - before
    stats = stack.sandbox.stats()
    counts.conflicts = int(stats["conflicts"])
    per = max(1, counts.accepted)
    counts.notes.append(
        f"{stats['conflicts'] / per:.2f} conflicts (409 40001) answered per message, "
        f"{stats['aborts'] / per:.2f} aborts inside the server; Switchboard retried "
        f"{events['retried'] / per:.2f} per message in the FHIR client and "
        f"{events['task-retry'] / per:.2f} per message as task retries "
        f"({rate:.0f} msgs/s written)")
    counts.seconds = time.monotonic() - started
    return counts


def whatsapp(stack: Stack, n: int) -> Counts:
    """14. WhatsApp: n inbound messages (each delivered 3x concurrently, display names and
    all) written once each; then a reply to each of n/2 patients who never wrote (outside the
    24-hour window): held, one template each, and released exactly once when the patient
    writes. `written` counts inbound messages written plus replies sent free-form once."""
    stack.reset()
    started = time.monotonic()
    counts = Counts("14 WhatsApp (window, hold, release)")
    numbers = [phone(8000 + i) for i in range(n)]
    messages = [whatsapp_message(numbers[i], f"whatsapp {i}", profile_name(i))
                for i in range(n)]
    copies = shuffled([m for m in messages for _ in range(3)])
    codes = stack.parallel(stack.post_sms, copies, threads=16)
    counts.sent = len(codes)
    counts.accepted = sum(1 for c in codes if 200 <= c < 300)
    # A message counts as accepted when one of its copies was (a 503 is Twilio's to retry).
    accepted = {m["MessageSid"] for m, c in zip(copies, codes, strict=True) if 200 <= c < 300}
    if len(accepted) != n:
        counts.problems.append(f"{n - len(accepted)} messages refused in every copy")
    _inbound_tally(stack, counts, accepted, timeout=60 + n / 5)
    quiet = [phone(8500 + i) for i in range(max(1, n // 2))]
    comms = []
    for number in quiet:
        patient = stack.sandbox.patient(number)
        comms.append(stack.sandbox.fhir.create({
            "resourceType": "Communication", "status": "in-progress",
            "recipient": [{"reference": f"Patient/{patient['id']}"}],
            "payload": [{"contentString": f"whatsapp reply {number[-4:]}"}]}).resource["id"])
    for comm in comms:
        for _ in range(3):  # 503 / no answer: not queued, so asking again is safe (http-api.md)
            status, _ = stack.send_on(comm, "whatsapp")
            codes.append(status)
            if status not in (503, 599):
                break
            time.sleep(0.5)
        counts.sent += 1
        counts.accepted += int(200 <= status < 300)
    if counts.accepted != counts.sent or any(c >= 300 for c in codes):
        counts.notes.append(f"answers (webhooks, then sends): {codes}")

    def templates() -> bool:
        return len([r for r in stack.providers.requests("twilio")
                    if r["method"] == "POST" and r["form"].get("ContentSid")]) >= len(quiet)

    if not stack.settle(60, templates):
        counts.problems.append("not every held reply's template went out")
    answers = [whatsapp_message(number, "ok", profile_name(8500 + i))
               for i, number in enumerate(quiet)]
    stack.parallel(stack.post_sms, answers, threads=8)

    def free_form() -> list[dict[str, Any]]:
        return [r for r in stack.providers.requests("twilio")
                if r["method"] == "POST" and r["form"].get("Body", "").startswith(
                    "whatsapp reply")]

    if not stack.settle(60, lambda: len(free_form()) >= len(quiet)):
        counts.notes.append("did not settle within 60s")
    time.sleep(1.0)  # a second copy, were there one, would show now
    sends = Counter(r["form"]["To"] for r in free_form())
    counts.written += len(sends)
    counts.duplicates += sum(k - 1 for k in sends.values() if k > 1)
    counts.lost += len(quiet) - len(sends)
    held = [r for r in stack.providers.requests("twilio") if r["method"] == "POST"
            and r["form"].get("ContentSid")]
    if len(held) != len(quiet):
        counts.problems.append(f"{len(held)} templates for {len(quiet)} held replies")
    counts.seconds = time.monotonic() - started
    return counts
