"""Switchboard web receiver: verify, validate, enqueue; nothing else in the request path."""
