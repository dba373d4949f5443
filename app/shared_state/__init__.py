"""Shared state in Redis: reaching it, and the one translation of its failures."""
