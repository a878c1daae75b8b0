"""A stand-in S3 endpoint on loopback that ignores conditional writes, as some older S3-compatible servers
do: it answers a bucket listing, and stores every PUT whatever its If-None-Match. The real servers the
tests use (SeaweedFS) honour If-None-Match, so this one case needs a stand-in: pre-flight must refuse it."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse


class _Handler(BaseHTTPRequestHandler):
    objects: dict[str, bytes]
    bucket: str
    protocol_version = "HTTP/1.1"  # answers boto3's `Expect: 100-continue` at once (HTTP/1.0 makes it wait 1 s)

    def log_message(self, *args) -> None:  # quiet
        pass

    def _reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in {"Content-Length": str(len(body)), **(headers or {})}.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _key(self) -> str:
        return urlparse(self.path).path.lstrip("/").partition("/")[2]

    def do_GET(self) -> None:
        if not self._key():  # a listing (ListObjectsV2): empty, but it names its bucket as S3 does
            body = (
                '<?xml version="1.0" encoding="UTF-8"?><ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
                f"<Name>{self.bucket}</Name><Prefix></Prefix><KeyCount>0</KeyCount><MaxKeys>1000</MaxKeys>"
                "<IsTruncated>false</IsTruncated></ListBucketResult>"
            ).encode()
            return self._reply(200, body, {"Content-Type": "application/xml"})
        data = self.objects.get(self._key())
        if data is None:
            return self._reply(404, b"<Error><Code>NoSuchKey</Code></Error>", {"Content-Type": "application/xml"})
        return self._reply(200, data)

    do_HEAD = do_GET

    def do_PUT(self) -> None:  # If-None-Match is ignored: the point of this server
        self.objects[self._key()] = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self._reply(200, headers={"ETag": '"0"'})

    def do_POST(self) -> None:  # DeleteObjects
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.objects.clear()
        body = b'<?xml version="1.0" encoding="UTF-8"?><DeleteResult></DeleteResult>'
        self._reply(200, body, {"Content-Type": "application/xml"})


class NoConditionalWritesServer:
    """`with NoConditionalWritesServer("bucket") as endpoint:` an http://127.0.0.1:PORT endpoint."""

    def __init__(self, bucket: str):
        handler = type("Handler", (_Handler,), {"objects": {}, "bucket": bucket})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
