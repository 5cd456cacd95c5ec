"""CPU per send through the SES mailer vs a bare boto3 loop (the floor), same endpoint.

Starts a local SES-compatible server in its OWN process (the fault-injecting fake from the
tests, or moto with ``--server moto``) so that only the client's CPU is measured
(``time.process_time``). Mailer and floor run in alternating rounds against the same
server, with the same client configuration and the same SendEmail arguments, so drift on
the machine hits both alike. Target: the mailer within 25% of the floor.

    .venv/bin/python bench/ses_send.py [--sends 2000] [--rounds 5] [--server fake|moto]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import make_msgid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import boto3  # noqa: E402
from botocore.config import Config  # noqa: E402

from worker.config import load_settings  # noqa: E402
from worker.mailers.ses import SesMailer  # noqa: E402
from worker.message import OutgoingMessage  # noqa: E402

SENDER = "digest@papermail.example"
KEY_ID, SECRET = "AKIABENCHMARK0000000", "bench-secret-not-real-0123456789abcdef"


def start_server(kind: str) -> tuple[subprocess.Popen[str], str]:
    if kind == "fake":
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "integration" / "fake_ses.py"), "--port", "0"],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        return proc, proc.stdout.readline().strip()
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(url + "/moto-api/data.json", timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    return proc, url


def digest_message(i: int) -> OutgoingMessage:
    """A digest-sized multipart message (~15 KB), as rendering would produce."""
    papers = "".join(
        f"<tr><td><a href='https://example.org/p/{i}-{n}'>Paper {n}: scaling laws for "
        f"retrieval-augmented agents</a><p>{'An abstract sentence. ' * 25}</p></td></tr>"
        for n in range(10)
    )
    msg = EmailMessage(policy=SMTP)
    msg["From"] = f"papermail <{SENDER}>"
    msg["To"] = f"reader{i}@example.org"
    msg["Subject"] = "Your papers for 2026-11-27"
    message_id = make_msgid(domain="papermail.example")
    msg["Message-ID"] = message_id
    msg.set_content("Your papers today.\n" + "A plain-text abstract line.\n" * 60)
    msg.add_alternative(f"<html><body><table>{papers}</table></body></html>", subtype="html")
    return OutgoingMessage(
        sender=SENDER,
        recipient=f"reader{i}@example.org",
        subject="Your papers for 2026-11-27",
        message_id=message_id,
        raw=msg.as_bytes(),
        tags={"delivery_id": str(1000 + i), "edition": "2026-11-27"},
    )


def bare_client(url: str, timeout: float) -> Any:
    config = Config(
        retries={"total_max_attempts": 1, "mode": "standard"},
        connect_timeout=5,
        read_timeout=timeout,
        max_pool_connections=50,
        tcp_keepalive=True,
    )
    session = boto3.session.Session(
        aws_access_key_id=KEY_ID, aws_secret_access_key=SECRET, region_name="us-east-1"
    )
    return session.client("sesv2", endpoint_url=url, config=config)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sends", type=int, default=2000, help="sends per round and side")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--server", choices=["fake", "moto"], default="fake")
    args = parser.parse_args()

    proc, url = start_server(args.server)
    try:
        settings = load_settings(
            mailer="ses",
            postal_address="Example Lab, 1 Main Street, Springfield, USA",
            secret_key="bench-secret-key-0123456789abcdefghijklmnop",
            base_url="https://papermail.example.org",
            ses_endpoint_url=url,
            ses_region="us-east-1",
            aws_access_key_id=KEY_ID,
            aws_secret_access_key=SECRET,
        )
        mailer = SesMailer(settings)
        floor = bare_client(url, settings.send_timeout_seconds)
        if args.server == "moto":
            floor.create_email_identity(EmailIdentity=SENDER.split("@", 1)[1])
        messages = [digest_message(i) for i in range(64)]

        def via_mailer(n: int) -> None:
            for k in range(n):
                mailer.send(messages[k % len(messages)])

        def via_boto3(n: int) -> None:
            for k in range(n):
                m = messages[k % len(messages)]
                floor.send_email(
                    FromEmailAddress=m.sender,
                    Destination={"ToAddresses": [m.recipient]},
                    Content={"Raw": {"Data": m.raw}},
                    EmailTags=[{"Name": k_, "Value": v} for k_, v in m.tags.items()],
                )

        via_mailer(100)  # warm both: connection pools, botocore's caches
        via_boto3(100)
        cpu: dict[str, list[float]] = {"mailer": [], "boto3": []}
        wall: dict[str, list[float]] = {"mailer": [], "boto3": []}
        sides = [("mailer", via_mailer), ("boto3", via_boto3)]
        for round_no in range(args.rounds):
            # Alternate who goes first so neither side always inherits the other's garbage.
            for name, run in sides if round_no % 2 == 0 else sides[::-1]:
                c0, w0 = time.process_time(), time.perf_counter()
                run(args.sends)
                cpu[name].append((time.process_time() - c0) / args.sends)
                wall[name].append((time.perf_counter() - w0) / args.sends)
        mailer.close()
        floor.close()
    finally:
        proc.terminate()
        proc.wait(timeout=10)

    size = statistics.mean(len(m.raw) for m in messages)
    print(
        f"server={args.server} cpus={os.cpu_count()} message={size / 1024:.1f} KiB "
        f"sends={args.sends}x{args.rounds} per side"
    )
    for name in ("boto3", "mailer"):
        print(
            f"{name:>6}: CPU {statistics.median(cpu[name]) * 1e6:8.1f} µs/send (median of rounds;"
            f" min {min(cpu[name]) * 1e6:.1f})  wall {statistics.median(wall[name]) * 1e6:8.1f} µs"
        )
    ratio = statistics.median(cpu["mailer"]) / statistics.median(cpu["boto3"])
    verdict = "OK" if ratio <= 1.25 else "OVER TARGET"
    print(f"mailer / floor = {ratio:.3f} (target <= 1.25): {verdict}")
    return 0 if ratio <= 1.25 else 1


if __name__ == "__main__":
    sys.exit(main())
