"""docs/configuration.md is the page generated from Settings, and every setting explains itself."""

from __future__ import annotations

from pathlib import Path

from worker.ops import config_doc
from worker.settings import Settings

PAGE = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_every_setting_says_what_it_means() -> None:
    undocumented = [name.upper() for name, field in Settings.model_fields.items()
                    if not (field.description or "").strip()]
    assert not undocumented, f"add a docstring under each of these fields: {undocumented}"


def test_the_configuration_page_is_current() -> None:
    assert PAGE.read_text() == config_doc.render(), (
        "docs/configuration.md is out of date: python -m worker.ops.config_doc > "
        "docs/configuration.md")


def test_each_row_names_its_variable_and_default() -> None:
    page = config_doc.render()
    assert "| `REDIS_URL` | *required* |" in page
    assert "| `SMS_RATE_PER_SECOND` | `1` |" in page
    assert "| `PHONE_DEFAULT_REGION` | `US` |" in page
    assert "| `EMAIL_REQUIRE_SENDER_AUTH` | `true` |" in page
    assert "| `API_TOKENS` | empty |" in page
