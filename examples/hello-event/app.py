"""hello-event: an SCF-style event function written with the Python standard library only.

The platform starts this image and sends every event as
``POST /event-invoke`` with the event JSON as body and ``X-Scf-*`` headers.
The image's own HTTP server must listen on 0.0.0.0:9000.
"""

import json
import signal
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOST, PORT = "0.0.0.0", 9000  # 0.0.0.0, not 127.0.0.1: the platform connects from outside


class Handler(BaseHTTPRequestHandler):
    # Keep-alive lets the platform reuse one connection for every event.
    protocol_version = "HTTP/1.1"
    # With keep-alive, http.server writes headers and body separately; Nagle's algorithm
    # plus delayed ACKs then stall every response by about 40 ms. Send segments at once
    # and buffer the writes (handle_one_request() flushes once per response).
    disable_nagle_algorithm = True
    wbufsize = -1

    def do_POST(self) -> None:
        if self.path != "/event-invoke":
            self.reply(404, {"error": f"no route {self.path}"})
            return
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            event = json.loads(raw) if raw else {}
        except ValueError:
            self.reply(400, {"error": "event is not JSON"})
            return
        name = event.get("name", "world") if isinstance(event, dict) else "world"
        request_id = self.headers.get("X-Scf-Request-Id")
        # Whatever the function prints is collected by the platform as its log.
        print(f"hello-event: request {request_id} says hello to {name}", flush=True)
        self.reply(
            200,
            {
                "message": f"hello, {name}",
                "request_id": request_id,
                "function": self.headers.get("X-Scf-Name"),
                "event": event,
            },
        )

    def reply(self, status: int, payload: object) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # one line per request is printed above; skip http.server's access log


def main() -> None:
    # The server runs as PID 1 in its container, where SIGTERM is ignored unless handled.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    # Threads cost nothing here and keep a second connection (a health check, a retry)
    # from waiting behind an idle keep-alive one; the platform sends one event at a time.
    server = ThreadingHTTPServer((HOST, PORT), Handler)
    server.daemon_threads = True
    print(f"hello-event listening on {HOST}:{PORT}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
