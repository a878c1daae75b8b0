"""The three ways a process gets its S3 credentials, and what a credential failure says about them.

boto3's default chain finds the credentials on each process (`dcgan_ray.storage.s3`). This module only names
what it found, so that a failure says in one line which of the three ways was set up and what is missing:

1. **static keys**: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, in the environment (a Kubernetes Secret
   puts them there) or a shared credentials file;
2. **a session token**: the same plus AWS_SESSION_TOKEN (IAM Identity Center / SSO, an assumed role). Such
   keys are temporary: they expire, after 1 to 12 hours as AWS's IAM documentation sets a role's session;
3. **a role** that the platform hands out and renews: web identity (IRSA on EKS: AWS_ROLE_ARN and
   AWS_WEB_IDENTITY_TOKEN_FILE, from the pod's ServiceAccount), EKS Pod Identity
   (AWS_CONTAINER_CREDENTIALS_FULL_URI and AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE), or an EC2 instance role.

A message holds variable names, an access key id cut to 4 characters, a role ARN and file paths: never a
secret key, a session token or a web identity token.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import botocore.credentials
import botocore.exceptions

from dcgan_ray.errors import StorageAuthError

STATIC_KEYS = "static keys"
SESSION_TOKEN = "a session token"
ROLE = "a role"

THE_THREE_WAYS = (
    "static keys (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_SHARED_CREDENTIALS_FILE), a session token "
    "(the same plus AWS_SESSION_TOKEN), or a role (IRSA or EKS Pod Identity through the pods' ServiceAccount, or "
    "an instance role)"
)

POLICY_FILE = "cluster/iam/s3-policy.json"
IRSA_TRUST_FILE = "cluster/iam/irsa-trust.json"

# botocore's failures while it finds or fetches credentials (before any request reaches the endpoint).
RESOLUTION_ERRORS: tuple[type[Exception], ...] = (
    botocore.exceptions.PartialCredentialsError,
    botocore.exceptions.CredentialRetrievalError,
    botocore.exceptions.InvalidConfigError,
    botocore.exceptions.TokenRetrievalError,
    botocore.exceptions.SSOError,
    botocore.exceptions.ProfileNotFound,
    botocore.exceptions.MetadataRetrievalError,
)
# STS operations that turn a role into credentials: a ClientError of theirs is a refused role, not a refused
# S3 request.
STS_OPERATIONS = {"AssumeRoleWithWebIdentity", "AssumeRole"}


@dataclass(frozen=True)
class Way:
    """One of the three ways, as found: `kind` is STATIC_KEYS, SESSION_TOKEN or ROLE; `source` says where
    (for a message: "in the environment", "by web identity (IRSA: AWS_ROLE_ARN=...)"); `hint` is the short
    name of the credential that a rejection names in parentheses."""

    kind: str
    source: str
    hint: str

    def found(self) -> str:
        return f"found {self.kind} {self.source}"


def key_hint(env: Mapping[str, str]) -> str:
    """The access key id, shortened: enough to spot the wrong one (or a temporary ASIA... key), not a secret."""
    key = env.get("AWS_ACCESS_KEY_ID", "")
    return f"AWS_ACCESS_KEY_ID={key[:4]}..." if key else "AWS_ACCESS_KEY_ID=<unset>"


def _has_session_token(env: Mapping[str, str]) -> bool:
    return bool(env.get("AWS_SESSION_TOKEN") or env.get("AWS_SECURITY_TOKEN"))  # botocore reads both names


def _profile(env: Mapping[str, str]) -> str:
    return env.get("AWS_PROFILE") or env.get("AWS_DEFAULT_PROFILE") or "default"


def way_of(method: str | None, env: Mapping[str, str], file_has_token: bool = False) -> Way:
    """The way behind botocore's credential `method` (Credentials.method); `file_has_token` for keys read
    from a credentials or config file."""
    if method == "env":
        kind = SESSION_TOKEN if _has_session_token(env) else STATIC_KEYS
        return Way(kind, "in the environment", key_hint(env))
    profile = f"profile {_profile(env)}"
    if method in ("shared-credentials-file", "config-file"):
        kind = SESSION_TOKEN if file_has_token else STATIC_KEYS
        return Way(kind, f"in the AWS {method.split('-')[-2]} file ({profile})", profile)
    if method in ("sso", "login"):
        return Way(SESSION_TOKEN, f"by SSO ({profile})", profile)
    if method in ("assume-role", "custom-process"):
        return Way(SESSION_TOKEN, f"by the AWS config file's {method} ({profile})", profile)
    if method == "assume-role-with-web-identity":
        role = env.get("AWS_ROLE_ARN", "<the profile's role_arn>")
        return Way(ROLE, f"by web identity (IRSA: AWS_ROLE_ARN={role})", f"role {role}")
    if method == "container-role":
        return Way(ROLE, "by EKS Pod Identity (AWS_CONTAINER_CREDENTIALS_FULL_URI)", "EKS Pod Identity")
    if method == "iam-role":
        return Way(ROLE, "as the EC2 instance role (instance metadata)", "the instance role")
    return Way("credentials", f"by botocore's {method or 'unknown'} provider", method or "unknown")


def partial(env: Mapping[str, str]) -> list[str]:
    """Each way that is half set up in `env`, as "<way>: X is set but Y is missing"."""
    found = []
    key, secret = "AWS_ACCESS_KEY_ID" in env, "AWS_SECRET_ACCESS_KEY" in env
    if key != secret:
        have, lack = sorted(("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"), key=lambda name: name not in env)
        found.append(f"static keys: {have} is set but {lack} is missing")
    if _has_session_token(env) and not (key and secret):
        found.append(
            "a session token: AWS_SESSION_TOKEN is set but AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY are not"
        )
    role, token_file = env.get("AWS_ROLE_ARN"), env.get("AWS_WEB_IDENTITY_TOKEN_FILE")
    if role and not token_file:
        found.append(
            "web identity (IRSA): AWS_ROLE_ARN is set but AWS_WEB_IDENTITY_TOKEN_FILE is not (EKS sets both in a "
            "pod whose ServiceAccount is annotated with eks.amazonaws.com/role-arn)"
        )
    if token_file and not role:
        found.append(
            "web identity (IRSA): AWS_WEB_IDENTITY_TOKEN_FILE is set but AWS_ROLE_ARN is not (is the pods' "
            "ServiceAccount annotated with eks.amazonaws.com/role-arn?)"
        )
    uri, pod_token = env.get("AWS_CONTAINER_CREDENTIALS_FULL_URI"), env.get("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE")
    if pod_token and not uri:
        found.append(
            "EKS Pod Identity: AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE is set but AWS_CONTAINER_CREDENTIALS_FULL_URI "
            "is not"
        )
    return found


def none_found(env: Mapping[str, str]) -> str:
    """What to say when botocore found no complete credentials: what is half set up, and the three ways."""
    half = partial(env)
    found = f"found only part of one way: {'; '.join(half)}" if half else "none of the three ways is set up"
    return f"{found}. Give this process and every Ray node one of them: {THE_THREE_WAYS} (cluster/README.md)"


def _role_in_env(env: Mapping[str, str]) -> Way | None:
    """The role way that `env` sets up, whose fetch can fail before any S3 request (botocore's order: web
    identity before a container's credentials)."""
    if env.get("AWS_WEB_IDENTITY_TOKEN_FILE"):
        return way_of("assume-role-with-web-identity", env)
    if env.get("AWS_CONTAINER_CREDENTIALS_FULL_URI") or env.get("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"):
        return way_of("container-role", env)
    return None


def token_file_of(error: OSError, env: Mapping[str, str]) -> str | None:
    """The environment variable naming the token file that `error` failed to read, if it is one of them."""
    for name in ("AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"):
        if env.get(name) and error.filename == env[name]:
            return name
    return None


def unusable(error: Exception, env: Mapping[str, str]) -> str:
    """What to say when the credentials could not be had at all: the way that was found, and what failed."""
    kind = type(error).__name__
    if isinstance(error, OSError) and (name := token_file_of(error, env)):
        method = "assume-role-with-web-identity" if name == "AWS_WEB_IDENTITY_TOKEN_FILE" else "container-role"
        way = way_of(method, env)
        return (
            f"{way.found()}, but its token file {name}={env[name]} cannot be read ({kind}): the pod's ServiceAccount "
            "token is not mounted there; is serviceAccountName set on every Ray pod (cluster/README.md)?"
        )
    if isinstance(error, botocore.exceptions.PartialCredentialsError) or (
        isinstance(error, botocore.exceptions.InvalidConfigError) and partial(env)
    ):
        return f"found only part of one way: {'; '.join(partial(env)) or str(error)}"
    if isinstance(error, (botocore.exceptions.TokenRetrievalError, botocore.exceptions.SSOError)):
        return (
            f"{way_of('sso', env).found()}, but its SSO session cannot give keys ({kind}): run `aws sso login`, or "
            "export AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN"
        )
    role = _role_in_env(env)
    if isinstance(error, botocore.exceptions.ClientError):
        code = str(error.response.get("Error", {}).get("Code", "?"))
        if role is None:
            return (
                f"{way_of('assume-role', env).found()}, but STS refused it ({code}): the role's trust policy must "
                "let the profile's source credentials assume it"
            )
        return (
            f"{role.found()}, but STS refused it ({code}): the role's trust policy must let this cluster's OIDC "
            "provider give it to the pods' ServiceAccount, system:serviceaccount:NAMESPACE:dcgan-ray "
            f"({IRSA_TRUST_FILE})"
        )
    if role is not None and role.hint == "EKS Pod Identity":
        return (
            f"{role.found()}, but the EKS Pod Identity Agent gave no credentials ({kind}): is the agent's add-on "
            "installed, and is there a pod identity association for this namespace's ServiceAccount dcgan-ray "
            "(cluster/README.md)?"
        )
    if role is not None:
        return f"{role.found()}, but fetching its credentials failed ({kind})"
    return f"botocore could not load the credentials ({kind}); {none_found(env)}"


def rejected(way: Way, code: str, env: Mapping[str, str], resource: str) -> str:
    """What is missing when the endpoint refused `way`'s credentials with `code`; `resource` is what the
    policy must allow (bucket and prefix)."""
    temporary_key = env.get("AWS_ACCESS_KEY_ID", "").startswith("ASIA")
    if code in ("ExpiredToken", "TokenRefreshRequired"):
        if way.kind == SESSION_TOKEN:
            return (
                f"{way.found()} and it has expired: renew it (`aws sso login`, or assume the role again) and give "
                "every Ray node the new three values; a job that outlasts a session (1 to 12 h) needs a role "
                "that the platform renews (IRSA, EKS Pod Identity, an instance role)"
            )
        return f"{way.found()} and its credentials expired without being renewed: check the node's clock"
    if code == "InvalidToken":
        return (
            f"{way.found()} but the endpoint cannot read AWS_SESSION_TOKEN: export AWS_ACCESS_KEY_ID, "
            "AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN of one and the same session"
        )
    if code == "InvalidAccessKeyId" and way.kind == STATIC_KEYS and temporary_key:
        return (
            f"{way.found()}, but AWS_ACCESS_KEY_ID is a temporary key (ASIA...) and AWS_SESSION_TOKEN is missing: "
            "export the session token that came with it (SSO, an assumed role)"
        )
    if code == "InvalidAccessKeyId" and way.kind == SESSION_TOKEN:
        return (
            f"{way.found()}, but the endpoint does not know its key: the session may have ended; export a fresh "
            "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN"
        )
    if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch") and way.kind == ROLE:
        return (
            f"{way.found()}, but the endpoint does not know the role's keys: they come from AWS STS, so only AWS S3 "
            "takes them (storage.endpoint: null); another S3 server needs static keys"
        )
    if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch"):
        return (
            f"{way.found()}: check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, that they belong together and "
            "to this endpoint, and that this key may access the bucket"
        )
    return (
        f"{way.found()}, which may not do this: it needs s3:ListBucket on the bucket and s3:GetObject, "
        f"s3:PutObject, s3:DeleteObject under {resource} ({POLICY_FILE})"
    )


def way_of_session(session: Any) -> Way:
    """Which of the three ways a boto3 session's credentials came by (no request: the session has them)."""
    found = session.get_credentials()
    method = getattr(found, "method", None)
    # Keys read from a file are plain Credentials, whose token is an attribute: reading it fetches nothing.
    from_file = type(found) is botocore.credentials.Credentials and bool(found.token)
    return way_of(method, os.environ, file_has_token=from_file)


def check_session(session: Any, endpoint: str, what: str, target: str) -> None:
    """Resolve a boto3 session's credentials, and fetch a role's, before the first request: a failure names
    the way found and what is missing, in one line (StorageAuthError)."""
    try:
        found = session.get_credentials()
        if found is not None:
            found.get_frozen_credentials()  # a role's first fetch (STS, the Pod Identity agent) happens here
    except botocore.exceptions.ClientError as e:  # STS refused the role
        raise StorageAuthError(unusable_message(endpoint, what, target, e)) from None
    except (*RESOLUTION_ERRORS, botocore.exceptions.BotoCoreError, OSError) as e:
        raise StorageAuthError(unusable_message(endpoint, what, target, e)) from None
    if found is None:
        raise StorageAuthError(none_found_message(endpoint, what, target))


def none_found_message(endpoint: str, what: str, target: str) -> str:
    return f"no S3 credentials found for {endpoint} while trying to {what} {target}: " + none_found(os.environ)


def unusable_message(endpoint: str, what: str, target: str, error: Exception) -> str:
    return f"no usable S3 credentials for {endpoint} while trying to {what} {target}: " + unusable(error, os.environ)
