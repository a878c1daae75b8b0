"""A loopback TCP proxy in front of the test's S3 server that the test can cut and heal, as a partition would.

While cut, nothing is forwarded either way: connections open or opened then hang, and what their clients
send waits unread. A client gives up on such a connection when its timeout passes. On `heal`, every
connection that lived through the cut is closed without forwarding what it held (the partition dropped it,
and its client has given up or will), and new connections pass as before.
"""

from __future__ import annotations

import select
import socket
import threading


class CutProxy:
    """Listens on 127.0.0.1 (an ephemeral port) and forwards to 127.0.0.1:`upstream_port`."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._lock = threading.Lock()
        self._cut = threading.Event()
        self._healed = threading.Event()
        self._healed.set()
        self._doomed: set[int] = set()  # connections that lived through a cut
        self._live: set[int] = set()
        self._next = 0
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cut(self) -> None:
        with self._lock:
            self._healed.clear()
            self._cut.set()
            self._doomed |= self._live

    def heal(self) -> None:
        with self._lock:
            self._cut.clear()
            self._healed.set()

    def close(self) -> None:
        self._closed = True
        self.heal()
        self._server.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            with self._lock:
                self._next += 1
                number = self._next
                self._live.add(number)
                if self._cut.is_set():
                    self._doomed.add(number)
            threading.Thread(target=self._pump, args=(number, client), daemon=True).start()

    def _pump(self, number: int, client: socket.socket) -> None:
        upstream: socket.socket | None = None
        try:
            while True:
                if self._cut.is_set():
                    self._healed.wait(0.05)
                    continue
                if number in self._doomed:
                    return  # lived through a cut: dropped, nothing it held goes on
                if upstream is None:
                    upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
                readable, _, _ = select.select([client, upstream], [], [], 0.05)
                if self._cut.is_set():
                    continue  # (arrived as the cut began: held, and dropped at the heal)
                for source in readable:
                    data = source.recv(65536)
                    if not data:
                        return
                    (upstream if source is client else client).sendall(data)
        except OSError:
            return
        finally:
            with self._lock:
                self._live.discard(number)
            for s in (client, upstream):
                if s is not None:
                    s.close()
