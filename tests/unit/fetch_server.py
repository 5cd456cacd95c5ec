"""A local HTTP server that plays scripted answers: recorded bodies, status codes,
Retry-After, 304 for a matching If-None-Match, bodies cut short, answers that stall.

Each path has a list of answers used in order (the last one repeats). Every request is
recorded (path, query, headers) for the test to look at.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit


@dataclass
class Answer:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"
    etag: str | None = None  # sent, and a request with If-None-Match == etag gets 304
    truncate: bool = False  # promise the whole body, send half, close
    stall: float = 0.0  # seconds before answering
    no_length: bool = False  # no Content-Length: the body runs until the connection closes


@dataclass
class Seen:
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    at: float  # time.monotonic() on arrival
    fake_at: float | None = None  # the test's FakeTime on arrival, when the script has one


class Script:
    def __init__(self) -> None:
        self.routes: dict[str, list[Answer | Callable[[Seen], Answer]]] = {}
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        self._used: dict[str, int] = {}
        self.url = ""
        self.clock: FakeTime | None = None

    def on(self, path: str, *answers: Answer | Callable[[Seen], Answer]) -> Script:
        self.routes[path] = list(answers)
        self._used[path] = 0
        return self

    def requests(self, path: str | None = None) -> list[Seen]:
        return [s for s in self.seen if path is None or s.path == path]

    def answer(self, seen: Seen) -> Answer:
        with self._lock:
            self.seen.append(seen)
            answers = self.routes.get(seen.path)
            if not answers:
                return Answer(404, b"not found", content_type="text/plain")
            index = min(self._used[seen.path], len(answers) - 1)
            self._used[seen.path] += 1
        chosen = answers[index]
        return chosen(seen) if callable(chosen) else chosen


@contextmanager
def serve(script: Script) -> Iterator[Script]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            parts = urlsplit(self.path)
            seen = Seen(
                parts.path,
                {k: v[-1] for k, v in parse_qs(parts.query).items()},
                {k: v for k, v in self.headers.items()},
                time.monotonic(),
                script.clock.now if script.clock else None,
            )
            answer = script.answer(seen)
            if answer.stall:
                time.sleep(answer.stall)
            if answer.etag and self.headers.get("If-None-Match") == answer.etag:
                self.send_response(304)
                self.send_header("ETag", answer.etag)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(answer.status)
            self.send_header("Content-Type", answer.content_type)
            if answer.no_length:
                self.send_header("Connection", "close")
                self.close_connection = True
            else:
                self.send_header("Content-Length", str(len(answer.body)))
            if answer.etag:
                self.send_header("ETag", answer.etag)
            for key, value in answer.headers.items():
                self.send_header(key, value)
            if answer.truncate:
                self.send_header("Connection", "close")
            self.end_headers()
            if answer.truncate:
                self.wfile.write(answer.body[: len(answer.body) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(answer.body)

        def log_message(self, *args: Any) -> None:
            pass

    class Server(ThreadingHTTPServer):
        daemon_threads = True

        def handle_error(self, request: Any, client_address: Any) -> None:
            pass  # a client that gave up on a stalled answer is expected here

    server = Server(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    script.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield script
    finally:
        server.shutdown()
        server.server_close()


class FakeTime:
    """An injectable monotonic clock that moves only when slept on: no real waiting."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(round(seconds, 3))
        self.now += seconds
