"""A loopback proxy in front of the test's S3 server that records every request it passes on: method, bucket,
key, query, the copy source, and the keys of a multi-object delete. tests/test_s3_policy.py checks each one
against cluster/iam/s3-policy.json.

Bytes pass through unchanged (SigV4 signs the Host header, which the proxy leaves as the client sent it);
requests are cut apart by their Content-Length or chunked framing, as HTTP/1.1 keep-alive connections
carry one after another.
"""

from __future__ import annotations

import re
import socket
import threading
from dataclasses import dataclass, field
from urllib.parse import parse_qs, unquote, urlsplit


@dataclass
class Request:
    method: str
    bucket: str
    key: str
    query: dict[str, list[str]]
    copy_source: str | None
    deleted_keys: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        query = "&".join(sorted(self.query))
        return f"{self.method} {self.bucket}/{self.key}{'?' + query if query else ''}"


class S3Proxy:
    """Listens on 127.0.0.1 (an ephemeral port) and forwards to `upstream_port` on 127.0.0.1."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._closed = True
        self._server.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            threading.Thread(target=self._requests, args=(client, upstream), daemon=True).start()
            threading.Thread(target=_copy, args=(upstream, client), daemon=True).start()

    def _record(self, head: str, body: bytes) -> None:
        lines = head.split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        url = urlsplit(target)
        bucket, _, key = unquote(url.path).lstrip("/").partition("/")
        query = parse_qs(url.query, keep_blank_values=True)
        deleted = [unquote(k) for k in re.findall(r"<Key>([^<]*)</Key>", body.decode(errors="replace"))]
        request = Request(method, bucket, key, query, headers.get("x-amz-copy-source"), deleted)
        with self._lock:
            self.requests.append(request)

    def _requests(self, client: socket.socket, upstream: socket.socket) -> None:
        buffer = b""
        try:
            while True:
                while b"\r\n\r\n" not in buffer:
                    data = client.recv(65536)
                    if not data:
                        return
                    upstream.sendall(data)
                    buffer += data
                head_bytes, buffer = buffer.split(b"\r\n\r\n", 1)
                head = head_bytes.decode("latin-1")
                headers = head.lower()
                body = b""
                if "transfer-encoding: chunked" in headers:
                    while True:  # chunks until the empty one (no trailers)
                        while b"\r\n" not in buffer:
                            buffer += _forward(client, upstream)
                        size = int(buffer.split(b"\r\n", 1)[0].split(b";")[0], 16)
                        end = buffer.index(b"\r\n") + 2 + size + 2
                        while len(buffer) < end:
                            buffer += _forward(client, upstream)
                        body += buffer[buffer.index(b"\r\n") + 2 : end - 2]
                        buffer = buffer[end:]
                        if size == 0:
                            break
                else:
                    length = int(m[1]) if (m := re.search(r"\ncontent-length:\s*(\d+)", headers)) else 0
                    while len(buffer) < length:
                        buffer += _forward(client, upstream)
                    body, buffer = buffer[:length], buffer[length:]
                self._record(head, body if len(body) < 1 << 16 else b"")
        except (OSError, ValueError):
            return
        finally:
            _close(client, upstream)


def _forward(client: socket.socket, upstream: socket.socket) -> bytes:
    data = client.recv(65536)
    if not data:
        raise ValueError("connection closed mid-request")
    upstream.sendall(data)
    return data


def _copy(source: socket.socket, target: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            target.sendall(data)
    except OSError:
        pass
    finally:
        _close(source, target)


def _close(*sockets: socket.socket) -> None:
    for s in sockets:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
