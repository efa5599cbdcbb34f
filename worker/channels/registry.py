"""The channel registry: which channels this deployment can send on, built from settings."""

from __future__ import annotations

from typing import TYPE_CHECKING

from worker.channels import Channel
from worker.settings import Settings

if TYPE_CHECKING:
    from worker.channels.twilio_conversations import TwilioConversations

STATUS_CALLBACK_PATH = "/webhooks/twilio/status"


def build_channels(settings: Settings) -> dict[str, Channel]:
    """Every channel whose credentials are configured (others refuse sends as misconfigured)."""
    channels: dict[str, Channel] = {}
    if settings.twilio_from_number or settings.twilio_messaging_service_sid:
        from worker.channels.twilio import TwilioSms

        channels["sms"] = TwilioSms(
            settings.twilio_account_sid, settings.twilio_auth_token.get_secret_value(),
            settings.twilio_from_number, settings.twilio_messaging_service_sid,
            settings.public_base_url + STATUS_CALLBACK_PATH, settings.twilio_api_base_url)
    if settings.twilio_conversations_identity:
        channels["conversations"] = conversations_client(settings)
    if settings.twilio_whatsapp_from or settings.twilio_messaging_service_sid:
        from worker.channels.whatsapp import TwilioWhatsApp

        # Its own sender when configured, else the Messaging Service (which must hold a
        # WhatsApp sender; Twilio refuses the send otherwise, mapped as `misconfigured`).
        channels["whatsapp"] = TwilioWhatsApp(
            settings.twilio_account_sid, settings.twilio_auth_token.get_secret_value(),
            settings.twilio_whatsapp_from,
            "" if settings.twilio_whatsapp_from else settings.twilio_messaging_service_sid,
            settings.public_base_url + STATUS_CALLBACK_PATH, settings.twilio_api_base_url)
    if settings.sendgrid_api_key.get_secret_value() and settings.sendgrid_from_email:
        from worker.channels.sendgrid import SendGridEmail

        channels["email"] = SendGridEmail(
            settings.sendgrid_api_key.get_secret_value(), settings.sendgrid_from_email,
            settings.sendgrid_api_base_url)
    if settings.fcm_credentials():
        from worker.channels.fcm import FcmPush

        channels["push"] = FcmPush(
            settings.fcm_credentials(), settings.fcm_project_id, settings.fcm_api_base_url,
            settings.push_notification_title, settings.push_notification_body,
            settings.push_include_body)
    return channels


def conversations_client(settings: Settings) -> TwilioConversations:
    """The Conversations channel: replies (with TWILIO_CONVERSATIONS_IDENTITY) and the
    participant lookups of inbound messages (which need only the account's credentials)."""
    from worker.channels.twilio_conversations import TwilioConversations

    return TwilioConversations(
        settings.twilio_account_sid, settings.twilio_auth_token.get_secret_value(),
        settings.twilio_conversations_identity, settings.twilio_api_base_url)
