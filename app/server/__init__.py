"""ASGI edge middleware and process setup: auth, admission, drain, request ids, heap."""
