"""A stand-in of AWS's instance metadata service (IMDSv2) on loopback, for `dcgan-ray spot-watch`: a session
token first, then the instance's documents, and the spot notice once `quiet` polls have gone by."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class StandInMetadata:
    """IMDSv2 on 127.0.0.1: a token first; then the instance's documents, the spot notice after `quiet` polls."""

    def __init__(self, life_cycle: str = "spot", quiet: int = 2, ip: str = "127.0.0.7", lead_s: int = 90):
        self.polls, self.tokens, self.requests = 0, 0, []
        notice_at = (datetime.now(UTC) + timedelta(seconds=lead_s)).strftime("%Y-%m-%dT%H:%M:%SZ")
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def reply(self, status: int, body: str = "") -> None:
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_PUT(self):
                outer.requests.append(("PUT", self.path, self.headers.get("X-aws-ec2-metadata-token-ttl-seconds")))
                outer.tokens += 1
                self.reply(200, "token-1")

            def do_GET(self):
                outer.requests.append(("GET", self.path, self.headers.get("X-aws-ec2-metadata-token")))
                if self.headers.get("X-aws-ec2-metadata-token") != "token-1":
                    return self.reply(401)
                if self.path == "/latest/meta-data/instance-life-cycle":
                    return self.reply(200, life_cycle)
                if self.path == "/latest/meta-data/local-ipv4":
                    return self.reply(200, ip)
                if self.path == "/latest/meta-data/spot/instance-action":
                    outer.polls += 1
                    if outer.polls <= quiet:
                        return self.reply(404)
                    return self.reply(200, json.dumps({"action": "terminate", "time": notice_at}))
                self.reply(404)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
