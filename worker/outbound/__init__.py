"""Outbound flow: a clinician's message sent once, its delivery status followed."""
