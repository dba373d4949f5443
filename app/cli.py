"""`image-gateway serve [--host H] [--port P] [--workers N] [--demo]`.

Without --host the gateway binds 0.0.0.0 (every interface), except in demo mode (--demo or
GATEWAY_DEMO=true), which binds 127.0.0.1: the demo serves anyone without a key, so it is
reachable from other machines only when --host says so (the container image passes 0.0.0.0 and
docker-compose.yml publishes it on 127.0.0.1 only).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import signal
import sys
import tempfile
from types import FrameType
from typing import Any

import uvicorn

from app.config.settings import MULTIPROC_VARIABLE, load_settings
from app.config.yaml_source import ConfigError
from app.observability.logs import logging_config
from app.server.protocol import GuardedHttpToolsProtocol
from app.server.workers import run_workers

# Seconds uvicorn waits past the drain limit before cancelling what is left itself.
SHUTDOWN_BACKSTOP = 5
DEFAULT_HOST = "0.0.0.0"
DEMO_HOST = "127.0.0.1"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="image-gateway")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument(
        "--host",
        default=None,
        help=f"address to bind (default {DEFAULT_HOST}; {DEMO_HOST} in demo mode)",
    )
    serve.add_argument("--port", type=int, default=8080, help="port to bind (default 8080)")
    serve.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    serve.add_argument(
        "--demo",
        action="store_true",
        help="serve every model from the built-in demo upstream (no real upstream, no keys)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.demo:
        # Worker processes build their own app from the environment, so the flag travels there.
        os.environ["GATEWAY_DEMO"] = "true"
    if args.workers < 1:
        print("image-gateway: --workers must be at least 1", file=sys.stderr)
        return 2
    try:
        # Fail here, with a readable message, rather than inside every worker.
        settings = load_settings()
    except ConfigError as exc:
        print(f"image-gateway: configuration error:\n{exc}", file=sys.stderr)
        return 2
    host = bind_address(args.host, demo=settings.demo)
    metrics_dir = None
    if args.workers > 1 and settings.metrics_multiprocess_dir is None:
        # prometheus-client's multiprocess mode: every worker writes its values to files in this
        # directory and a scrape of any worker adds them all up. Fresh per run: stale files from
        # an earlier run would be added to this run's totals. Written for the workers, whose
        # settings read it back.
        metrics_dir = tempfile.mkdtemp(prefix="image-gateway-metrics-")
        os.environ[MULTIPROC_VARIABLE] = metrics_dir
    options: dict[str, Any] = dict(
        app="app.main:create_app",
        factory=True,
        host=host,
        port=args.port,
        workers=args.workers,
        loop="uvloop",
        http=GuardedHttpToolsProtocol,
        log_config=logging_config(settings.logging),
        log_level=settings.logging.level,
        access_log=False,  # app/observability/access_log.py writes one richer line per request
        # A backstop only: the app cuts its own in-flight requests off at the drain limit and
        # answers them (app/server/drain.py); uvicorn's cancel would log each as a traceback.
        timeout_graceful_shutdown=math.ceil(settings.shutdown.drain_timeout) + SHUTDOWN_BACKSTOP,
    )
    # After a graceful shutdown uvicorn re-raises the signal that stopped it, to the handler
    # that was in place before it started: this one, so a drained shutdown exits 0.
    previous = signal.signal(signal.SIGTERM, _stopped)
    try:
        if args.workers > 1:
            run_workers(uvicorn.Config(**options))
        else:
            uvicorn.run(**options)
    finally:
        signal.signal(signal.SIGTERM, previous)
        _remove(metrics_dir)
    return 0


def bind_address(requested: str | None, *, demo: bool) -> str:
    """--host if given; else loopback for the demo (it serves anyone), every interface if not."""
    if requested is not None:
        return requested
    return DEMO_HOST if demo else DEFAULT_HOST


def _stopped(sig: int, frame: FrameType | None) -> None:
    """SIGTERM once uvicorn has drained: nothing is left to do but return."""


def _remove(directory: str | None) -> None:
    if directory is not None:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
