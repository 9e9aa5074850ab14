"""chatty: writes lines to stdout on request, for bench/logship.py.

Event ``{"lines": N, "size": B, "rate": R, "tag": T}``: write N lines of about B bytes,
at R lines per second (0: as fast as it can), each ``<T> seq=<i> t=<unix time> x...``,
where t is the time the line was handed to the kernel, so the benchmark can measure
write-to-Kafka delay from the line itself. Lines go out in blocks of up to 500 per
write(2) call, which is how a busy logger behaves; the answer comes after the last write.
"""

import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

BLOCK = 500


def emit(n: int, size: int, rate: float, tag: str) -> None:
    out = sys.stdout.buffer
    fd = out.fileno()
    start = time.time()
    i = 0
    while i < n:
        count = min(BLOCK, n - i)
        if rate > 0:
            # Lines due by now, in one block (at least one, at most BLOCK).
            due = int((time.time() - start) * rate) - i
            if due <= 0:
                time.sleep(min(0.005, 1 / rate))
                continue
            count = min(count, due)
        now = f"{time.time():.6f}"
        block = []
        for k in range(i, i + count):
            head = f"{tag} seq={k} t={now} "
            block.append(head + "x" * max(0, size - len(head)) + "\n")
        data = "".join(block).encode()
        while data:
            written = os.write(fd, data)
            data = data[written:]
        i += count


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    wbufsize = -1

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        event = json.loads(self.rfile.read(length) or b"{}")
        started = time.time()
        emit(
            int(event.get("lines", 0)),
            int(event.get("size", 100)),
            float(event.get("rate", 0)),
            str(event.get("tag", "chatty")),
        )
        body = json.dumps({"lines": event.get("lines", 0), "emit_s": time.time() - started})
        data = body.encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        pass  # only the lines asked for reach the log


if __name__ == "__main__":
    ThreadingHTTPServer(("0.0.0.0", 9000), Handler).serve_forever()
