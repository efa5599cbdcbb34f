"""The FHIR sandbox's own self-test (sandbox/fhir/selftest.mjs): what the sandbox promises
about Medplum's behaviour (auth, conditional writes, validation, transactions, contention,
identifier searches) is checked on every `make test`, not only when someone remembers."""

from __future__ import annotations

import subprocess

from worker.ops import devstack


def test_fhir_sandbox_selftest_passes() -> None:
    done = subprocess.run([str(devstack.node_binary()), "selftest.mjs"],
                          cwd=devstack.FHIR_SANDBOX_DIR, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "selftest OK" in done.stdout
