"""Debian packages the tests need (redis-server, nginx, tinyproxy, Prometheus, Compose), found on
the PATH or installed with apt-get when running as root, one installer at a time.

The suite runs in several pytest-xdist workers: two of them asking for the same missing program
must not run apt-get side by side (the second would fail on dpkg's lock), so installs take a file
lock, and whoever gets it second finds the program already there.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

_LOCK = Path(tempfile.gettempdir()) / "image-gateway-tests-apt.lock"


def ensure_program(find: Callable[[], str | None], package: str, *, recommends: bool = True) -> str:
    """The path `find` returns, after installing Debian's `package` if it returned nothing.
    Raises RuntimeError naming the package when the program cannot be had."""
    found = find()
    if found:
        return found
    said = ""
    if shutil.which("apt-get") and os.geteuid() == 0:
        with _LOCK.open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            found = find()
            if found:
                return found
            env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
            extra = [] if recommends else ["--no-install-recommends"]
            subprocess.run(
                ["apt-get", "update", "-qq"], check=False, env=env, capture_output=True, timeout=300
            )
            install = subprocess.run(
                ["apt-get", "install", "-y", "-qq", *extra, package],
                check=False,
                env=env,
                capture_output=True,
                text=True,
                timeout=600,
            )
            found = find()
            if found:
                return found
            said = "\n" + install.stderr[-2000:]
    raise RuntimeError(
        f"{package} is not installed and could not be (apt-get install {package}){said}"
    )


def on_path(name: str) -> Callable[[], str | None]:
    return lambda: shutil.which(name)
