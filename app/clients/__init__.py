"""Clients: who is calling (named keys), what they may do (models, limits, quotas), and what they
used (usage accounting). Shared state lives in Redis so every replica sees the same picture."""
