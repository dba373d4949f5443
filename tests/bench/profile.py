"""Profile the gateway under load: `python -m tests.bench.profile [--connections N] [--body B]`.

Starts the same fake upstream and gateway as the benchmark, drives load, and samples the gateway
with py-spy (`pip install py-spy` into the venv; it is not a project dependency). Prints the
functions that hold the most samples (own time and total) and writes a speedscope file to
tests/bench/results/.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from tests.bench.run import RESULTS, Bench


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.profile")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--body", default="1x1MB", choices=["1x12KB", "1x1MB", "4x5MB", "4x10MB"])
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--gateway", default="fast", choices=["fast", "cache"])
    parser.add_argument("--top", type=int, default=40)
    args = parser.parse_args()
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        print("py-spy is not installed: .venv/bin/pip install py-spy", file=sys.stderr)
        return 2
    bench_args = argparse.Namespace(
        python_load=False, asyncio_upstream=False, repeat=1, duration=args.seconds
    )
    workdir = Path(tempfile.mkdtemp(prefix="gw-profile-"))
    bench = Bench(bench_args, workdir)
    RESULTS.mkdir(exist_ok=True)
    raw = RESULTS / "profile.txt"
    try:
        body = bench.body(args.body)
        gateway = bench.gateway(args.gateway)
        bench.load(gateway.url, body, args.connections, 1.0)
        load = threading.Thread(
            target=bench.load, args=(gateway.url, body, args.connections, args.seconds + 2)
        )
        load.start()
        subprocess.run(
            [
                py_spy,
                "record",
                "--pid",
                str(gateway.pid),
                "--duration",
                str(int(args.seconds)),
                "--rate",
                "250",
                *(["--native"] if os.environ.get("PYSPY_NATIVE") else []),
                "--format",
                "raw",
                "--output",
                str(raw),
            ]
            + ([] if os.environ.get("PYSPY_NATIVE") else ["--nonblocking"]),
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        load.join()
    finally:
        bench.close()
        shutil.rmtree(workdir, ignore_errors=True)
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        count = int(count_text)
        frames = stack.split(";")
        samples += count
        own[frames[-1]] += count
        for frame in set(frames):
            total[frame] += count
    print(f"{samples} samples; own time:")
    for frame, count in own.most_common(args.top):
        print(f"  {100 * count / samples:5.1f}%  {frame}")
    print("total time (inclusive):")
    for frame, count in total.most_common(args.top):
        print(f"  {100 * count / samples:5.1f}%  {frame}")
    print(f"raw stacks: {raw}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
