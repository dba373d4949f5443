"""`image-gateway serve [--host H] [--port P] [--workers N] [--demo]`."""

from __future__ import annotations

import argparse
import os
import sys

import uvicorn

from app.config import load_settings
from app.config_file import ConfigError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="image-gateway")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument("--host", default="0.0.0.0", help="address to bind (default 0.0.0.0)")
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
    try:
        load_settings()  # fail here, with a readable message, rather than inside every worker
    except ConfigError as exc:
        print(f"image-gateway: configuration error:\n{exc}", file=sys.stderr)
        return 2
    uvicorn.run(
        "app.main:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        loop="uvloop",
        http="httptools",
        log_level="info",
        timeout_graceful_shutdown=60,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
