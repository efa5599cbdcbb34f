"""Deployment files: docker-compose.yml against the Compose schema, the Procfile, .env.example.

No Docker here: the compose file is checked against the vendored Compose Specification schema
(tests/data/compose-spec.json, from docker-compose 1.29.2, draft 2019-09) plus the rules below.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft201909Validator, FormatChecker
from jsonschema.exceptions import ValidationError
from jsonschema.protocols import Validator
from jsonschema.validators import validator_for

from worker.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
SCHEMA = ROOT / "tests" / "data" / "compose-spec.json"
PROCFILE = ROOT / "Procfile"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = ROOT / "Dockerfile"

PROCESS_TYPES = ("web", "worker", "beat", "flower")
# Read by the process commands (or by Flower itself), not by worker/settings.py.
PROCESS_VARIABLES = {"WEB_CONCURRENCY", "WORKER_CONCURRENCY", "FLOWER_BASIC_AUTH"}

# What the installed jsonschema does not act on in the vendored schema (test_schema_gaps):
# - `id` is the draft-04 spelling of `$id`; a 2019-09 validator ignores it. Harmless: every
#   `$ref` in the file is a JSON pointer from the root.
# - `service` under `definitions/constraints` holds "every service has `build` or `image`, and
#   `build` has `context`"; docker-compose applied it in code and nothing `$ref`s it, so this
#   module applies it to each service itself (_errors).
# - the formats are Compose's own; jsonschema knows none of them, so `duration` and `ports`
#   are checked by this module, and `expose` / `subnet_ip_address` are not checked at all
#   (the compose file must not use them: test_no_unchecked_formats_in_use).
ANNOTATION_KEYWORDS = {"$schema", "title", "description", "definitions", "deprecated"}
IGNORED_KEYWORDS = {"id", "service"}
CHECKED_FORMATS = {"duration", "ports"}
UNCHECKED_FORMATS = {"expose", "subnet_ip_address"}

# Keywords whose value is a schema, a list of schemas, or a mapping of name to schema.
_SUBSCHEMA = {"items", "additionalItems", "additionalProperties", "not", "contains",
              "propertyNames", "if", "then", "else", "unevaluatedItems", "unevaluatedProperties"}
_SUBSCHEMA_LISTS = {"oneOf", "anyOf", "allOf"}
_SUBSCHEMA_MAPS = {"properties", "patternProperties", "definitions", "$defs", "dependentSchemas"}


# --- loading -------------------------------------------------------------------------------------

@cache
def _schema() -> dict[str, Any]:
    with SCHEMA.open(encoding="utf-8") as f:
        schema: dict[str, Any] = json.load(f)
    return schema


def _compose() -> dict[str, Any]:
    with COMPOSE.open(encoding="utf-8") as f:
        doc: dict[str, Any] = yaml.safe_load(f)
    return doc


def _procfile() -> dict[str, str]:
    processes: dict[str, str] = {}
    for line in PROCFILE.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9_-]+):\s*(.+)", line)
        assert match, f"not a Procfile line: {line!r}"
        assert match[1] not in processes, f"process type {match[1]} defined twice"
        processes[match[1]] = match[2].strip()
    return processes


def _env_example() -> tuple[set[str], set[str]]:
    """(every variable mentioned, commented out or not; the ones actually set)."""
    mentioned: set[str] = set()
    active: set[str] = set()
    for line in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines():
        match = re.match(r"\s*(#\s*)?([A-Z][A-Z0-9_]*)=", line)
        if match:
            mentioned.add(match[2])
            if not match[1]:
                assert match[2] not in active, f"{match[2]} set twice in .env.example"
                active.add(match[2])
    return mentioned, active


def _shell_command(service: dict[str, Any]) -> str:
    """The command a compose service runs, without the `sh -c` wrapper and with `$$` -> `$`."""
    command = service["command"]
    if isinstance(command, list):
        assert len(command) == 3 and command[:2] == ["sh", "-c"], command
        command = command[2]
    assert isinstance(command, str)
    if command.startswith("sh -c "):
        command = command.removeprefix("sh -c ").strip()
        assert command[0] == command[-1] and command[0] in "'\"", command
        command = command[1:-1]
    return command.replace("$$", "$")


def _strings(node: object) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield str(key)
            yield from _strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from _strings(item)


def _subschemas(schema: object) -> Iterator[dict[str, Any]]:
    """Every schema object in the vendored schema (keys of these are keywords)."""
    if not isinstance(schema, dict):
        return
    yield schema
    for key, value in schema.items():
        if key in _SUBSCHEMA_MAPS and isinstance(value, dict):
            for sub in value.values():
                yield from _subschemas(sub)
        elif key in _SUBSCHEMA_LISTS or (key == "items" and isinstance(value, list)):
            for sub in value:
                yield from _subschemas(sub)
        elif key in _SUBSCHEMA:
            yield from _subschemas(value)


# --- the schema validator ------------------------------------------------------------------------

_PORT_RANGE = r"\d{1,5}(?:-\d{1,5})?"
_PORT_SPEC = re.compile(
    r"(?:(?:\d{1,3}(?:\.\d{1,3}){3}|\[[0-9A-Fa-f:]+\]):)?"  # optional host IP
    rf"(?P<ports>(?:(?:{_PORT_RANGE})?:)?{_PORT_RANGE})"    # [host[-range]:]container[-range]
    r"(?:/(?:tcp|udp|sctp))?")
_DURATION = re.compile(r"(?:\d+(?:\.\d+)?(?:ns|us|ms|s|m|h))+")


def _is_ports(instance: object) -> bool:
    """Compose's `ports` format: 8000, "8000", "8000:8000", "127.0.0.1:8000:8000/tcp"."""
    if isinstance(instance, bool):
        return False
    if isinstance(instance, int):
        return 0 < instance < 65536
    if isinstance(instance, float):
        return False
    if not isinstance(instance, str):
        return True
    match = _PORT_SPEC.fullmatch(instance)
    if match is None:
        return False
    return all(0 < int(n) < 65536 for n in re.findall(r"\d+", match["ports"]))


def _is_duration(instance: object) -> bool:
    """Compose's `duration` format (Go durations): "5s", "1m30s", "1.5h"."""
    return not isinstance(instance, str) or bool(_DURATION.fullmatch(instance))


def _validator_class(schema: dict[str, Any]) -> type[Validator]:
    cls: type[Validator] | None = validator_for(schema, default=None)
    if cls is None:
        # The vendored file says "http://json-schema.org/draft/2019-09/schema#"; jsonschema
        # registers "https://json-schema.org/draft/2019-09/schema" and, given the http form,
        # would fall back to its newest draft (2020-12) with a DeprecationWarning.
        uri = str(schema["$schema"]).replace("http://", "https://", 1).rstrip("#")
        cls = validator_for({"$schema": uri}, default=None)
    assert cls is not None, f"no validator for $schema {schema.get('$schema')!r}"
    return cls


@cache
def _validator() -> Validator:
    schema = _schema()
    cls = _validator_class(schema)
    cls.check_schema(schema)
    checker = FormatChecker()
    checker.checks("ports")(_is_ports)
    checker.checks("duration")(_is_duration)
    return cls(schema, format_checker=checker)


@cache
def _service_constraints() -> Validator:
    schema = _schema()
    return _validator_class(schema)(schema["definitions"]["constraints"]["service"])


def _errors(doc: dict[str, Any]) -> list[ValidationError]:
    errors = list(_validator().iter_errors(doc))
    services = doc.get("services")
    if isinstance(services, dict):
        for name, service in services.items():
            for error in _service_constraints().iter_errors(service):
                error.path.extendleft([name, "services"])
                errors.append(error)
    return errors


# --- the schema --------------------------------------------------------------------------------

def test_schema_is_draft_2019_09_and_valid() -> None:
    assert _validator_class(_schema()) is Draft201909Validator
    Draft201909Validator.check_schema(_schema())


def test_schema_gaps() -> None:
    """The keywords and formats jsonschema cannot enforce here are exactly the known ones."""
    cls = _validator_class(_schema())
    nodes = list(_subschemas(_schema()))
    keywords = {key for node in nodes for key in node}
    assert keywords - set(cls.VALIDATORS) - ANNOTATION_KEYWORDS == IGNORED_KEYWORDS
    formats = {node["format"] for node in nodes if "format" in node}
    assert formats - set(FormatChecker().checkers) == CHECKED_FORMATS | UNCHECKED_FORMATS


@pytest.mark.parametrize(("value", "ok"), [
    (8000, True), ("8000", True), ("8000:8000", True), ("127.0.0.1:8103:8103", True),
    ("127.0.0.1::8000", True), ("9000-9001:9000-9001/udp", True), ("[::1]:5555:5555", True),
    (0, False), (70000, False), (True, False), ("8000:80000", False), ("8000:http", False),
    ("localhost:80:80", False), ("80/ftp", False),
])
def test_ports_format(value: object, ok: bool) -> None:
    assert _is_ports(value) is ok


@pytest.mark.parametrize(("value", "ok"), [
    ("5s", True), ("1m30s", True), ("1.5h", True), ("250ms", True),
    ("5", False), ("5 s", False), ("five seconds", False), ("", False),
])
def test_duration_format(value: str, ok: bool) -> None:
    assert _is_duration(value) is ok


# --- docker-compose.yml --------------------------------------------------------------------------

def test_compose_matches_schema() -> None:
    errors = _errors(_compose())
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


def _set(path: tuple[str, ...], value: object) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        node = doc
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return mutate


@pytest.mark.parametrize(("mutate", "where"), [
    pytest.param(_set(("services", "web", "ports"), 8000), ("services", "web", "ports"),
                 id="ports-as-int"),
    pytest.param(_set(("servicez",), {}), (), id="unknown-top-level-key"),
    pytest.param(_set(("services", "web", "helthcheck"), {"test": "true"}),
                 ("services", "web"), id="unknown-service-key"),
    pytest.param(_set(("services", "web", "ports"), ["8000:80000"]),
                 ("services", "web", "ports"), id="port-out-of-range"),
    pytest.param(_set(("services", "web", "healthcheck", "interval"), "15 seconds"),
                 ("services", "web", "healthcheck", "interval"), id="bad-duration"),
    pytest.param(_set(("services", "web", "depends_on", "redis", "condition"), "service_ready"),
                 ("services", "web", "depends_on"), id="bad-depends-on-condition"),
    pytest.param(_set(("services", "web", "restart"), ["always"]),
                 ("services", "web", "restart"), id="restart-not-a-string"),
    pytest.param(_set(("services", "web", "build"), {"target": "app"}),
                 ("services", "web", "build"), id="build-without-context"),
    pytest.param(lambda doc: doc["services"]["redis"].pop("image"),
                 ("services", "redis"), id="neither-build-nor-image"),
])
def test_broken_compose_fails_schema(
        mutate: Callable[[dict[str, Any]], None], where: tuple[str, ...]) -> None:
    doc = copy.deepcopy(_compose())
    mutate(doc)
    errors = _errors(doc)
    assert errors, "the schema accepted a broken compose file"
    assert any(tuple(e.absolute_path)[:len(where)] == where for e in errors), [
        (list(e.absolute_path), e.message) for e in errors]


def test_no_unchecked_formats_in_use() -> None:
    services = _compose()["services"]
    assert all("expose" not in s for s in services.values())
    assert all("ipam" not in n for n in (_compose().get("networks") or {}).values())


def test_no_compose_interpolation() -> None:
    """A single `$` would be filled in by Compose from the host at parse time: always `$$`."""
    for text in _strings(_compose()):
        assert "$" not in text.replace("$$", ""), text


def test_redis_is_durable_and_never_evicts() -> None:
    redis = _compose()["services"]["redis"]
    assert redis["image"] == "redis:7"
    command = redis["command"]
    assert command[0] == "redis-server"
    flags = dict(zip(command[1::2], command[2::2], strict=True))
    assert flags["--appendonly"] == "yes"
    assert flags["--appendfsync"] == "always"
    assert flags["--maxmemory-policy"] == "noeviction"
    assert any(v.split(":")[1] == "/data" for v in redis["volumes"])
    assert "redis-cli ping" in " ".join(redis["healthcheck"]["test"])
    assert "ports" not in redis


def test_every_service_has_a_healthcheck() -> None:
    for name, service in _compose()["services"].items():
        check = service.get("healthcheck")
        assert check and check.get("test") and not check.get("disable"), name
        assert check["test"][0] in {"CMD", "CMD-SHELL"}, name
        if check["test"][:3] == ["CMD", "python", "-c"]:
            compile(check["test"][3], f"<{name} healthcheck>", "exec")


@pytest.mark.parametrize("name", PROCESS_TYPES)
def test_app_service(name: str) -> None:
    service = _compose()["services"][name]
    assert service["build"] == {"context": ".", "target": "app"}
    assert service["env_file"] == ".env"
    assert service["environment"]["REDIS_URL"].startswith("redis://redis:6379/")
    assert service["depends_on"] == {"redis": {"condition": "service_healthy"}}
    assert service["restart"] == "unless-stopped"


def test_web_healthcheck_hits_healthz() -> None:
    test = " ".join(_compose()["services"]["web"]["healthcheck"]["test"])
    assert "urllib.request" in test and "/healthz" in test


def test_worker_uses_threads_and_answers_pings() -> None:
    worker = _compose()["services"]["worker"]
    command = _shell_command(worker)
    assert "-P threads" in command
    assert "-c ${WORKER_CONCURRENCY:-16}" in command
    assert "inspect ping -d celery@$$HOSTNAME" in worker["healthcheck"]["test"][1]


def test_beat_command() -> None:
    assert _shell_command(_compose()["services"]["beat"]) == (
        "exec celery -A worker.app beat --loglevel INFO")


def test_flower_requires_basic_auth_and_is_not_persistent() -> None:
    flower = _compose()["services"]["flower"]
    command = _shell_command(flower)
    assert command.endswith("exec celery -A worker.app flower --port=5555 --persistent=False")
    # The credentials reach Flower from .env (FLOWER_* variables), never blanked by compose.
    assert "FLOWER_BASIC_AUTH" not in flower["environment"]
    assert "5555:5555" in flower["ports"]
    assert "/healthcheck" in " ".join(flower["healthcheck"]["test"])


@pytest.mark.parametrize(("value", "starts"), [
    (None, False), ("", False), ("admin", False), ("admin:", False), (":secret", False),
    ("admin:secret", True), ("a:b,c:d", True),
])
def test_flower_guard(value: str | None, starts: bool) -> None:
    """Run the Procfile's guard (what precedes `exec celery`) with an `echo` in Flower's place."""
    guard, found, _ = _procfile()["flower"].partition("exec celery")
    assert found
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    if value is not None:
        env["FLOWER_BASIC_AUTH"] = value
    run = subprocess.run(["sh", "-c", guard + "echo started"], env=env, capture_output=True,
                         text=True, timeout=10, check=False)
    if starts:
        assert (run.returncode, run.stdout) == (0, "started\n")
    else:
        assert run.returncode == 1 and not run.stdout
        assert "FLOWER_BASIC_AUTH is required" in run.stderr


def test_sandbox_profile() -> None:
    services = _compose()["services"]
    sandbox = {n for n, s in services.items() if "sandbox" in s.get("profiles", [])}
    assert "fhir-sandbox" in sandbox
    assert not {"redis", *PROCESS_TYPES} & sandbox
    fhir = services["fhir-sandbox"]
    assert fhir["build"] == {"context": ".", "target": "fhir-sandbox"}
    assert fhir["command"] == ["sandbox/fhir/node_modules/.bin/node", "sandbox/fhir/server.mjs",
                               "--port", "8103", "--host", "0.0.0.0"]  # noqa: S104


def test_dockerfile_targets() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    stages = dict(re.findall(r"(?mi)^FROM\s+(\S+)\s+AS\s+(\S+)", text))
    assert stages == {"node:22-slim": "fhir-sandbox", "python:3.11-slim": "app"}
    targets = {s["build"]["target"] for s in _compose()["services"].values() if "build" in s}
    assert targets <= set(stages.values())
    # `docker build .` (no target) builds the last stage: it must be the app.
    assert re.findall(r"(?mi)^FROM\s+\S+\s+AS\s+(\S+)", text)[-1] == "app"
    assert "pip install --no-cache-dir -c constraints.txt ." in text
    users = re.findall(r"(?m)^USER\s+(\S+)", text)
    assert len(users) == 2 and not {"root", "0"} & set(users)


# --- Procfile ------------------------------------------------------------------------------------

def test_procfile_commands_equal_compose_commands() -> None:
    processes = _procfile()
    assert tuple(processes) == PROCESS_TYPES
    services = _compose()["services"]
    for name, command in processes.items():
        assert _shell_command(services[name]) == command, name


def test_procfile_web_command() -> None:
    assert _procfile()["web"] == ("exec gunicorn -c python:web.gunicorn_conf --timeout 45 -k gevent"
                                  " --worker-connections 1000"
                                  " -w ${WEB_CONCURRENCY:-2} -b 0.0.0.0:${PORT:-8000} "
                                  "'web.app:create_app()'")


# --- .env.example --------------------------------------------------------------------------------

def test_env_example_sets_every_required_setting() -> None:
    mentioned, active = _env_example()
    required = {name.upper() for name, f in Settings.model_fields.items() if f.is_required()}
    assert required, "Settings has no required field?"
    assert required <= mentioned, sorted(required - mentioned)
    assert "FLOWER_BASIC_AUTH" in active


def test_env_example_names_are_real() -> None:
    """No typos: every variable is a setting or read by a process command."""
    mentioned, _ = _env_example()
    known = {name.upper() for name in Settings.model_fields} | PROCESS_VARIABLES
    assert mentioned <= known, sorted(mentioned - known)


def test_env_example_covers_process_variables() -> None:
    used = set()
    for command in _procfile().values():
        used |= set(re.findall(r"\$\{?([A-Z][A-Z0-9_]*)", command))
    mentioned, _ = _env_example()
    assert used - {"PORT"} <= mentioned, sorted(used - mentioned)


def test_dockerfile_default_command_is_the_procfile_web_command() -> None:
    cmd = re.findall(r"(?m)^CMD\s+(\[.*\])\s*$", DOCKERFILE.read_text())[-1]
    assert json.loads(cmd) == ["sh", "-c", _procfile()["web"]]


HA_DATA_NODES = ("redis-replica-1", "redis-replica-2")
HA_SENTINELS = ("sentinel-1", "sentinel-2", "sentinel-3")


def _flags(command: list[str]) -> dict[str, str]:
    assert command[0] == "redis-server"
    flags: dict[str, str] = {}
    rest = command[1:]
    while rest:
        flag, rest = rest[0], rest[1:]
        values = []
        while rest and not rest[0].startswith("--"):
            values.append(rest.pop(0))
        flags[flag] = " ".join(values)
    return flags


def _sentinel_conf(name: str) -> list[str]:
    """The lines of the config file a Sentinel service writes on its first start."""
    command = _shell_command(_compose()["services"][name])
    written = re.fullmatch(r"test -f /data/sentinel\.conf \|\| printf '%s\\n' (.+) > "
                           r"/data/sentinel\.conf; exec redis-server /data/sentinel\.conf "
                           r"--sentinel", command)
    assert written, command
    return re.findall(r"'([^']*)'", written[1])


def test_ha_profile_is_a_primary_two_replicas_and_three_sentinels() -> None:
    services = _compose()["services"]
    ha = {n for n, s in services.items() if "ha" in s.get("profiles", [])}
    assert ha == {*HA_DATA_NODES, *HA_SENTINELS}
    primary = _flags(services["redis"]["command"])
    for name in HA_DATA_NODES:
        node = services[name]
        flags = _flags(node["command"])
        # Any replica may become the primary: as durable as the first one.
        for flag in ("--appendonly", "--appendfsync", "--maxmemory-policy"):
            assert flags[flag] == primary[flag], (name, flag)
        assert flags["--replicaof"] == "redis 6379"
        assert flags["--replica-announce-ip"] == name
        assert node["depends_on"] == {"redis": {"condition": "service_healthy"}}
        assert any(v.split(":")[1] == "/data" for v in node["volumes"])
        assert "ports" not in node
    assert primary["--replica-announce-ip"] == "redis"
    volumes = set(_compose()["volumes"])
    for name in HA_SENTINELS:
        conf = _sentinel_conf(name)
        assert "port 26379" in conf
        assert "sentinel monitor switchboard redis 6379 2" in conf  # a majority of three
        # resolve-hostnames must come before a monitor line that names a host.
        assert conf.index("sentinel resolve-hostnames yes") < conf.index(
            "sentinel monitor switchboard redis 6379 2")
        assert "sentinel announce-hostnames yes" in conf
        down = next(c for c in conf if c.startswith("sentinel down-after-milliseconds"))
        assert int(down.split()[-1]) >= 1000
        mount = services[name]["volumes"][0]
        assert mount.endswith(":/data") and mount.split(":")[0] in volumes
        assert "ports" not in services[name]
    mounts = [services[n]["volumes"][0] for n in (*HA_DATA_NODES, *HA_SENTINELS)]
    assert len(set(mounts)) == len(mounts)  # each Sentinel rewrites its own file


def test_env_example_points_the_app_at_the_ha_sentinels() -> None:
    lines = dict(re.findall(r"(?m)^#\s*(REDIS_SENTINELS|REDIS_SENTINEL_MASTER|"
                            r"REDIS_MIN_REPLICAS_ACK)=(.*)$",
                            ENV_EXAMPLE.read_text(encoding="utf-8")))
    assert lines["REDIS_SENTINELS"] == ",".join(f"{n}:26379" for n in HA_SENTINELS)
    assert lines["REDIS_SENTINEL_MASTER"] == "switchboard"
    assert int(lines["REDIS_MIN_REPLICAS_ACK"]) <= len(HA_DATA_NODES)
    from tests.unit.test_settings import GOOD
    from worker.settings import load_settings

    settings = load_settings({**GOOD, **lines})
    assert settings.sentinel_addresses() == [(n, 26379) for n in HA_SENTINELS]
