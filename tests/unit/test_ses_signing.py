"""The SES hot path signs exactly as botocore does: same headers signed, same signature."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime

import pytest
import time_machine
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from worker.mailers.ses_http import Signer, request_body

NOW = datetime(2031, 3, 14, 5, 30, 7, tzinfo=UTC)
KEY, SECRET = "AKIAEXAMPLEKEY000000", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY+/="


def botocore_authorization(
    url: str, host: str, body: bytes, region: str, token: str | None
) -> tuple[str, str | None]:
    request = AWSRequest(
        method="POST", url=url, data=body, headers={"Content-Type": "application/json"}
    )
    request.headers["Host"] = host
    with time_machine.travel(NOW, tick=False):
        SigV4Auth(Credentials(KEY, SECRET, token), "ses", region).add_auth(request)
    return request.headers["Authorization"], request.headers.get("X-Amz-Security-Token")


@pytest.mark.parametrize(
    ("endpoint", "host", "path", "region", "token"),
    [
        ("https://email.eu-west-1.amazonaws.com", "email.eu-west-1.amazonaws.com", "", "eu-west-1",
         None),
        ("http://127.0.0.1:4566", "127.0.0.1:4566", "", "us-east-1", None),
        ("https://email.us-east-1.amazonaws.com", "email.us-east-1.amazonaws.com", "",
         "us-east-1", "FQoGZXIvYXdzEXAMPLE//session+token="),
        ("https://ses.internal.example:8443/proxy/ses", "ses.internal.example:8443",
         "/proxy/ses", "ap-southeast-2", None),
    ],
    ids=["aws", "local-port", "session-token", "path-prefix"],
)  # fmt: skip
def test_signature_matches_botocore(
    endpoint: str, host: str, path: str, region: str, token: str | None
) -> None:
    body = request_body(
        {
            "FromEmailAddress": "digest@papermail.example",
            "Destination": {"ToAddresses": ["reader@example.org"]},
            "Content": {"Raw": {"Data": b"Subject: hi\r\n\r\nbody \xe2\x9c\x93\r\n"}},
            "EmailTags": [{"Name": "delivery_id", "Value": "42"}],
        }
    )
    full_path = path + "/v2/email/outbound-emails"
    signer = Signer(region, host, full_path)

    headers = signer.headers(body, KEY, SECRET, token, NOW)

    expected, expected_token = botocore_authorization(
        endpoint.rstrip("/").removesuffix(path) + full_path, host, body, region, token
    )
    assert headers["Authorization"] == expected
    assert headers.get("X-Amz-Security-Token") == expected_token
    assert headers["X-Amz-Date"] == "20310314T053007Z"
    assert headers["Host"] == host


def test_signing_key_follows_the_day_and_the_secret() -> None:
    signer = Signer("us-east-1", "email.us-east-1.amazonaws.com", "/v2/email/outbound-emails")
    body = b"{}"
    today = signer.headers(body, KEY, SECRET, None, NOW)["Authorization"]
    tomorrow = signer.headers(body, KEY, SECRET, None, NOW.replace(day=15))["Authorization"]
    rotated = signer.headers(body, KEY, SECRET + "x", None, NOW)["Authorization"]
    assert len({today, tomorrow, rotated}) == 3
    assert "20310315/us-east-1/ses/aws4_request" in tomorrow


def test_body_is_what_botocore_would_send() -> None:
    raw = b"From: a@example.org\r\n\r\n\x00\xff binary-safe"
    body = json.loads(
        request_body(
            {
                "FromEmailAddress": "a@example.org",
                "Destination": {"ToAddresses": ["b@example.org"]},
                "Content": {"Raw": {"Data": raw}},
                "ConfigurationSetName": "events",
            }
        )
    )
    assert base64.b64decode(body["Content"]["Raw"]["Data"]) == raw
    assert body["ConfigurationSetName"] == "events"
    assert body["Destination"] == {"ToAddresses": ["b@example.org"]}
    assert "EmailTags" not in body
