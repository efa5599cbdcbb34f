"""docs/configuration.md, generated from `Settings` (each field's docstring, type and default), so
the reference cannot drift from the code: `python -m worker.ops.config_doc > docs/configuration.md`
writes it, and a test fails while the committed page differs."""

from __future__ import annotations

import sys
from typing import Any

from pydantic import SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from worker.settings import Settings

HEAD = """# Configuration

Every environment variable Switchboard reads. One typed settings object (`worker/settings.py`)
reads the environment, validates everything at start-up and lists **every** bad or missing value
with its fix: the worker and the CLI exit with status 2 on a bad configuration, gunicorn refuses to
boot the web app and logs the list, and `switchboard check` shows it with the state of Redis,
FHIR and each provider.

This page is generated from `Settings` (`python -m worker.ops.config_doc > docs/configuration.md`);
a test fails while it is out of date.

| Variable | Default | Meaning |
|---|---|---|
"""

TAIL = """
`FLOWER_BASIC_AUTH` (`user:password`) is required by the Flower process and read by Flower
itself. `PROMETHEUS_MULTIPROC_DIR` is read by prometheus_client (docs/operations-metrics.md).
Changing an identifier system (`*_SYSTEM`) after go-live orphans the idempotency keys already
written.
"""


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "*required*"
    value: Any = field.default
    if value is PydanticUndefined or value is None:
        return "empty"
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"`{value}`" if value != "" else "empty"


def render() -> str:
    """The page, one row per setting in the order Settings declares them."""
    rows = []
    for name, field in Settings.model_fields.items():
        meaning = " ".join((field.description or "").split()).replace("|", "\\|")
        rows.append(f"| `{name.upper()}` | {_default(field)} | {meaning} |")
    return HEAD + "\n".join(rows) + "\n" + TAIL


if __name__ == "__main__":
    sys.stdout.write(render())
