"""Fault-injection suite: scenarios with counted results (make reliability)."""
