#!/usr/bin/env python3
"""Benchmark: provider events (SES notifications) applied per second, on every way in.

    python bench/events.py                      # 10,000 notifications, all three ways in
    python bench/events.py --events 2000 --only apply
    python bench/events.py --profile            # where one batch's time goes (pyinstrument)

Each measurement gets a fresh PostgreSQL database holding a real sent edition: N active
subscribers, one `sent` delivery each with its SES message id and attempt row. The stream
is one notification per delivery, shuffled: 2% permanent bounces, 0.1% complaints, the
rest Delivery (the reputation guard is consulted, and does not trip). Measured, each
against the one-by-one path in the same run:

- `papermail events apply FILE` (a subprocess, interpreter start included), batched; the
  baseline applies the same file one notification at a time (`apply_notification`);
- SQS: signed SNS envelopes in a queue of moto_server (its own process), consumed by
  `events.poll_sqs` (verification on, PAPERMAIL_SQS_RECEIVERS loops). moto serves a
  receive + delete slower than papermail applies it, so the same run measures moto alone
  (the same number of loops receiving and deleting, nothing applied: the floor) and
  papermail alone: `poll_sqs` on an in-memory queue (the same bodies, the same
  verification and batches, no SQS server), batched and one message per transaction;
- the webhook: signed SNS envelopes POSTed by concurrent keep-alive clients to
  `gunicorn -c python:worker.web.gunicorn_conf` (the Procfile's configuration) serving the
  real app (the SNS signing-certificate fetcher injected, as in the tests: Amazon's
  certificate host cannot be reached from here); the baseline runs 1 thread per worker,
  so each request is its own transaction.

Besides the wall time, each line prints the CPU (user + sys) spent per event by
papermail's process(es) (`events apply`; the consumer's process less the thread feeding
moto; the gunicorn workers), by the PostgreSQL backends of the run's database, and by the
rest of the run (the webhook's HTTP clients, moto_server), and the load average: on a
shared machine the wall figures are those of a fraction of its cores, the CPU ones are
not. After each run the outcome is checked: every delivery delivered / bounced /
complained, the bounced and complained subscribers suppressed, one stored event per
notification. Needs a local PostgreSQL (PAPERMAIL_TEST_POSTGRES_URL or
postgres@127.0.0.1) and Linux (/proc). Run by hand.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PG_ADMIN = os.environ.get(
    "PAPERMAIL_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
EDITION = date(2031, 3, 14)
TOPIC = "arn:aws:sns:us-east-1:123456789012:papermail-ses"
CERT_URL = "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-bench.pem"
BIN = Path(sys.executable).parent


def iso(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


# ---------------------------------------------------------------------------------------
# CPU accounting

TICK = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + sys) of a process so far; 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def self_cpu() -> float:
    times = os.times()
    return times.user + times.system


def children_of(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except OSError:
                continue
    return found


class PostgresCpu(threading.Thread):
    """CPU of the PostgreSQL backends serving one database, sampled every 0.1 s (backends
    come and go with connection pools: a backend that exits loses at most its last 0.1 s;
    one that starts during the run counts whole)."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.dbname = url.rsplit("/", 1)[1]
        self.first: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self.done = threading.Event()
        self.conn: Any = None

    def sample(self, initial: bool = False) -> None:
        rows = self.conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s", (self.dbname,)
        ).fetchall()
        for (pid,) in rows:
            cpu = proc_cpu(pid)
            self.first.setdefault(pid, cpu if initial else 0.0)
            self.last[pid] = max(cpu, self.last.get(pid, 0.0))

    def run(self) -> None:
        while not self.done.wait(0.1):
            self.sample()

    def __enter__(self) -> PostgresCpu:
        import psycopg

        self.conn = psycopg.connect(PG_ADMIN.replace("+psycopg", ""), autocommit=True)
        self.sample(initial=True)
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.join()
        self.sample()
        self.conn.close()

    @property
    def seconds(self) -> float:
        return sum(cpu - self.first[pid] for pid, cpu in self.last.items())


@dataclass
class Run:
    """What one way in took: wall seconds and CPU seconds by whom."""

    seconds: float
    papermail: float = 0.0
    other: float = 0.0  # the load: HTTP clients, moto_server
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------
# Database


def create_database() -> str:
    import psycopg

    name = f"papermail_bench_events_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return PG_ADMIN.rsplit("/", 1)[0] + "/" + name


def drop_database(url: str) -> None:
    import psycopg

    from worker import db

    db.dispose_engines()
    with psycopg.connect(PG_ADMIN.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)')


def use_database(url: str, **extra: str) -> None:
    """Point this process's settings (and its children's) at ``url``."""
    from worker import config, db

    os.environ["PAPERMAIL_DATABASE_URL"] = url
    os.environ.update(extra)
    config.reset_settings()
    db.dispose_engines()


def seed(url: str, n: int, sent_at: datetime) -> list[tuple[str, str]]:
    """A sent edition: n subscribers, one sent delivery each. Returns (message id, email)."""
    from sqlalchemy import insert

    from worker import migrate
    from worker.db import session_scope
    from worker.models import Delivery, DeliveryAttempt, Subscriber

    use_database(url)
    migrate.upgrade()
    emails = [f"reader{i:07d}@example.org" for i in range(n)]
    message_ids = [f"0100018f{uuid.uuid4().hex}-{i:06d}-000000" for i in range(n)]
    with session_scope(url) as session:
        session.execute(
            insert(Subscriber),
            [
                {"email": e, "status": "active", "topics": ["llm"], "created_at": sent_at,
                 "updated_at": sent_at, "confirmed_at": sent_at}
                for e in emails
            ],
        )  # fmt: skip
        ids = dict(session.execute(Subscriber.__table__.select().with_only_columns(
            Subscriber.email, Subscriber.id)).all())  # fmt: skip
        session.execute(
            insert(Delivery),
            [
                {"subscriber_id": ids[e], "edition_date": EDITION, "state": "sent",
                 "attempts": 1, "message_id": m, "scheduled_at": sent_at, "created_at": sent_at,
                 "updated_at": sent_at, "claimed_at": sent_at, "sent_at": sent_at,
                 "finished_at": sent_at}
                for e, m in zip(emails, message_ids, strict=True)
            ],
        )  # fmt: skip
        by_mid = dict(session.execute(Delivery.__table__.select().with_only_columns(
            Delivery.message_id, Delivery.id)).all())  # fmt: skip
        session.execute(
            insert(DeliveryAttempt),
            [
                {"delivery_id": by_mid[m], "kind": "send", "started_at": sent_at,
                 "finished_at": sent_at, "outcome": "sent", "message_id": m}
                for m in message_ids
            ],
        )  # fmt: skip
    with session_scope(url) as session:
        session.connection().exec_driver_sql("ANALYZE")
    return list(zip(message_ids, emails, strict=True))


# ---------------------------------------------------------------------------------------
# Notifications


def notifications(
    sends: list[tuple[str, str]], sent_at: datetime, rng: random.Random
) -> list[dict[str, Any]]:
    """One SES event per send: 2% permanent bounces, 0.1% complaints, the rest Delivery."""
    n = len(sends)
    kinds = ["Bounce"] * round(n * 0.02) + ["Complaint"] * round(n * 0.001)
    kinds += ["Delivery"] * (n - len(kinds))
    rng.shuffle(kinds)
    out = []
    for (message_id, email), kind in zip(sends, kinds, strict=True):
        mail = {
            "timestamp": iso(sent_at),
            "messageId": message_id,
            "source": "digest@papermail.example",
            "destination": [email],
            "headersTruncated": False,
        }
        at = iso(sent_at + timedelta(seconds=rng.randint(1, 600)))
        if kind == "Bounce":
            detail: dict[str, Any] = {
                "bounceType": "Permanent",
                "bounceSubType": "General",
                "bouncedRecipients": [
                    {"emailAddress": email, "action": "failed", "status": "5.1.1",
                     "diagnosticCode": "smtp; 550 5.1.1 user unknown"}
                ],
                "timestamp": at,
                "feedbackId": str(uuid.uuid4()),
            }  # fmt: skip
            out.append({"eventType": "Bounce", "bounce": detail, "mail": mail})
        elif kind == "Complaint":
            detail = {
                "complainedRecipients": [{"emailAddress": email}],
                "timestamp": at,
                "feedbackId": str(uuid.uuid4()),
                "complaintFeedbackType": "abuse",
            }
            out.append({"eventType": "Complaint", "complaint": detail, "mail": mail})
        else:
            detail = {
                "timestamp": at,
                "processingTimeMillis": 812,
                "recipients": [email],
                "smtpResponse": "250 2.0.0 OK",
                "reportingMTA": "a8-30.smtp-out.amazonses.com",
            }
            out.append({"eventType": "Delivery", "delivery": detail, "mail": mail})
    rng.shuffle(out)
    return out


class Signer:
    """A test SNS signing key and its certificate (what Amazon's certificate host serves)."""

    def __init__(self) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import NameOID

        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sns.amazonaws.com")])
        now = datetime.now(UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=30))
            .sign(self.key, hashes.SHA256())
        )
        self.pem = cert.public_bytes(serialization.Encoding.PEM)

    def envelope(self, note: dict[str, Any], when: datetime) -> dict[str, Any]:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        message = {
            "Type": "Notification",
            "MessageId": str(uuid.uuid4()),
            "TopicArn": TOPIC,
            "Message": json.dumps(note),
            "Timestamp": iso(when),
            "SignatureVersion": "2",
            "SigningCertURL": CERT_URL,
            "UnsubscribeURL": f"https://sns.us-east-1.amazonaws.com/?Action=Unsubscribe&T={TOPIC}",
        }
        canonical = "".join(
            f"{k}\n{message[k]}\n"
            for k in ("Message", "MessageId", "Timestamp", "TopicArn", "Type")
        )
        signature = self.key.sign(canonical.encode(), padding.PKCS1v15(), hashes.SHA256())
        message["Signature"] = base64.b64encode(signature).decode()
        return message


# ---------------------------------------------------------------------------------------
# Checking the outcome


def outcome(url: str) -> dict[str, int]:
    from sqlalchemy import func, select

    from worker.db import session_scope
    from worker.models import Delivery, ProviderEvent, Subscriber

    with session_scope(url) as session:
        states = dict(
            session.execute(select(Delivery.state, func.count()).group_by(Delivery.state)).all()
        )
        statuses = dict(
            session.execute(
                select(Subscriber.status, func.count()).group_by(Subscriber.status)
            ).all()
        )
        stored = session.scalar(select(func.count()).select_from(ProviderEvent)) or 0
    out = {f"delivery {k}": v for k, v in states.items()}
    out.update({f"subscriber {k}": v for k, v in statuses.items()})
    return {**out, "events stored": stored}


def expected(notes: list[dict[str, Any]]) -> dict[str, int]:
    kinds = [n["eventType"] for n in notes]
    bounced, complained = kinds.count("Bounce"), kinds.count("Complaint")
    out = {"delivery delivered": kinds.count("Delivery"), "delivery bounced": bounced,
           "delivery complained": complained,
           "subscriber active": len(kinds) - bounced - complained,
           "subscriber bounced": bounced, "subscriber complained": complained,
           "events stored": len(kinds)}  # fmt: skip
    return {k: v for k, v in out.items() if v}


def check(url: str, notes: list[dict[str, Any]], label: str) -> None:
    got, want = outcome(url), expected(notes)
    if got != want:
        raise SystemExit(f"{label}: wrong outcome\n  got  {got}\n  want {want}")


# ---------------------------------------------------------------------------------------
# The ways in


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_one_by_one(url: str, notes: list[dict[str, Any]], workdir: Path) -> Run:
    """The way `events apply` worked before batching: the file read whole, then
    `apply_notification` per notification, all in one transaction (in this process)."""
    from worker import events
    from worker.db import session_scope

    path = workdir / "events.json"
    path.write_text(json.dumps(notes))
    use_database(url)
    cpu, start = self_cpu(), time.perf_counter()
    items = events.parse_envelope(json.loads(path.read_text()))
    with session_scope(url) as session:
        for note, key in items:
            events.apply_notification(session, note, dedupe_key=key, via="file")
    return Run(time.perf_counter() - start, papermail=self_cpu() - cpu)


def run_apply(url: str, notes: list[dict[str, Any]], batch_size: int, workdir: Path) -> Run:
    """`papermail events apply FILE` in a subprocess (its start-up included)."""
    import resource

    path = workdir / f"events-{batch_size}.json"
    path.write_text(json.dumps(notes))
    env = {**os.environ, "PAPERMAIL_DATABASE_URL": url}
    cmd = [str(BIN / "papermail"), "events", "apply", str(path), "--batch-size", str(batch_size)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"events apply failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return Run(elapsed, papermail=cpu)


class CertFetcher:
    """Stands in for Amazon's certificate host (unreachable from here): serves the test
    certificate for its URL only."""

    def __init__(self, pem: bytes) -> None:
        self.pem = pem

    def __call__(self, url: str) -> bytes:
        if url != CERT_URL:
            raise OSError(f"404 {url}")
        return self.pem


def start_moto(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    log = (workdir / "moto.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], stdout=log, stderr=subprocess.STDOUT, env=env,
                            cwd=workdir)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/moto-api/data.json", proc)
    return proc, url


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{url}: the server exited ({proc.returncode})")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except urllib.error.HTTPError:
            return  # it answers
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.2)
    raise SystemExit(f"{url} did not answer within {timeout}s")


def sqs_client(endpoint: str) -> Any:
    import boto3

    return boto3.client("sqs", endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")  # fmt: skip


class Feeder(threading.Thread):
    """Sends the signed envelopes into the queue, keeping at most ``depth`` waiting: moto's
    receive costs grow with the queue's depth (0.5 s per receive at 200 waiting), so a deep
    queue would measure moto, not papermail. Its own CPU (``cpu``) is not papermail's."""

    def __init__(self, endpoint: str, queue: str, bodies: list[str], consumed: Any,
                 depth: int = 40) -> None:  # fmt: skip
        super().__init__(daemon=True)
        self.client, self.queue, self.bodies = sqs_client(endpoint), queue, bodies
        self.consumed, self.depth, self.sent, self.cpu = consumed, depth, 0, 0.0

    def send_some(self) -> None:
        chunk = self.bodies[self.sent : self.sent + 10]
        self.client.send_message_batch(QueueUrl=self.queue, Entries=[
            {"Id": str(i), "MessageBody": b} for i, b in enumerate(chunk)])  # fmt: skip
        self.sent += len(chunk)

    def run(self) -> None:
        start = time.thread_time()
        while self.sent < len(self.bodies):
            if self.sent - self.consumed() < self.depth:
                self.send_some()
            else:
                time.sleep(0.002)
        self.cpu = time.thread_time() - start


class MemoryQueue:
    """An SQS queue in this process (receive_message / delete_message_batch, as boto3's
    client answers them), for papermail's own cost without an SQS server in the way."""

    def __init__(self, bodies: list[str]) -> None:
        self.waiting = [(str(i), body) for i, body in enumerate(bodies)]
        self.inflight: dict[str, str] = {}
        self.lock = threading.Lock()

    def receive_message(self, *, QueueUrl: str, MaxNumberOfMessages: int,
                        WaitTimeSeconds: int) -> dict[str, Any]:  # fmt: skip
        with self.lock:
            taken = self.waiting[:MaxNumberOfMessages]
            del self.waiting[:MaxNumberOfMessages]
            self.inflight.update(taken)
        return {"Messages": [{"MessageId": i, "ReceiptHandle": i, "Body": b} for i, b in taken]}

    def delete_message_batch(self, *, QueueUrl: str, Entries: list[dict[str, str]]) -> Any:
        with self.lock:
            for entry in Entries:
                del self.inflight[entry["ReceiptHandle"]]
        return {"Successful": [{"Id": e["Id"]} for e in Entries], "Failed": []}


def sqs_settings(url: str, queue: str, endpoint: str) -> Any:
    from worker import config

    use_database(url, PAPERMAIL_SQS_QUEUE_URL=queue, PAPERMAIL_SQS_ENDPOINT_URL=endpoint,
                 PAPERMAIL_SNS_TOPIC_ARNS=TOPIC, PAPERMAIL_AWS_ACCESS_KEY_ID="testing",
                 PAPERMAIL_AWS_SECRET_ACCESS_KEY="testing")  # fmt: skip
    return config.get_settings()


def poll_all(settings: Any, client: Any, queue: str, n: int, signer: Signer,
             receivers: int, done: list[int]) -> Any:  # fmt: skip
    """`events.poll_sqs` until all n notifications are applied (verification on); ``done``
    follows the count applied (the feeder keeps the queue topped up by it)."""
    from worker import events, sns

    def progress(counts: events.PollCounts) -> None:
        done[0] = counts.applied

    counts = events.poll_sqs(settings, once=False, wait_seconds=1, client=client,
                             queue_url=queue, cert_fetcher=CertFetcher(signer.pem),
                             cert_cache=sns.CertCache(), on_batch=progress,
                             should_stop=lambda: done[0] >= n, receivers=receivers)  # fmt: skip
    # moto may hand one message to two concurrent receives (SQS is at-least-once too):
    # the second is a duplicate, deleted as well.
    if counts.applied != n or counts.deleted != counts.received:
        raise SystemExit(f"SQS: {counts.summary()}")
    return counts


def run_sqs(url: str, notes: list[dict[str, Any]], workdir: Path, *, how: str,
            endpoint: str, signer: Signer, moto: int) -> Run:  # fmt: skip
    """Consume moto's queue: ``floor`` (receive + delete only, as many loops as
    poll_sqs runs, nothing applied) or ``batched`` (events.poll_sqs)."""
    from worker import events

    client = sqs_client(endpoint)
    queue = client.create_queue(QueueName=f"ses-{uuid.uuid4().hex[:8]}",
                                Attributes={"VisibilityTimeout": "300"})["QueueUrl"]  # fmt: skip
    now = datetime.now(UTC)
    bodies = [json.dumps(signer.envelope(note, now)) for note in notes]
    settings = sqs_settings(url, queue, endpoint)
    receivers = settings.sqs_receivers
    done = [0]
    feeder = Feeder(endpoint, queue, bodies, lambda: done[0])
    while feeder.sent < min(feeder.depth, len(bodies)):
        feeder.send_some()
    feeder.start()
    lock = threading.Lock()
    moto_cpu, cpu, start = proc_cpu(moto), self_cpu(), time.perf_counter()
    notes_out: list[str] = []
    if how == "floor":

        def drain() -> None:
            while done[0] < len(notes):
                got = client.receive_message(QueueUrl=queue, MaxNumberOfMessages=10,
                                             WaitTimeSeconds=1)  # fmt: skip
                messages = got.get("Messages", [])
                if messages:
                    client.delete_message_batch(QueueUrl=queue, Entries=[
                        {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]}
                        for i, m in enumerate(messages)])  # fmt: skip
                with lock:
                    done[0] += len(messages)

        loops = [threading.Thread(target=drain) for _ in range(receivers)]
        for loop in loops:
            loop.start()
        for loop in loops:
            loop.join()
    else:
        counts = poll_all(settings, client, queue, len(notes), signer, receivers, done)
        done[0] = len(notes)
        notes_out.append(counts.summary())
    elapsed = time.perf_counter() - start
    feeder.join()
    run = Run(elapsed, papermail=self_cpu() - cpu - feeder.cpu,
              other=proc_cpu(moto) - moto_cpu, notes=notes_out)  # fmt: skip
    if how == "floor":  # applied afterwards, untimed, so the outcome check holds here too
        run.papermail = 0.0
        list(events.apply_in_batches([(n, None) for n in notes], via="sqs"))
    return run


def run_sqs_memory(url: str, notes: list[dict[str, Any]], workdir: Path, *, batched: bool,
                   signer: Signer) -> Run:  # fmt: skip
    """papermail's own SQS path on an in-memory queue: poll_sqs (batched), or each message
    verified, applied in its own transaction and deleted alone (the one-by-one baseline)."""
    from worker import events, sns

    now = datetime.now(UTC)
    bodies = [json.dumps(signer.envelope(note, now)) for note in notes]
    queue = MemoryQueue(bodies)
    settings = sqs_settings(url, "memory://ses", "http://unused.invalid")
    cpu, start = self_cpu(), time.perf_counter()
    notes_out: list[str] = []
    if batched:
        counts = poll_all(settings, queue, "memory://ses", len(notes), signer,
                          settings.sqs_receivers, [0])  # fmt: skip
        notes_out.append(counts.summary())
    else:
        fetcher, cache = CertFetcher(signer.pem), sns.CertCache()
        while messages := queue.receive_message(QueueUrl="q", MaxNumberOfMessages=10,
                                                WaitTimeSeconds=0)["Messages"]:  # fmt: skip
            for message in messages:
                events.handle_sqs_body(message["Body"], settings, fetcher=fetcher, cache=cache)
                queue.delete_message_batch(QueueUrl="q", Entries=[
                    {"Id": "0", "ReceiptHandle": message["ReceiptHandle"]}])  # fmt: skip
    return Run(time.perf_counter() - start, papermail=self_cpu() - cpu, notes=notes_out)


def webhook_app(pem_path: str) -> Any:
    """The real app for gunicorn, with the SNS certificate fetcher injected (as in the
    tests): `gunicorn --pythonpath bench 'events:webhook_app("cert.pem")'`."""
    from worker import sns
    from worker.web import create_app

    app = create_app()
    app.config["SNS_CERT_FETCHER"] = CertFetcher(Path(pem_path).read_bytes())
    app.config["SNS_CERT_CACHE"] = sns.CertCache()
    return app


def post_all(port: int, bodies: list[bytes], clients: int) -> Counter[int]:
    """POST every body from ``clients`` concurrent keep-alive connections, as SNS does."""
    import http.client

    statuses: Counter[int] = Counter()
    lock = threading.Lock()
    todo = iter(bodies)

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        headers = {"Content-Type": "text/plain; charset=UTF-8",
                   "x-amz-sns-message-type": "Notification"}  # fmt: skip
        while True:
            with lock:
                body = next(todo, None)
            if body is None:
                break
            for attempt in range(3):
                try:
                    conn.request("POST", "/webhooks/ses", body=body, headers=headers)
                    response = conn.getresponse()
                    response.read()
                    break
                except (http.client.HTTPException, OSError):
                    conn.close()  # the server closed a kept-alive connection: reconnect
                    if attempt == 2:
                        raise
            with lock:
                statuses[response.status] += 1
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return statuses


def run_webhook(url: str, notes: list[dict[str, Any]], workdir: Path, *, signer: Signer,
                workers: int, threads: int, clients: int) -> Run:  # fmt: skip
    """Signed SNS envelopes POSTed to gunicorn serving the app."""
    pem = workdir / "cert.pem"
    pem.write_bytes(signer.pem)
    now = datetime.now(UTC)
    bodies = [json.dumps(signer.envelope(note, now)).encode() for note in notes]
    port = free_port()
    env = {**os.environ, "PAPERMAIL_DATABASE_URL": url, "PAPERMAIL_SNS_TOPIC_ARNS": TOPIC,
           "PAPERMAIL_SECRET_KEY": base64.urlsafe_b64encode(os.urandom(36)).decode()}  # fmt: skip
    app = f"events:webhook_app({str(pem)!r})"
    # The Procfile's configuration module (threads, redacted access log), this factory.
    cmd = [str(BIN / "gunicorn"), "-c", "python:worker.web.gunicorn_conf",
           "--pythonpath", str(ROOT / "bench"), app,
           "--bind", f"127.0.0.1:{port}", "--workers", str(workers), "--threads", str(threads),
           "--log-level", "warning", "--no-control-socket"]  # fmt: skip
    log = (workdir / "gunicorn.log").open("wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    warm = min(len(bodies) // 10, 20 * workers)
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", proc)
        post_all(port, bodies[:warm], 2 * workers)  # every worker warms up on a few requests
        pids = children_of(proc.pid)
        used = sum(map(proc_cpu, pids))
        cpu, start = self_cpu(), time.perf_counter()
        statuses = post_all(port, bodies[warm:], clients)
        elapsed = time.perf_counter() - start
        run = Run(elapsed, papermail=sum(map(proc_cpu, pids)) - used, other=self_cpu() - cpu)
    finally:
        proc.terminate()
        proc.wait(10)
    statuses[200] += warm
    if set(statuses) != {200}:
        raise SystemExit(f"webhook answers: {dict(statuses)}; see {workdir / 'gunicorn.log'}")
    scale = len(notes) / (len(notes) - warm)  # the timed part, as a rate of all
    run.seconds *= scale
    run.papermail *= scale
    run.other *= scale
    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--only", choices=["apply", "sqs", "webhook"], action="append")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--web-workers", type=int, default=2, help="gunicorn workers (Procfile)")
    parser.add_argument("--web-threads", type=int, default=None,
                        help="threads per gunicorn worker (default: gunicorn_conf's)")  # fmt: skip
    parser.add_argument("--clients", type=int, default=48, help="concurrent webhook clients")
    parser.add_argument("--profile", action="store_true", help="profile one apply (pyinstrument)")
    args = parser.parse_args()
    ways = args.only or ["apply", "sqs", "webhook"]
    rng = random.Random(12)
    sent_at = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
    print(f"load average before: {os.getloadavg()[0]:.2f}  (2 cores shared)")
    head = f"{'':52s} {'events':>6} {'wall s':>7} {'events/s':>8} |"
    print(head + " CPU ms/event: papermail postgres  other | load")

    def measure(label: str, run: Any) -> None:
        url = create_database()
        try:
            sends = seed(url, args.events, sent_at)
            notes = notifications(sends, sent_at, rng)
            load = os.getloadavg()[0]
            with tempfile.TemporaryDirectory() as tmp, PostgresCpu(url) as pg:
                result: Run = run(url, notes, Path(tmp))
            check(url, notes, label)
        finally:
            drop_database(url)
        n = len(notes)
        ms = [1000 * x / n for x in (result.papermail, pg.seconds, result.other)]
        load = max(load, os.getloadavg()[0])
        line = f"{label:52s} {n:>6} {result.seconds:7.2f} {n / result.seconds:8.0f} |"
        print(f"{line} {'':13s} {ms[0]:9.3f} {ms[1]:8.3f} {ms[2]:6.3f} | {load:4.1f}", flush=True)
        for note in result.notes:
            print(f"    {note}")

    if args.profile:
        return profile(args.events, sent_at, rng)
    if "apply" in ways:
        if not args.skip_baseline:
            measure("baseline: one by one, one transaction", run_one_by_one)
        measure("events apply, batched (default)", lambda u, n, w: run_apply(u, n, 500, w))
    if "sqs" in ways:
        signer = Signer()
        with tempfile.TemporaryDirectory() as tmp:
            moto, endpoint = start_moto(Path(tmp))
            try:
                kw = {"endpoint": endpoint, "signer": signer, "moto": moto.pid}
                loops = int(os.environ.get("PAPERMAIL_SQS_RECEIVERS", "4"))
                measure(f"SQS floor: moto receive + delete only, {loops} loops",
                        lambda u, n, w: run_sqs(u, n, w, how="floor", **kw))  # fmt: skip
                measure(f"SQS via moto: poll_sqs, {loops} loops",
                        lambda u, n, w: run_sqs(u, n, w, how="batched", **kw))  # fmt: skip
            finally:
                moto.terminate()
                moto.wait(10)
        memory = {"signer": signer}
        if not args.skip_baseline:
            measure("baseline: SQS in memory, a transaction per message",
                    lambda u, n, w: run_sqs_memory(u, n, w, batched=False, **memory))  # fmt: skip
        measure(f"SQS in memory (papermail alone): poll_sqs, {loops} loops",
                lambda u, n, w: run_sqs_memory(u, n, w, batched=True, **memory))  # fmt: skip
    if "webhook" in ways:
        from worker.web import gunicorn_conf

        threads = args.web_threads or gunicorn_conf.threads
        signer = Signer()
        web = {"signer": signer, "workers": args.web_workers, "threads": threads,
               "clients": args.clients}  # fmt: skip
        if not args.skip_baseline:  # one request at a time per worker: nothing to coalesce
            one = {**web, "threads": 1}
            measure(f"baseline: webhook, gunicorn {args.web_workers} workers x 1 thread",
                    lambda u, n, w: run_webhook(u, n, w, **one))  # fmt: skip
        measure(f"webhook, gunicorn {args.web_workers} workers x {threads} threads",
                lambda u, n, w: run_webhook(u, n, w, **web))  # fmt: skip
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


def profile(n: int, sent_at: datetime, rng: random.Random) -> int:
    from pyinstrument import Profiler

    from worker import events

    url = create_database()
    try:
        notes = notifications(seed(url, n, sent_at), sent_at, rng)
        profiler = Profiler(interval=0.0005)
        profiler.start()
        items = [(note, None) for note in notes]
        list(events.apply_in_batches(items, via="file"))
        profiler.stop()
        print(profiler.output_text(unicode=False, show_all=False, color=False))
    finally:
        drop_database(url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
