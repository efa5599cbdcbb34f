"""Which package may import which: the whiteboard rules of the layout, checked on the source.

- `worker/fhir/` is the FHIR client and resource builders: it knows no provider channel and no
  flow (the channel-neutral message types live in worker/messages.py);
- `worker/channels/` are the providers: they know neither the FHIR client nor the stores;
- no two modules import each other (a cycle hides which one is the base).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# package → packages it must not import
FORBIDDEN = {
    "worker.fhir": ("worker.channels", "worker.inbound", "worker.outbound", "worker.stores"),
    "worker.channels": ("worker.fhir", "worker.stores", "worker.inbound", "worker.outbound"),
    "worker.stores": ("worker.channels", "worker.fhir", "worker.inbound", "worker.outbound"),
}


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """Each module of worker/ and web/ → the worker/web modules it imports (anywhere in it)."""
    found: dict[str, set[str]] = {}
    for path in [*ROOT.glob("worker/**/*.py"), *ROOT.glob("web/**/*.py")]:
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
                names.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
        found[_module(path)] = {n for n in names if n.split(".")[0] in ("worker", "web")}
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_a_layer_does_not_reach_into_another(package: str) -> None:
    found = imports()
    bad = sorted(f"{module} imports {name}" for module, names in found.items()
                 if module == package or module.startswith(package + ".")
                 for name in names for banned in FORBIDDEN[package]
                 if name == banned or name.startswith(banned + "."))
    assert not bad, bad


def test_no_two_modules_import_each_other() -> None:
    found = imports()
    modules = set(found)

    def owner(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    edges = {m: {o for n in names if (o := owner(n)) and o != m} for m, names in found.items()}
    pairs = sorted({tuple(sorted((a, b))) for a, targets in edges.items() for b in targets
                    if a in edges.get(b, set()) and not b.endswith(a) and not a.endswith(b)})
    assert not pairs, pairs


def test_the_twilio_statuses_are_the_ones_the_status_rules_map() -> None:
    from worker.channels.twilio import STATUSES
    from worker.outbound.status_map import TWILIO_TO_FHIR

    assert set(TWILIO_TO_FHIR) == STATUSES
