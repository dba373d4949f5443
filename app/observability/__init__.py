"""Metrics, the access log, logging setup, request records and redaction."""
