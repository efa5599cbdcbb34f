"""Switchboard worker: FHIR writes, thread matching, channel sends, dead letters."""
