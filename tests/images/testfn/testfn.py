"""testfn: one SCF-style image that can provoke every failure mode of the image contract.

Command-line arguments choose how the process starts (the platform passes them as Args):

  serve (default)        event/web server on 0.0.0.0:9000, one request at a time
  serve-threaded         the same, one thread per connection (concurrent web requests)
  never-listen           print "starting" and never listen             -> PortBindingFailed
  listen-localhost       listen on 127.0.0.1:9000 (a classic user mistake)
  listen-8080            listen on 0.0.0.0:8080 instead of 9000
  exit-at-start [CODE]   print "boom" to stderr and exit with CODE (default 1)
  slow-start S           sleep S seconds, then serve                   -> InitContainerTimeout

``POST /event-invoke`` takes a JSON event whose fields choose the behaviour, applied in
this order (fields combine):

  {"print": ["line", ...]}   print the lines to stdout
  {"stderr": "text"}         write the text to stderr
  {"output": [STEP, ...]}    write output by steps (below), in order
  {"alloc_mb": N}            allocate and touch N MiB until answering    -> OutOfMemory
  {"sleep": S}               sleep S seconds                             -> FunctionTimeout
  {"exit": CODE}             print a line and os._exit(CODE) mid-request -> UserProcessExited
  {"close": true}            close the connection without answering, stay alive
  {"headers": {"K": "V"}}    add response headers
  {"size": N}                answer N bytes of "x"                       -> ResultTooLarge
  {"status": N}              answer with status N instead of 200
  {"body": B}                answer B instead of the description (str as text, else JSON)
  {"connect": [{"host": H, "port": P, "timeout_s": S}, ...]}
                             try a TCP connection to each (at once, default timeout 2 s);
                             the answer gets "connect": [{"host", "port", "ok", "error",
                             "seconds"}, ...] in order (error: "timeout", "refused", ...)
  {"write_tmp_mb": N}        write N MiB to a file in /tmp (removed afterwards); the
                             answer gets "write_tmp": {"written_mb", "error"}

and after the response has been sent:

  {"output_after": [STEP, ...]}

An output STEP is one of:

  {"lines": N, "prefix": "P", "stream": "stdout"|"stderr", "over_s": S}
        N numbered lines "P0" ... "P<N-1>" (prefix default "line "), written in
        chunks, spread evenly over S seconds (default: at once)
  {"sleep": S}               pause S seconds
  {"raw_b64": "..."}         these bytes, decoded from base64, exactly (binary output)
  {"long_line": N}           one line of N bytes ("0123456789" repeated)

By default the answer is a JSON description of the process and request (pid, hostname,
request id, headers, event, TEST_* environment, whether /tmp and / are writable).

The environment variable TESTFN_FAIL_STATUS=N answers every event with status N (unless
the event names its own), a bug that a redeploy without it fixes.

The environment variable TESTFN_TICK_S=S starts a background thread that prints
"tick N" (N = 0, 1, ...) to stdout every S seconds for the life of the process: an app's
own background work (heartbeats, keep-alives), which stops while the instance is frozen.

The environment variable TESTFN_QUIET (any value) turns off the access log line the
server writes to stderr for each request.

Any other method or path is a web echo: JSON with method, path, query, headers, body.
Query parameters print, stderr, alloc_mb, sleep, exit, close, size, status and body act
as above; ?header=Name:Value (repeatable) adds a response header.
"""

import base64
import contextlib
import errno
import json
import os
import resource
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, HTTPServer, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

STATS_LOCK = threading.Lock()
STATS = {"count": 0, "inflight": 0}


def writable(directory: str) -> bool:
    path = os.path.join(directory, f"testfn-probe-{os.getpid()}-{threading.get_ident()}")
    try:
        with open(path, "w") as f:
            f.write("x")
        os.unlink(path)
    except OSError:
        return False
    return True


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Keep-alive responses written as headers then body stall ~40 ms on Nagle + delayed
    # ACK: send segments at once and buffer the writes (flushed once per response).
    disable_nagle_algorithm = True
    wbufsize = -1

    def do_POST(self) -> None:
        if self.path == "/event-invoke":
            self.invoke_event()
        else:
            self.web_echo()

    def do_GET(self) -> None:
        self.web_echo()

    do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_HEAD = do_GET

    def invoke_event(self) -> None:
        body = self.read_body()
        try:
            event = json.loads(body) if body else {}
        except ValueError:
            self.reply(400, {"error": "event is not JSON", "body": body.decode(errors="replace")})
            return
        spec = event if isinstance(event, dict) else {}
        self.run(spec, lambda: self.describe(event=event))

    def web_echo(self) -> None:
        url = urlsplit(self.path)
        query = parse_qs(url.query, keep_blank_values=True)
        body = self.read_body()
        try:
            spec = self.spec_from_query(query)
        except ValueError as e:
            self.reply(400, {"error": f"bad query parameter: {e}"})
            return
        self.run(
            spec,
            lambda: {
                "method": self.command,
                "path": url.path,
                "query": query,
                "headers": dict(self.headers.items()),
                "body": body.decode(errors="replace"),
                "pid": os.getpid(),
                "request_id": self.headers.get("X-Scf-Request-Id"),
            },
        )

    @staticmethod
    def spec_from_query(query: dict[str, list[str]]) -> dict[str, Any]:
        types: dict[str, Any] = {
            "sleep": float,
            "exit": int,
            "size": int,
            "status": int,
            "alloc_mb": int,
            "stderr": str,
            "body": str,
            "close": lambda v: v not in ("", "0", "false"),
        }
        spec: dict[str, Any] = {k: types[k](v[-1]) for k, v in query.items() if k in types}
        if "print" in query:
            spec["print"] = query["print"]
        if "header" in query:  # ?header=Name:Value, repeatable
            spec["headers"] = dict(h.split(":", 1) for h in query["header"])
        return spec

    def run(self, spec: dict[str, Any], describe: Callable[[], object]) -> None:
        with STATS_LOCK:
            STATS["count"] += 1
            STATS["inflight"] += 1
        try:
            self.behave(spec, describe)
        finally:
            with STATS_LOCK:
                STATS["inflight"] -= 1
        if spec.get("output_after"):
            self.wfile.flush()  # the response is out: what follows comes after it
            write_output(spec["output_after"])

    def behave(self, spec: dict[str, Any], describe: Callable[[], object]) -> None:
        for line in spec.get("print") or []:
            print(line, flush=True)
        if "stderr" in spec:
            print(spec["stderr"], file=sys.stderr, flush=True)
        if spec.get("output"):
            write_output(spec["output"])
        ballast = b"\x01" * (int(spec.get("alloc_mb", 0)) << 20)  # filled, so really resident
        if spec.get("sleep"):
            time.sleep(float(spec["sleep"]))
        if "exit" in spec:
            print(f"testfn: exiting with code {spec['exit']} mid-request", flush=True)
            os._exit(int(spec["exit"]))
        if spec.get("close"):
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        del ballast
        probes: dict[str, Any] = {}
        if spec.get("connect"):
            probes["connect"] = connect_all(spec["connect"])
        if "write_tmp_mb" in spec:
            probes["write_tmp"] = write_tmp(int(spec["write_tmp_mb"]))
        headers = spec.get("headers") or {}
        if "size" in spec:
            self.send(200, b"x" * int(spec["size"]), "text/plain", headers)
            return
        # TESTFN_FAIL_STATUS: a deployed bug (every event fails) that a redeploy fixes.
        status = int(spec.get("status", os.environ.get("TESTFN_FAIL_STATUS", 200)))
        body = spec["body"] if "body" in spec else describe()
        if probes and isinstance(body, dict):
            body.update(probes)
        if isinstance(body, str):
            self.send(status, body.encode(), "text/plain", headers)
        else:
            self.send(status, json.dumps(body).encode(), "application/json", headers)

    def describe(self, event: object) -> dict[str, Any]:
        with STATS_LOCK:
            stats = dict(STATS)
        return {
            "ok": True,
            "pid": os.getpid(),
            "hostname": socket.gethostname(),
            "request_id": self.headers.get("X-Scf-Request-Id"),
            "headers": dict(self.headers.items()),
            "event": event,
            "env": {k: v for k, v in os.environ.items() if k.startswith("TEST_")},
            "argv": sys.argv[1:],
            "count": stats["count"],  # requests this process has handled, this one included
            "inflight": stats["inflight"],  # requests in progress now, this one included
            "uid": os.getuid(),
            "nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
            "tmp_writable": writable("/tmp"),
            "root_writable": writable("/"),
        }

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
        self.send(status, json.dumps(payload).encode(), "application/json", {})

    def send(self, status: int, body: bytes, content_type: str, headers: dict[str, str]) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name, str(value))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        if not os.environ.get("TESTFN_QUIET"):  # set: no access log line per request
            print(f"testfn: {format % args}", file=sys.stderr, flush=True)


def connect_one(target: dict[str, Any]) -> dict[str, Any]:
    host, port = str(target["host"]), int(target["port"])
    started = time.monotonic()
    result: dict[str, Any] = {"host": host, "port": port, "ok": False, "error": None}
    try:
        socket.create_connection((host, port), float(target.get("timeout_s", 2.0))).close()
        result["ok"] = True
    except TimeoutError:
        result["error"] = "timeout"
    except ConnectionRefusedError:
        result["error"] = "refused"
    except OSError as e:
        result["error"] = errno.errorcode.get(e.errno or 0, str(e))
    result["seconds"] = round(time.monotonic() - started, 3)
    return result


def connect_all(targets: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """All at once: a dropped connection waits its whole timeout."""
    with ThreadPoolExecutor(max_workers=max(1, min(32, len(targets)))) as pool:
        return list(pool.map(connect_one, targets))


def write_tmp(mb: int) -> dict[str, Any]:
    path = f"/tmp/testfn-fill-{os.getpid()}-{threading.get_ident()}"
    chunk = b"\x02" * (1 << 20)
    written, error = 0, None
    try:
        with open(path, "wb") as f:
            for _ in range(mb):
                f.write(chunk)
                f.flush()
                written += 1
    except OSError as e:
        error = errno.errorcode.get(e.errno or 0, str(e))
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
    return {"written_mb": written, "error": error}


def write_output(steps: list[dict[str, Any]]) -> None:
    """Output by steps (see the module docstring), written straight to the file
    descriptors: large writes, no Python buffering in between."""
    for step in steps:
        if "sleep" in step:
            time.sleep(float(step["sleep"]))
        elif "raw_b64" in step:
            os.write(1, base64.b64decode(step["raw_b64"]))
        elif "long_line" in step:
            n = int(step["long_line"])
            os.write(1, (b"0123456789" * (n // 10 + 1))[:n] + b"\n")
        elif "lines" in step:
            n, prefix = int(step["lines"]), str(step.get("prefix", "line "))
            fd = 2 if step.get("stream") == "stderr" else 1
            over_s = float(step.get("over_s", 0))
            chunk = 200
            started = time.monotonic()
            for i in range(0, n, chunk):
                if over_s:
                    ahead = started + over_s * i / n - time.monotonic()
                    if ahead > 0:
                        time.sleep(ahead)
                data = "".join(f"{prefix}{j}\n" for j in range(i, min(i + chunk, n)))
                view = memoryview(data.encode())
                while view:
                    view = view[os.write(fd, view) :]


def serve(host: str, port: int, server_class: type[HTTPServer] = HTTPServer) -> None:
    server = server_class((host, port), Handler)
    if isinstance(server, ThreadingHTTPServer):
        server.daemon_threads = True
    print(f"testfn listening on {host}:{port} pid {os.getpid()}", flush=True)
    server.serve_forever()


def tick(every_s: float) -> None:
    n = 0
    while True:
        print(f"tick {n}", flush=True)
        n += 1
        time.sleep(every_s)


def main(argv: list[str]) -> None:
    # As PID 1 the process ignores SIGTERM unless it handles it: stop at once.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    mode, args = (argv[0], argv[1:]) if argv else ("serve", [])
    tick_s = os.environ.get("TESTFN_TICK_S")
    if tick_s:
        threading.Thread(target=tick, args=(float(tick_s),), daemon=True).start()
    if mode == "serve":
        serve("0.0.0.0", 9000)
    elif mode == "serve-threaded":
        serve("0.0.0.0", 9000, ThreadingHTTPServer)
    elif mode == "never-listen":
        print("starting", flush=True)
        while True:
            time.sleep(3600)
    elif mode == "listen-localhost":
        serve("127.0.0.1", 9000)
    elif mode == "listen-8080":
        serve("0.0.0.0", 8080)
    elif mode == "exit-at-start":
        print("boom", file=sys.stderr, flush=True)
        sys.exit(int(args[0]) if args else 1)
    elif mode == "slow-start":
        delay_s = float(args[0]) if args else 10.0
        print(f"starting slowly: serving in {delay_s} s", flush=True)
        time.sleep(delay_s)
        serve("0.0.0.0", 9000)
    else:
        print(f"testfn: unknown mode {mode!r}; see the docstring of testfn.py", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main(sys.argv[1:])
