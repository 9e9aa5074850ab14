"""inference: an SCF-style web function serving a scikit-learn model (iris species).

The model is trained when the image is built (train.py) and loaded once when the
instance starts, so every request only predicts. One instance serves several requests
at once (the function's instance_concurrency): the server runs one thread per
connection, and a fitted model's predict is safe to call from several threads.

Routes:
  GET  /          the model: classes, features, accuracy, when it was trained; and how
                  many requests this instance has served, and at most at once
  POST /predict   {"instances": [[5.1, 3.5, 1.4, 0.2], ...]} (measurements in cm)
                  -> {"predictions": ["setosa", ...], "probabilities": [...], ...}

Bad input gets a 400 whose "error" names the problem (which instance, which feature).
"""

import json
import math
import os
import pickle
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

HOST, PORT = "0.0.0.0", 9000
MODEL_PATH = os.environ.get("MODEL_PATH", "/app/model.pkl")
# Bounds on one request: a caller with more rows sends several requests, which the
# platform spreads over instances instead of one call holding a thread for long.
MAX_INSTANCES = 1000
MAX_BODY_BYTES = 1 << 20


class BadInput(ValueError):
    """The request cannot be predicted on; the message says why (sent as the 400)."""


class Stats:
    """Requests this instance has served, and the most it served at the same moment."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.served = 0
        self.in_flight = 0
        self.peak_in_flight = 0

    def enter(self) -> None:
        with self._lock:
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)

    def leave(self) -> None:
        with self._lock:
            self.in_flight -= 1
            self.served += 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {
                "served": self.served,
                "in_flight": self.in_flight,
                "peak_in_flight": self.peak_in_flight,
            }


# Set once in main(), before the server accepts a connection; read-only afterwards.
BUNDLE: dict[str, Any] = {}
STATS = Stats()


def parse_instances(body: bytes, n_features: int) -> list[list[float]]:
    """The rows of ``{"instances": [[...], ...]}``, each ``n_features`` finite numbers."""
    try:
        doc = json.loads(body)
    except ValueError as e:
        raise BadInput(f"body is not valid JSON: {e}") from None
    if not isinstance(doc, dict) or "instances" not in doc:
        raise BadInput('body must be a JSON object {"instances": [[...], ...]}')
    rows = doc["instances"]
    if not isinstance(rows, list) or not rows:
        raise BadInput("instances must be a non-empty list of rows")
    if len(rows) > MAX_INSTANCES:
        raise BadInput(f"too many instances: {len(rows)}; at most {MAX_INSTANCES} per request")
    for i, row in enumerate(rows):
        if not isinstance(row, list):
            raise BadInput(f"instances[{i}] must be a list of {n_features} numbers")
        if len(row) != n_features:
            raise BadInput(
                f"instances[{i}] has {len(row)} features; expected {n_features} "
                f"({', '.join(BUNDLE['features'])})"
            )
        for j, value in enumerate(row):
            # bool is an int to Python, never a measurement; NaN and infinity (which
            # json.loads accepts) are no measurement either.
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise BadInput(f"instances[{i}][{j}] is not a number: {json.dumps(value)}")
            if not math.isfinite(value):
                raise BadInput(f"instances[{i}][{j}] is not a finite number: {value}")
    return [[float(v) for v in row] for row in rows]


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

    def route(self) -> None:
        STATS.enter()
        try:
            path = urlsplit(self.path).path.rstrip("/") or "/"
            if path == "/" and self.command == "GET":
                self.reply(200, self.model_info())
            elif path == "/predict" and self.command == "POST":
                self.predict()
            elif path == "/predict":
                self.reply(405, {"error": "use POST /predict with a JSON body"}, Allow="POST")
            else:
                self.reply(404, {"error": f"no route {self.command} {path}"})
        finally:
            STATS.leave()

    def model_info(self) -> dict[str, Any]:
        info = {k: v for k, v in BUNDLE.items() if k != "model"}
        return {**info, "max_instances_per_request": MAX_INSTANCES, "requests": STATS.snapshot()}

    def predict(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            # Not read: the connection is closed after this answer instead.
            self.close_connection = True
            self.reply(413, {"error": f"body is {length} bytes; at most {MAX_BODY_BYTES}"})
            return
        body = self.rfile.read(length) if length else b""
        try:
            rows = parse_instances(body, len(BUNDLE["features"]))
        except BadInput as e:
            self.reply(400, {"error": str(e)})
            return
        model = BUNDLE["model"]
        classes: list[str] = BUNDLE["classes"]
        probabilities = model.predict_proba(rows)
        self.reply(
            200,
            {
                "predictions": [classes[int(p.argmax())] for p in probabilities],
                "probabilities": [[round(float(x), 4) for x in p] for p in probabilities],
                "model": BUNDLE["name"],
                "request_id": self.headers.get("X-Scf-Request-Id"),
            },
        )

    def reply(self, status: int, payload: object, **headers: str) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        # One line per request to stdout, which the platform ships as the function's log.
        rid = self.headers.get("X-Scf-Request-Id", "-")
        print(f'inference: {rid} "{self.requestline}" {code}', flush=True)

    def log_message(self, format: str, *args: object) -> None:
        print(f"inference: {format % args}", flush=True)


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # PID 1 must handle SIGTERM itself
    started = time.monotonic()
    # Our own file, written by train.py at build time: unpickling it is safe.
    with open(MODEL_PATH, "rb") as f:
        BUNDLE.update(pickle.load(f))
    loaded_s = time.monotonic() - started
    # One thread per connection: the platform sends up to instance_concurrency requests
    # to this instance at once.
    server = ThreadingHTTPServer((HOST, PORT), Handler)
    server.daemon_threads = True
    print(
        f"inference: model {BUNDLE['name']} (classes {BUNDLE['classes']}, accuracy "
        f"{BUNDLE['accuracy']}) loaded in {loaded_s:.2f} s; listening on {HOST}:{PORT}",
        flush=True,
    )
    server.serve_forever()


if __name__ == "__main__":
    main()
