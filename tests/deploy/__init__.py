"""Deployment and documentation checks: compose, Docker, dashboards, the docs."""
