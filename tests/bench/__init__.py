"""`make bench`: bounded benchmarks on loopback that print figures and ratios (never asserted)."""
