"""Celery tasks: decode, call a plain function, translate the outcome. Nothing else."""

from __future__ import annotations

import logging
from typing import Any

from celery import shared_task

from worker.celery_app import TASK_INBOUND_SMS
from worker.channels import twilio
from worker.fhir.resources import clinic_participant
from worker.inbound import deliver_inbound
from worker.reliability import SwitchboardTask
from worker.runtime import get_runtime
from worker.threads import ThreadContext

log = logging.getLogger("switchboard.inbound")


@shared_task(bind=True, base=SwitchboardTask, name=TASK_INBOUND_SMS)
def inbound_sms(self: SwitchboardTask, params: dict[str, str], meta: dict[str, Any]
                ) -> dict[str, Any]:
    """Write one Twilio incoming SMS/MMS (the webhook's full param dict) to FHIR."""
    rt = get_runtime()
    msg = twilio.parse_inbound(params, received_at=str(meta["received_at"]))
    ctx = ThreadContext(rt.fhir, rt.systems,
                        clinic_participant(msg, rt.systems, rt.settings.clinic_reference),
                        rt.locks.hold)
    outcome = deliver_inbound(msg, ctx, rt.settings.sms_thread_strategy,
                              rt.settings.unknown_sender_policy, rt.seen)
    log.info("inbound %s: %s Communication/%s in %s", msg.provider_message_id, outcome.result,
             outcome.communication_id, outcome.thread_ref)
    return {"communication": outcome.communication_id, "thread": outcome.thread_ref,
            "result": outcome.result}
