"""`make bench`: run the benchmarks on loopback and write bench/results.md.

python -m tests.bench [--quick]   (stops by itself; figures are reported, never asserted)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from tests.bench import contention, inbound, outbound, receiver, recovery

SECTIONS = {"receiver": receiver, "recovery": recovery, "contention": contention,
            "inbound": inbound, "outbound": outbound}
RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results.md"


def main(argv: list[str] | None = None) -> int:
    """Run every section, print it and write it to bench/results.md."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes")
    parser.add_argument("--only", choices=sorted(SECTIONS), action="append",
                        help="run only this section (repeatable); results.md is not written")
    args = parser.parse_args(argv)
    log_dir = Path(tempfile.mkdtemp(prefix="switchboard-bench-"))
    started = time.monotonic()
    lines = [f"# Benchmarks ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC, "
             f"{'quick' if args.quick else 'full'} run)", ""]
    for name, section in SECTIONS.items():
        if not args.only or name in args.only:
            lines += [*section.run(log_dir, quick=args.quick), ""]
    lines += ["", f"Total {time.monotonic() - started:.0f} s; logs in {log_dir}."]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.only:
        RESULTS.parent.mkdir(exist_ok=True)
        RESULTS.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
