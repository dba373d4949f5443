"""`--workers N`: uvicorn's process supervisor, with the shared listening socket shut the moment a
stop signal reaches the parent.

The parent binds the socket and hands it to every worker, and keeps its own copy open until the
last worker has exited. A worker that stops accepting closes only its copy, so while any worker
finishes its in-flight work the kernel kept completing handshakes for a socket nobody accepted
from any more: new clients were connected and never answered. Shutting the socket down (not
closing one descriptor of it) stops it listening in every process at once, so new connections
are refused while the workers drain.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from types import FrameType

import uvicorn
from uvicorn.supervisors import Multiprocess

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def run_workers(config: uvicorn.Config) -> None:
    listener = config.bind_socket()
    supervisor = Multiprocess(config, sockets=[listener])
    # After the supervisor: it installs its own handlers, which this one hands the signal on to.
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}

    def on_stop(sig: int, frame: FrameType | None) -> None:
        stop_listening(listener)
        if sig == signal.SIGTERM:
            # The supervisor forwards it on its next half-second tick; the workers start
            # draining (and answering 503 on connections already open) now instead. A terminal's
            # Ctrl+C already reached every worker of the process group: not sent twice, since a
            # second SIGINT makes uvicorn quit without draining.
            for process in supervisor.processes:
                if process.pid is not None:
                    os.kill(process.pid, sig)
        handler = previous[signal.Signals(sig)]
        if callable(handler):
            handler(sig, frame)

    for sig in STOP_SIGNALS:
        signal.signal(sig, on_stop)
    try:
        supervisor.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        listener.close()


def stop_listening(listener: socket.socket) -> None:
    """Stop the socket listening in every process holding it; pending handshakes are reset."""
    with contextlib.suppress(OSError):  # already shut down (a second signal)
        listener.shutdown(socket.SHUT_RDWR)
