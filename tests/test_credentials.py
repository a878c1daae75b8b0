"""A credential failure says in one line which of the three ways it found (static keys, a session token, a
role: IRSA, EKS Pod Identity, an instance role) and what is missing (dcgan_ray/storage/credentials.py).

`Store.check` resolves the credentials before its first request, so every case but the last two fails
without an S3 server (fast lane). The role cases talk to a stand-in for AWS STS or for the EKS Pod Identity
Agent on loopback (AWS_ENDPOINT_URL_STS, AWS_CONTAINER_CREDENTIALS_FULL_URI), which answer as the real
services document; the rejections come from the real SeaweedFS test server.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import re
import socket
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from dcgan_ray.errors import StorageAuthError
from dcgan_ray.storage.s3 import Store
from helpers import TEST_KEY, TEST_SECRET, make_config

ROLE_ARN = "arn:aws:iam::123456789012:role/dcgan-ray-s3"
SECRET = "a-secret-that-must-never-show-0123456789"
SESSION = "a-session-token-that-must-never-show"
WEB_IDENTITY_TOKEN = "eyJhbGciOiJSUzI1NiJ9.a-projected-token.that-must-never-show"


@pytest.fixture
def aws_env(monkeypatch, tmp_path):
    """No credentials anywhere: no AWS_* variables, no config or credentials file, no instance metadata."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    return monkeypatch


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
    """Every connection these tests make stays on 127.0.0.0/8 (STS and the agent are stand-ins)."""
    connect = socket.socket.connect

    def checked(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            assert str(address[0]).startswith("127."), f"connection to {address} leaves loopback"
        return connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", checked)


def closed_port_store() -> Store:
    """A store on a loopback port where nothing listens: any request would fail as unreachable, so a
    credential error proves the credentials were checked first."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return Store(make_config(f"http://127.0.0.1:{port}", "creds").storage)


def failure(store: Store) -> str:
    with pytest.raises(StorageAuthError) as info:
        store.check()
    message = str(info.value)
    assert "\n" not in message, "one line"
    for secret in (SECRET, SESSION, WEB_IDENTITY_TOKEN, TEST_SECRET):
        assert secret not in message
    return message


class _Stub(http.server.BaseHTTPRequestHandler):
    status = 500
    body = b""

    def _answer(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.requests.append(self.path)  # type: ignore[attr-defined]
        self.send_response(self.status)
        self.send_header("Content-Type", "text/xml")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    do_GET = do_POST = _answer

    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def serve(status: int, body: bytes) -> Iterator[http.server.ThreadingHTTPServer]:
    handler = type("Handler", (_Stub,), {"status": status, "body": body})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.requests = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


STS_REFUSES = (
    b'<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><Error><Type>Sender</Type>'
    b"<Code>AccessDenied</Code><Message>Not authorized to perform sts:AssumeRoleWithWebIdentity</Message>"
    b"</Error><RequestId>1</RequestId></ErrorResponse>"
)


def sts_grants(key: str, secret: str, token: str) -> bytes:
    """STS's AssumeRoleWithWebIdentity answer (AWS STS API reference), handing out the given keys."""
    expires = (datetime.now(UTC) + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return (
        '<AssumeRoleWithWebIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">'
        "<AssumeRoleWithWebIdentityResult><Credentials>"
        f"<AccessKeyId>{key}</AccessKeyId><SecretAccessKey>{secret}</SecretAccessKey>"
        f"<SessionToken>{token}</SessionToken><Expiration>{expires}</Expiration>"
        "</Credentials><SubjectFromWebIdentityToken>system:serviceaccount:ns:dcgan-ray</SubjectFromWebIdentityToken>"
        f"<AssumedRoleUser><Arn>{ROLE_ARN}/s</Arn><AssumedRoleId>AROA:s</AssumedRoleId></AssumedRoleUser>"
        "</AssumeRoleWithWebIdentityResult><ResponseMetadata><RequestId>1</RequestId></ResponseMetadata>"
        "</AssumeRoleWithWebIdentityResponse>"
    ).encode()


@pytest.fixture
def irsa(aws_env, tmp_path):
    """What EKS puts into a pod whose ServiceAccount is annotated with eks.amazonaws.com/role-arn."""
    token = tmp_path / "token"
    token.write_text(WEB_IDENTITY_TOKEN)
    aws_env.setenv("AWS_ROLE_ARN", ROLE_ARN)
    aws_env.setenv("AWS_WEB_IDENTITY_TOKEN_FILE", str(token))
    return aws_env


THE_THREE_WAYS = (
    r"static keys \(AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_SHARED_CREDENTIALS_FILE\), a session token "
    r"\(the same plus AWS_SESSION_TOKEN\), or a role \(IRSA or EKS Pod Identity through the pods' ServiceAccount, "
    r"or an instance role\)"
)


def test_nothing_found_names_the_three_ways(aws_env):
    message = failure(closed_port_store())
    assert re.fullmatch(
        r"no S3 credentials found for http://127\.0\.0\.1:\d+ while trying to open bucket 'dcgan-test': none of the "
        rf"three ways is set up\. Give this process and every Ray node one of them: {THE_THREE_WAYS} "
        r"\(cluster/README\.md\)",
        message,
    ), message


@pytest.mark.parametrize(
    "env, found",
    [
        (
            {"AWS_ACCESS_KEY_ID": "AKIAEXAMPLEKEY000000"},
            "static keys: AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is missing",
        ),
        (
            {"AWS_SECRET_ACCESS_KEY": SECRET},
            "static keys: AWS_SECRET_ACCESS_KEY is set but AWS_ACCESS_KEY_ID is missing",
        ),
        (
            {"AWS_SESSION_TOKEN": SESSION},
            "a session token: AWS_SESSION_TOKEN is set but AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY are not",
        ),
        (
            {"AWS_ROLE_ARN": ROLE_ARN},
            "web identity (IRSA): AWS_ROLE_ARN is set but AWS_WEB_IDENTITY_TOKEN_FILE is not (EKS sets both in a "
            "pod whose ServiceAccount is annotated with eks.amazonaws.com/role-arn)",
        ),
    ],
    ids=["key-without-secret", "secret-without-key", "token-without-keys", "role-without-token-file"],
)
def test_half_a_way_says_what_is_missing(aws_env, env, found):
    for name, value in env.items():
        aws_env.setenv(name, value)
    message = failure(closed_port_store())
    assert re.fullmatch(
        r"no (usable )?S3 credentials (found )?for http://127\.0\.0\.1:\d+ while trying to open bucket "
        rf"'dcgan-test': found only part of one way: {re.escape(found)}.*",
        message,
    ), message


def test_a_token_file_without_a_role_says_the_annotation_is_missing(irsa):
    irsa.delenv("AWS_ROLE_ARN")
    message = failure(closed_port_store())
    assert message.endswith(
        "found only part of one way: web identity (IRSA): AWS_WEB_IDENTITY_TOKEN_FILE is set but AWS_ROLE_ARN is not "
        "(is the pods' ServiceAccount annotated with eks.amazonaws.com/role-arn?)"
    ), message


def test_irsa_without_its_token_file(irsa, tmp_path):
    irsa.setenv("AWS_WEB_IDENTITY_TOKEN_FILE", str(tmp_path / "not-mounted"))
    message = failure(closed_port_store())
    assert message.endswith(
        f"found a role by web identity (IRSA: AWS_ROLE_ARN={ROLE_ARN}), but its token file "
        f"AWS_WEB_IDENTITY_TOKEN_FILE={tmp_path / 'not-mounted'} cannot be read (FileNotFoundError): the pod's "
        "ServiceAccount token is not mounted there; is serviceAccountName set on every Ray pod (cluster/README.md)?"
    ), message


def test_irsa_refused_by_sts_names_the_trust_policy(irsa):
    with serve(403, STS_REFUSES) as sts:
        irsa.setenv("AWS_ENDPOINT_URL_STS", f"http://127.0.0.1:{sts.server_port}")
        message = failure(closed_port_store())
        assert sts.requests, "the role was not asked for"
    assert message.endswith(
        f"found a role by web identity (IRSA: AWS_ROLE_ARN={ROLE_ARN}), but STS refused it (AccessDenied): the "
        "role's trust policy must let this cluster's OIDC provider give it to the pods' ServiceAccount, "
        "system:serviceaccount:NAMESPACE:dcgan-ray (cluster/iam/irsa-trust.json)"
    ), message


def test_pod_identity_without_its_token_file(aws_env, tmp_path):
    aws_env.setenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", "http://127.0.0.1:9/v1/credentials")
    aws_env.setenv("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", str(tmp_path / "not-mounted"))
    message = failure(closed_port_store())
    assert "found a role by EKS Pod Identity (AWS_CONTAINER_CREDENTIALS_FULL_URI), but its token file " in message
    assert "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE" in message and "(FileNotFoundError)" in message


def test_pod_identity_without_an_association(aws_env, tmp_path):
    token = tmp_path / "eks-pod-identity-token"
    token.write_text(WEB_IDENTITY_TOKEN)
    aws_env.setenv("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", str(token))
    # The agent answers 400 when the pod's ServiceAccount has no pod identity association.
    with serve(400, b'{"Message":"no association"}') as agent:
        aws_env.setenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", f"http://127.0.0.1:{agent.server_port}/v1/credentials")
        message = failure(closed_port_store())
        assert agent.requests
    assert message.endswith(
        "found a role by EKS Pod Identity (AWS_CONTAINER_CREDENTIALS_FULL_URI), but the EKS Pod Identity Agent gave "
        "no credentials (CredentialRetrievalError): is the agent's add-on installed, and is there a pod identity "
        "association for this namespace's ServiceAccount dcgan-ray (cluster/README.md)?"
    ), message


# ------------------------------------------------------------------ rejections, from the real test server


def test_a_temporary_key_without_its_session_token(s3_server, aws_env):
    aws_env.setenv("AWS_ACCESS_KEY_ID", "ASIA" + "EXAMPLEKEY000000")
    aws_env.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    with pytest.raises(StorageAuthError) as info:
        Store(make_config(s3_server.endpoint, "creds").storage).check()
    message = str(info.value)
    assert re.fullmatch(
        r"S3 endpoint http://127\.0\.0\.1:\d+ rejected the credentials \(AWS_ACCESS_KEY_ID=ASIA\.\.\.\) while trying "
        r"to open bucket 'dcgan-test' \(InvalidAccessKeyId\): found static keys in the environment, but "
        r"AWS_ACCESS_KEY_ID is a temporary key \(ASIA\.\.\.\) and AWS_SESSION_TOKEN is missing: export the session "
        r"token that came with it \(SSO, an assumed role\)",
        message,
    ), message
    assert SECRET not in message


def test_a_roles_keys_on_another_s3_server(s3_server, irsa):
    """IRSA works up to the S3 request (STS hands out keys), and the message says why this server refuses them."""
    with serve(200, sts_grants("ASIA" + "ROLEKEY000000000", SECRET, SESSION)) as sts:
        irsa.setenv("AWS_ENDPOINT_URL_STS", f"http://127.0.0.1:{sts.server_port}")
        with pytest.raises(StorageAuthError) as info:
            Store(make_config(s3_server.endpoint, "creds").storage).check()
    message = str(info.value)
    assert message.startswith(f"S3 endpoint {s3_server.endpoint} rejected the credentials (role {ROLE_ARN}) "), message
    assert message.endswith(
        f"found a role by web identity (IRSA: AWS_ROLE_ARN={ROLE_ARN}), but the endpoint does not know the role's "
        "keys: they come from AWS STS, so only AWS S3 takes them (storage.endpoint: null); another S3 server needs "
        "static keys"
    ), message
    for secret in (SECRET, SESSION, WEB_IDENTITY_TOKEN):
        assert secret not in message


def test_static_keys_still_work(s3_server, aws_env):
    aws_env.setenv("AWS_ACCESS_KEY_ID", TEST_KEY)
    aws_env.setenv("AWS_SECRET_ACCESS_KEY", TEST_SECRET)
    Store(make_config(s3_server.endpoint, "creds").storage).check()
