"""web-app: an SCF-style web function, a tiny in-memory notes API (standard library only).

A web function receives the caller's own HTTP request (method, path, query, headers,
body) on 0.0.0.0:9000, plus ``X-Scf-*`` headers added by the platform.

Routes:
  GET    /              greeting page
  GET    /items         list the items
  POST   /items         create an item from a JSON object, answers 201
  GET    /items/<id>    one item, 404 when unknown
  DELETE /items/<id>    delete one item, 204
  ANY    /echo          the request as JSON: method, path, query, headers, body
"""

import itertools
import json
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

HOST, PORT = "0.0.0.0", 9000

# Items live in this process only: every instance of the function has its own list,
# and it is gone when the platform reclaims the instance.
ITEMS: dict[int, dict[str, object]] = {}
ITEMS_LOCK = threading.Lock()
NEXT_ID = itertools.count(1)

GREETING = b"""<!doctype html>
<html><head><title>imagefn web-app</title></head>
<body><h1>Hello from an imagefn web function</h1>
<p>Try <code>GET items</code>, <code>POST items</code> or <code>GET echo?x=1</code>.</p>
</body></html>
"""


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Avoid the 40 ms Nagle/delayed-ACK stall of keep-alive responses written in pieces:
    # send segments at once and buffer the writes (flushed once per response).
    disable_nagle_algorithm = True
    wbufsize = -1

    def do_GET(self) -> None:
        self.route()

    def do_POST(self) -> None:
        self.route()

    def do_PUT(self) -> None:
        self.route()

    def do_PATCH(self) -> None:
        self.route()

    def do_DELETE(self) -> None:
        self.route()

    def route(self) -> None:
        url = urlsplit(self.path)
        body = self.read_body()
        parts = [p for p in url.path.split("/") if p]
        if parts == ["echo"]:
            self.reply(
                200,
                {
                    "method": self.command,
                    "path": url.path,
                    "query": parse_qs(url.query),
                    "headers": dict(self.headers.items()),
                    "body": body.decode(errors="replace"),
                },
            )
        elif not parts and self.command == "GET":
            self.send(200, GREETING, "text/html; charset=utf-8")
        elif parts == ["items"] and self.command == "GET":
            with ITEMS_LOCK:
                items = list(ITEMS.values())
            self.reply(200, {"items": items})
        elif parts == ["items"] and self.command == "POST":
            self.create_item(body)
        elif len(parts) == 2 and parts[0] == "items" and self.command in ("GET", "DELETE"):
            self.one_item(parts[1])
        else:
            self.reply(404, {"error": "not found", "method": self.command, "path": url.path})

    def create_item(self, body: bytes) -> None:
        try:
            fields = json.loads(body)
        except ValueError:
            self.reply(400, {"error": "body must be a JSON object"})
            return
        if not isinstance(fields, dict):
            self.reply(400, {"error": "body must be a JSON object"})
            return
        with ITEMS_LOCK:
            item_id = next(NEXT_ID)
            item = {**fields, "id": item_id}
            ITEMS[item_id] = item
        print(f"web-app: created item {item_id}", flush=True)
        self.reply(201, item)

    def one_item(self, raw_id: str) -> None:
        item_id = int(raw_id) if raw_id.isdigit() else -1
        with ITEMS_LOCK:
            item = ITEMS.get(item_id)
            if item is not None and self.command == "DELETE":
                del ITEMS[item_id]
        if item is None:
            self.reply(404, {"error": f"no item {raw_id}"})
        elif self.command == "DELETE":
            self.send(204, b"", "text/plain")
        else:
            self.reply(200, item)

    def read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def reply(self, status: int, payload: object) -> None:
        self.send(status, json.dumps(payload).encode(), "application/json")

    def send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        if status != 204:  # a 204 carries neither body nor Content-Length
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        # Access log to stdout, which the platform collects as the function's log.
        print(f"web-app: {self.address_string()} {format % args}", flush=True)


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # PID 1 must handle SIGTERM itself
    # SCF web functions may receive several requests at once (imagefn sends one at a time
    # per instance for now): one thread per connection keeps the app ready for both.
    server = ThreadingHTTPServer((HOST, PORT), Handler)
    server.daemon_threads = True
    print(f"web-app listening on {HOST}:{PORT}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
