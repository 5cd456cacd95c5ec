"""SES v2 ``SendEmail`` as one signed HTTP request on a pooled connection: the send's hot path.

Measured on the 2-core development machine against a local SES-compatible server (see
``bench/ses_send.py``): a botocore ``send_email`` call costs about 1.1 ms of CPU, of which
the HTTP exchange is about 0.3 ms; the rest is per-call machinery papermail does not need
on this one operation (parameter validation of arguments it built itself, endpoint rule
evaluation, a dozen event hooks, user-agent assembly, response-shape parsing). At hundreds
of sends a second on a small machine that was the largest single share of a worker's CPU.

So the success path is done here: the JSON body SES expects, a Signature Version 4
``Authorization`` header (tested byte for byte against botocore's own signer), one POST
through urllib3 (the HTTP library botocore itself uses) with a connection pool sized to
the sends in flight. Everything else stays botocore's: the credential chain (environment,
profile, instance role, with refresh), the region and endpoint, the parsing of error
answers into the same ``ClientError``, and the exception types, so
:func:`worker.mailers.ses.classify` decides the error kind exactly as before.

:func:`direct_endpoint` says when this path applies; otherwise (a proxy, another AWS
partition, FIPS or dual-stack endpoints, anything botocore would treat specially) the
mailer calls botocore. The botocore client itself is then only built when needed, which
keeps its service model (~10 MB per worker process) out of memory.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import socket
from collections.abc import Mapping
from datetime import datetime
from importlib import metadata
from typing import Any
from urllib.parse import quote, urlsplit

import botocore.exceptions as bx
import urllib3
from botocore.httpsession import get_cert_path
from botocore.parsers import create_parser
from botocore.utils import get_environ_proxies
from urllib3.exceptions import (
    ConnectTimeoutError,
    HTTPError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
    SSLError,
)

from worker.clock import utcnow

SERVICE = "ses"  # the signing name of both SES APIs (v1 and v2)
PATH = "/v2/email/outbound-emails"
OPERATION = "SendEmail"
_ALGORITHM = "AWS4-HMAC-SHA256"


def _user_agent() -> str:
    try:
        version = metadata.version("papermail")
    except metadata.PackageNotFoundError:
        version = "dev"
    return f"papermail/{version} (SES v2 SendEmail; botocore credentials and errors)"


USER_AGENT = _user_agent()


def direct_endpoint(
    botocore_session: Any, region: str, endpoint_url: str | None
) -> tuple[str, str] | None:
    """``(endpoint URL, CA bundle)`` of the direct path, or None where botocore must send.

    The endpoint is the configured one, or SES v2's standard endpoint in the ``aws``
    partition. Anything botocore would treat specially stays botocore's: another partition
    (China, GovCloud...), FIPS or dual-stack endpoints, an endpoint configured in botocore's
    own environment or config file, a proxy.
    """
    import boto3

    if endpoint_url is None:
        if (
            boto3.session.Session(botocore_session=botocore_session).get_partition_for_region(
                region
            )
            != "aws"
        ):
            return None
        for name in ("use_fips_endpoint", "use_dualstack_endpoint"):
            if str(botocore_session.get_config_variable(name) or "").lower() == "true":
                return None
        if _configured_endpoint(botocore_session):
            return None
        endpoint_url = f"https://email.{region}.amazonaws.com"
    if urlsplit(endpoint_url).scheme not in ("http", "https"):
        return None
    if get_environ_proxies(endpoint_url):
        return None
    # botocore verifies with AWS_CA_BUNDLE / ca_bundle when set, else its default bundle.
    bundle = botocore_session.get_config_variable("ca_bundle") or get_cert_path(True)
    return endpoint_url, str(bundle)


def _partition(botocore_session: Any, region: str) -> str:
    """The AWS partition of ``region`` by the rule of botocore's endpoint rulesets: a
    region a partition lists, else the first partition whose pattern matches, else
    ``aws``. From botocore's 7 KB partitions.json: its 1.2 MB endpoints.json (what
    ``get_partition_for_region`` loads) would cost every worker process ~10 MB."""
    data = botocore_session.get_component("data_loader").load_data("partitions")
    partitions = data.get("partitions", [])
    for partition in partitions:
        if region in partition.get("regions", {}):
            return str(partition["id"])
    for partition in partitions:
        if re.match(partition.get("regionRegex", "$^"), region):
            return str(partition["id"])
    return "aws"


def _configured_endpoint(botocore_session: Any) -> str | None:
    """An endpoint URL set through botocore's configuration (AWS_ENDPOINT_URL_SESV2, ...)."""
    try:
        from botocore.configprovider import ConfiguredEndpointProvider
    except ImportError:  # an older botocore has no such configuration
        return None
    provider = ConfiguredEndpointProvider(
        full_config=botocore_session.full_config,
        scoped_config=botocore_session.get_scoped_config(),
        client_name="sesv2",
    )
    return provider.provide()  # type: ignore[no-any-return]


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode("utf-8"), hashlib.sha256).digest()


class Signer:
    """Signature Version 4 for one POST with a JSON body, the headers botocore signs."""

    def __init__(self, region: str, host: str, path: str) -> None:
        self.region = region
        self.host = host
        self.path = path
        self._canonical_uri = quote(path, safe="/~")
        self._keys: dict[tuple[str, str], bytes] = {}  # (secret, day) -> signing key

    def _key(self, secret: str, day: str) -> bytes:
        key = self._keys.get((secret, day))
        if key is None:
            key = _hmac(_hmac(_hmac(_hmac(f"AWS4{secret}".encode(), day), self.region), SERVICE),
                        "aws4_request")  # fmt: skip
            if len(self._keys) > 8:  # a new day or rotated credentials: keep it small
                self._keys.clear()
            self._keys[(secret, day)] = key
        return key

    def headers(
        self,
        body: bytes,
        access_key: str,
        secret_key: str,
        token: str | None,
        now: datetime,
    ) -> dict[str, str]:
        """The request's headers, ``Authorization`` included."""
        stamp = now.strftime("%Y%m%dT%H%M%SZ")
        day = stamp[:8]
        signed = {"content-type": "application/json", "host": self.host, "x-amz-date": stamp}
        if token:
            signed["x-amz-security-token"] = token
        names = ";".join(sorted(signed))
        canonical = "\n".join(
            [
                "POST",
                self._canonical_uri,
                "",
                *(f"{name}:{signed[name]}" for name in sorted(signed)),
                "",
                names,
                hashlib.sha256(body).hexdigest(),
            ]
        )
        scope = f"{day}/{self.region}/{SERVICE}/aws4_request"
        to_sign = "\n".join(
            [_ALGORITHM, stamp, scope, hashlib.sha256(canonical.encode("utf-8")).hexdigest()]
        )
        signature = hmac.new(
            self._key(secret_key, day), to_sign.encode("utf-8"), hashlib.sha256
        ).hexdigest()
        headers = {
            "Content-Type": "application/json",
            "Host": self.host,
            "X-Amz-Date": stamp,
            "Authorization": (
                f"{_ALGORITHM} Credential={access_key}/{scope}, "
                f"SignedHeaders={names}, Signature={signature}"
            ),
            "User-Agent": USER_AGENT,
        }
        if token:
            headers["X-Amz-Security-Token"] = token
        return headers


def request_body(kwargs: Mapping[str, Any]) -> bytes:
    """SendEmail's JSON body for the arguments botocore's ``send_email`` would take."""
    content = kwargs["Content"]["Raw"]["Data"]
    body: dict[str, Any] = {
        "FromEmailAddress": kwargs["FromEmailAddress"],
        "Destination": kwargs["Destination"],
        "Content": {"Raw": {"Data": base64.b64encode(content).decode("ascii")}},
    }
    for name in ("ConfigurationSetName", "EmailTags"):
        if name in kwargs:
            body[name] = kwargs[name]
    return json.dumps(body, separators=(",", ":")).encode("ascii")


class SendEmailTransport:
    """``send_email(**kwargs) -> {"MessageId": ...}``, raising what botocore would raise."""

    def __init__(
        self,
        endpoint_url: str,
        ca_bundle: str,
        region: str,
        credentials: Any,
        *,
        connect_timeout: float,
        read_timeout: float,
        pool_size: int,
    ) -> None:
        endpoint = urlsplit(endpoint_url)
        self.endpoint_url = endpoint_url
        self._credentials = credentials
        default_port = 443 if endpoint.scheme == "https" else 80
        port = endpoint.port or default_port
        host = endpoint.hostname or ""
        netloc = host if port == default_port else f"{host}:{port}"
        self.signer = Signer(region, netloc, endpoint.path.rstrip("/") + PATH)
        options: dict[str, Any] = {
            "maxsize": pool_size,
            "block": False,  # more threads than connections: open one, keep at most maxsize
            "timeout": urllib3.Timeout(connect=connect_timeout, read=read_timeout),
            "retries": False,  # never a second copy: the delivery layer owns retries
            "socket_options": [
                *urllib3.connection.HTTPConnection.default_socket_options,
                (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
            ],
        }
        pool_class: type[urllib3.HTTPConnectionPool]
        if endpoint.scheme == "https":
            pool_class = urllib3.HTTPSConnectionPool
            options.update(cert_reqs="CERT_REQUIRED", ca_certs=ca_bundle)
        else:
            pool_class = urllib3.HTTPConnectionPool
        self._pool = pool_class(host, port, **options)
        self._parser = create_parser("rest-json")

    def send_email(self, **kwargs: Any) -> dict[str, Any]:
        credentials = self._credentials
        if credentials is None:
            raise bx.NoCredentialsError()
        frozen = credentials.get_frozen_credentials()  # refreshes expiring ones
        body = request_body(kwargs)
        headers = self.signer.headers(
            body, frozen.access_key, frozen.secret_key, frozen.token, utcnow()
        )
        try:
            answer = self._pool.urlopen(
                "POST",
                self.signer.path,
                body=body,
                headers=headers,
                redirect=False,
                assert_same_host=False,
                preload_content=True,
            )
        except NewConnectionError as exc:  # refused, unresolvable: it never left
            raise bx.EndpointConnectionError(endpoint_url=self.endpoint_url, error=exc) from exc
        except ConnectTimeoutError as exc:
            raise bx.ConnectTimeoutError(endpoint_url=self.endpoint_url, error=exc) from exc
        except ReadTimeoutError as exc:
            raise bx.ReadTimeoutError(endpoint_url=self.endpoint_url, error=exc) from exc
        except SSLError as exc:
            raise bx.SSLError(endpoint_url=self.endpoint_url, error=exc) from exc
        except ProtocolError as exc:
            raise bx.ConnectionClosedError(endpoint_url=self.endpoint_url) from exc
        except HTTPError as exc:  # anything else urllib3 raises mid-request
            raise bx.HTTPClientError(error=exc) from exc
        status = answer.status
        if status == 200:
            try:
                parsed = json.loads(answer.data)
            except ValueError:
                parsed = {}
            return parsed if isinstance(parsed, dict) else {}
        response = {
            "status_code": status,
            # botocore's parsers look headers up by their lowercase names.
            "headers": {name.lower(): value for name, value in answer.headers.items()},
            "body": answer.data,
        }
        # Errors parse without the service model (SendEmail's output shape has no error
        # members), so the model, ~10 MB once loaded, is never loaded for sending.
        error = self._parser.parse(response, None)
        raise bx.ClientError(error, OPERATION)

    def close(self) -> None:
        self._pool.close()
