"""The broker path: Celery configuration, the retry rule (retry.py) and retry timing."""
