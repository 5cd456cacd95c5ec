"""The SES direct path (worker/mailers/ses_http.py) does what botocore would: the same
endpoint, the same signature; and it steps aside wherever botocore would do more."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from pathlib import Path

import boto3
import botocore.session
import pytest
import time_machine
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from worker.mailers.ses_http import Signer, direct_endpoint, request_body

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


@pytest.mark.parametrize("region", ["us-east-1", "eu-west-1", "ap-southeast-2", "sa-east-1"])
def test_default_endpoint_is_botocores(region: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_SESV2", "AWS_USE_FIPS_ENDPOINT",
                 "AWS_USE_DUALSTACK_ENDPOINT", "HTTPS_PROXY", "https_proxy"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    session = botocore.session.Session()
    client = boto3.session.Session(
        botocore_session=session, region_name=region, aws_access_key_id=KEY,
        aws_secret_access_key=SECRET,
    ).client("sesv2")  # fmt: skip

    direct = direct_endpoint(session, region, None)

    assert direct is not None
    assert direct[0] == client.meta.endpoint_url


@pytest.mark.parametrize(
    ("region", "env"),
    [
        ("cn-north-1", {}),  # another partition: botocore knows its endpoints
        ("us-gov-west-1", {}),
        ("us-east-1", {"AWS_USE_FIPS_ENDPOINT": "true"}),
        ("us-east-1", {"AWS_USE_DUALSTACK_ENDPOINT": "true"}),
        ("us-east-1", {"AWS_ENDPOINT_URL_SESV2": "https://ses.proxy.example"}),
        ("us-east-1", {"HTTPS_PROXY": "http://proxy.example:3128"}),
    ],
    ids=["china", "govcloud", "fips", "dualstack", "configured-endpoint", "proxy"],
)
def test_botocore_keeps_what_it_does_specially(
    region: str, env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert direct_endpoint(botocore.session.Session(), region, None) is None


def test_a_configured_endpoint_is_used_with_botocores_ca_bundle(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    bundle = tmp_path / "ca.pem"
    monkeypatch.setenv("AWS_CA_BUNDLE", str(bundle))
    assert direct_endpoint(botocore.session.Session(), "us-east-1", "http://127.0.0.1:4566") == (
        "http://127.0.0.1:4566",
        str(bundle),
    )
    assert direct_endpoint(botocore.session.Session(), "us-east-1", "ftp://x") is None
