"""A small SES-compatible HTTP server (sesv2 ``SendEmail``) with programmable faults.

It speaks just enough of the sesv2 REST-JSON protocol for boto3: ``POST
/v2/email/outbound-emails`` answers ``{"MessageId": ...}``, or the next queued fault.
Every request is recorded, and every message the server *accepted* (including one whose
answer was then delayed or lost) is counted per raw body, so tests can assert that a
failure never produced a second copy at the server.

Besides faults queued one by one (``push``), a share of all requests can fail at random
(``fault_rate``, drawn from ``random_faults``: 429, 500, a connection reset before the
message was taken, an answer slower than the client's timeout after it was taken), as the
chaos benchmark does. ``GET /_fake/stats`` reports, as JSON, what the server accepted per
recipient, the duplicates, the faults it served and the most requests it had open at
once (``max_in_flight``); ``POST /_fake/reset`` zeroes the counters. ``--latency`` delays
every answer, like a provider in another region; ``--count-only`` keeps counters only,
not every request (long benchmark runs).

Run it in a thread (``FakeSes().start()``) or as its own process, as the benchmarks do::

    python tests/integration/fake_ses.py --port 0   # prints the URL, serves until killed
    python tests/integration/fake_ses.py --port 0 --fault-rate 0.15 --slow-seconds 3
    python tests/integration/fake_ses.py --port 0 --latency 0.03 --count-only
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import json
import random
import socket
import sys
import threading
import uuid
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

SEND_PATH = "/v2/email/outbound-emails"
ACCOUNT_PATH = "/v2/email/account"  # GetAccount: answers ``FakeSes.account`` (None: 404)
STATS_PATH = "/_fake/stats"
RESET_PATH = "/_fake/reset"


@dataclass(frozen=True)
class Fault:
    """What the server does with one request instead of a plain success."""

    status: int = 200
    code: str = ""  # the AWS error code (x-amzn-ErrorType); empty for success
    message: str = ""
    delay: float = 0.0  # seconds to wait before answering
    accept: bool = False  # the message counts as sent at the server despite the fault
    drop: bool = False  # close the connection without any answer
    headers: dict[str, str] = field(default_factory=dict)
    json_body: bool = True  # False: a proxy-style plain-text error page


# The faults tests ask for by name.
THROTTLE = Fault(
    429, "TooManyRequestsException", "Maximum sending rate exceeded.", headers={"Retry-After": "2"}
)
INTERNAL = Fault(500, "InternalFailure", "The request processing has failed.")
REJECTED = Fault(400, "MessageRejected", "Email address is not verified.")
BAD_REQUEST = Fault(400, "BadRequestException", "Invalid tag value.")
PAUSED = Fault(400, "SendingPausedException", "Sending is paused for this account.")
QUOTA = Fault(400, "LimitExceededException", "Daily message quota exceeded.")
SUSPENDED = Fault(400, "AccountSuspendedException", "Account is suspended.")
GATEWAY_TIMEOUT = Fault(504, "", "Gateway Timeout", json_body=False)


def slow(delay: float) -> Fault:
    """SES sends the email, but its answer comes after ``delay`` seconds."""
    return Fault(delay=delay, accept=True)


DROP_AFTER_ACCEPT = Fault(accept=True, drop=True)
# The connection is cut before the server took the message (the client cannot tell).
RESET = Fault(status=0, code="ConnectionReset", drop=True)


def random_faults(slow_seconds: float) -> dict[str, Fault]:
    """The faults a share of requests gets at random, by name."""
    return {
        "throttle": THROTTLE,
        "internal": INTERNAL,
        "reset": RESET,
        "slow": Fault(delay=slow_seconds, accept=True, code="SlowAnswer"),
    }


# Faults after which the client cannot know whether the message went out.
AMBIGUOUS_FAULTS = frozenset({"reset", "slow"})


@dataclass
class Received:
    sender: str
    recipients: list[str]
    raw: bytes
    body: dict[str, Any]  # the whole JSON request (EmailTags, ConfigurationSetName, …)
    headers: dict[str, str]
    outcome: str  # "accepted", the fault code, or "dropped"


class FakeSes:
    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        fault_rate: float = 0.0,
        faults: dict[str, Fault] | None = None,
        seed: int | None = None,
        latency: float = 0.0,
        keep_requests: bool = True,
    ) -> None:
        self.latency = latency  # seconds before every answer
        self.keep_requests = keep_requests
        self.request_count = 0
        self.accepted_count = 0
        self.in_flight = 0  # SendEmail requests being answered right now
        self.max_in_flight = 0
        if not 0.0 <= fault_rate <= 1.0:
            raise ValueError(f"fault_rate must be within 0..1, got {fault_rate}")
        self._lock = threading.Lock()
        self._faults: list[Fault] = []
        self.fault_rate = fault_rate
        self.random_faults = dict(faults or {})
        if fault_rate and not self.random_faults:
            raise ValueError("fault_rate needs at least one fault to draw from")
        self._random = random.Random(seed)
        self.served: Counter[str] = Counter()  # random faults served, by name
        self.per_recipient: Counter[str] = Counter()  # accepted copies per address
        self._stopping = threading.Event()
        self._connections: set[socket.socket] = set()
        self.requests: list[Received] = []  # every SendEmail request, faulted or not
        self.accepted: Counter[bytes] = Counter()  # raw body -> copies the server "sent"
        self.message_ids: list[str] = []
        self.account: dict[str, Any] | None = None  # the GetAccount answer; None: no route
        self.account_requests = 0
        self._server = _Server((host, port), _make_handler(self))
        self._thread: threading.Thread | None = None

    # -- control ---------------------------------------------------------------------

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> FakeSes:
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening AND cut open keep-alive connections: the port now refuses."""
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            connections, self._connections = set(self._connections), set()
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self._thread:
            self._thread.join(timeout=5)

    def push(self, *faults: Fault) -> None:
        """Queue faults: each applies to one future request, in order."""
        with self._lock:
            self._faults.extend(faults)

    def copies(self, raw: bytes) -> int:
        with self._lock:
            return self.accepted[raw]

    def total_accepted(self) -> int:
        with self._lock:
            return sum(self.accepted.values())

    # -- internals -------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "requests": self.request_count,
                "accepted": self.accepted_count,
                "max_in_flight": self.max_in_flight,
                "faults": dict(self.served),
                "ambiguous": sum(self.served[name] for name in AMBIGUOUS_FAULTS),
                "per_recipient": dict(self.per_recipient),
                "duplicates": {a: n for a, n in self.per_recipient.items() if n > 1},
            }

    def reset(self) -> None:
        with self._lock:
            self.request_count = self.accepted_count = self.max_in_flight = 0
            self.requests.clear()
            self.accepted.clear()
            self.message_ids.clear()
            self.per_recipient.clear()
            self.served.clear()

    def _next_fault(self) -> Fault | None:
        with self._lock:
            if self._faults:
                return self._faults.pop(0)
            if self.fault_rate and self._random.random() < self.fault_rate:
                name = self._random.choice(sorted(self.random_faults))
                self.served[name] += 1
                return self.random_faults[name]
            return None

    def _record(self, received: Received, accepted: bool) -> str | None:
        with self._lock:
            self.request_count += 1
            if self.keep_requests:
                self.requests.append(received)
            if not accepted:
                return None
            self.accepted_count += 1
            for address in received.recipients:
                self.per_recipient[address] += 1
            message_id = f"fake-{uuid.uuid4()}"
            if self.keep_requests:
                self.accepted[received.raw] += 1
                self.message_ids.append(message_id)
            return message_id


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024  # many clients connecting at once (the benchmarks)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that went away (a benchmark's kill -9) is not the server's error.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def _make_handler(state: FakeSes) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, like the real endpoint

        def setup(self) -> None:
            super().setup()
            # Headers and body go out in two writes: without NODELAY, Nagle plus the
            # client's delayed ACK add ~40 ms to every answer.
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with state._lock:
                state._connections.add(self.connection)

        def finish(self) -> None:
            with state._lock:
                state._connections.discard(self.connection)
            with contextlib.suppress(OSError):
                super().finish()

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

        def _answer(
            self, status: int, payload: dict[str, Any] | str, extra: dict[str, str]
        ) -> None:
            body = (payload if isinstance(payload, str) else json.dumps(payload)).encode()
            try:
                self.send_response(status)
                ctype = "application/json" if isinstance(payload, dict) else "text/html"
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("x-amzn-RequestId", str(uuid.uuid4()))
                for name, value in extra.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)
            except OSError:  # the client gave up (slow answer): nothing to do
                self.close_connection = True

        def _error(self, fault: Fault) -> None:
            if not fault.json_body:
                self._answer(fault.status, f"<html>{fault.message}</html>", fault.headers)
                return
            headers = {"x-amzn-ErrorType": f"{fault.code}:", **fault.headers}
            self._answer(fault.status, {"message": fault.message}, headers)

        def do_GET(self) -> None:
            if self.path == ACCOUNT_PATH and state.account is not None:
                with state._lock:
                    state.account_requests += 1
                fault = state._next_fault()
                if fault is not None:
                    self._error(fault)
                else:
                    self._answer(200, state.account, {})
                return
            if self.path != STATS_PATH:
                self._error(Fault(404, "NotFoundException", f"no route {self.path}"))
                return
            self._answer(200, state.stats(), {})

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            data = self.rfile.read(length)
            if self.path == RESET_PATH:
                state.reset()
                self._answer(200, {}, {})
                return
            if self.path != SEND_PATH:
                self._error(Fault(404, "NotFoundException", f"no route {self.path}"))
                return
            with state._lock:
                state.in_flight += 1
                state.max_in_flight = max(state.max_in_flight, state.in_flight)
            try:
                self._send_email(data)
            finally:
                with state._lock:
                    state.in_flight -= 1

        def _send_email(self, data: bytes) -> None:
            try:
                body = json.loads(data)
                raw = base64.b64decode(body["Content"]["Raw"]["Data"], validate=True)
                sender = body["FromEmailAddress"]
                recipients = list(body["Destination"]["ToAddresses"])
            except (ValueError, KeyError, TypeError, binascii.Error) as exc:
                self._error(Fault(400, "BadRequestException", f"malformed request: {exc}"))
                return
            fault = state._next_fault()
            ok = fault is None or (fault.status == 200 and not fault.drop)
            accepted = ok or bool(fault and fault.accept)
            outcome = "accepted" if ok else (fault.code if fault else "accepted")
            if fault and fault.drop:
                outcome = "dropped"
            received = Received(sender, recipients, raw, body, dict(self.headers), outcome)
            message_id = state._record(received, accepted)
            delay = (fault.delay if fault else 0.0) or state.latency
            if delay:
                state._stopping.wait(delay)
            if fault and fault.drop:
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)
                return
            if ok:
                self._answer(200, {"MessageId": message_id}, fault.headers if fault else {})
            else:
                assert fault is not None
                self._error(fault)

    return Handler


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--fault-rate", type=float, default=0.0, help="share of requests, 0..1")
    parser.add_argument(
        "--faults",
        default="throttle,internal,reset,slow",
        help="comma-separated names the random faults are drawn from",
    )
    parser.add_argument("--slow-seconds", type=float, default=30.0, help="delay of a slow answer")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before answering")
    parser.add_argument("--count-only", action="store_true", help="keep counters only")
    args = parser.parse_args(argv)
    known = random_faults(args.slow_seconds)
    names = [n.strip() for n in args.faults.split(",") if n.strip()]
    unknown = sorted(set(names) - set(known))
    if unknown:
        parser.error(f"unknown fault(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    try:
        server = FakeSes(
            args.host,
            args.port,
            fault_rate=args.fault_rate,
            faults={n: known[n] for n in names},
            seed=args.seed,
            latency=args.latency,
            keep_requests=not args.count_only,
        )
    except ValueError as exc:
        parser.error(str(exc))
    print(server.url, flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server._server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
