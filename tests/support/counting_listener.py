"""A TCP listener that accepts, counts and at once closes every connection: the place an SSRF
test points hostile URLs at, to show that none of them was connected to."""

from __future__ import annotations

import select
import socket
import threading
from types import TracebackType


class CountingListener:
    """Listens on `host` (`::` listens on IPv4 and IPv6 both) until the block exits.

    Connections are closed as soon as they are accepted, so a client that got through fails
    fast (TLS or HTTP on a closed socket) instead of waiting out its timeout.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and host == "::":
            self._sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        self._sock.bind((host, port))
        self._sock.listen(64)
        self._sock.setblocking(False)
        self.port: int = self._sock.getsockname()[1]
        self.peers: list[str] = []  # the address each connection was made to
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"counting-{port}", daemon=True)

    @property
    def count(self) -> int:
        with self._lock:
            self._accept_waiting()
            return len(self.peers)

    def _run(self) -> None:
        while not self._stop.is_set():
            readable, _, _ = select.select([self._sock], [], [], 0.05)
            if readable:
                with self._lock:
                    self._accept_waiting()

    def _accept_waiting(self) -> None:
        # Everything the kernel has completed a handshake for, so `count` never misses a
        # connection the accepting thread had not got to yet.
        while True:
            try:
                connection, _ = self._sock.accept()
            except BlockingIOError:
                return
            self.peers.append(str(connection.getsockname()[0]))
            connection.close()

    def __enter__(self) -> CountingListener:
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()
