"""The baseline of the receiver benchmark: a bare Flask handler that reads the same form and does
one Redis LPUSH (what a receiver costs with nothing but the enqueue). Run by gunicorn:
`gunicorn -k sync -w 2 tests.bench.bare_lpush:app` with BENCH_REDIS_URL set."""

from __future__ import annotations

import json
import os

import redis
from flask import Flask, Response, request

app = Flask("bare-lpush")
_redis = redis.Redis.from_url(os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/15"))


@app.post("/webhooks/twilio/sms")
def receive() -> Response:
    _redis.lpush("bare", json.dumps(request.form.to_dict(flat=True)))
    return Response('<?xml version="1.0" encoding="UTF-8"?><Response></Response>',
                    mimetype="text/xml")
