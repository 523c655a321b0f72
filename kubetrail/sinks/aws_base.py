"""What the AWS outputs (``cloudwatch_logs``, ``s3``) share: credentials, clients, errors, templates.

**The client: aiobotocore.** Three ways were weighed: boto3 in a worker thread, botocore's
signer under kubetrail's own aiohttp requests, and aiobotocore (botocore's request model,
signer, retries and *credential chain* with aiohttp as the transport). aiobotocore wins on
what matters for a node agent:

* the credential chain is the real one, asynchronous, with refresh: environment variables,
  IRSA / web identity (``AWS_WEB_IDENTITY_TOKEN_FILE`` + ``AWS_ROLE_ARN``), EKS Pod Identity and
  ECS (container credentials), ``~/.aws/credentials`` and ``~/.aws/config`` profiles
  (``profile``), and IMDSv2 on EC2. Writing that by hand around botocore's signer would be the
  largest and least tested part of the sink; boto3 would run it in threads;
* it runs on the event loop kubetrail already has and uses aiohttp, a dependency already; boto3
  in a thread blocks a thread per call in flight and its connection pool is not asyncio's;
* the API error codes (``ResourceNotFoundException``, ``InvalidSequenceTokenException``,
  ``ThrottlingException``) come parsed, as the AWS SDKs give them to Fluent Bit's plugins.

CPU does not decide between them: ``bench/bench_aws_clients.py`` measured about 8 ms of client
CPU per PutLogEvents of 1,000 events with either (docs/benchmarks.md).

``role_arn`` (with ``external_id`` and ``sts_endpoint``) assumes a role on top of whatever the
chain found, refreshed before it expires, as Fluent Bit's ``role_arn`` does.

**Errors** (:func:`classify`), the contract of the sink runner: throttling, 5xx, timeouts and
network errors are retryable; so are the errors that say AWS refuses *this client* (no or
expired credentials, access denied, a missing log group or bucket without auto-creation):
dead-lettering every record until someone fixes an IAM policy would lose nothing only on paper.
Other client errors (a malformed request) are permanent, with AWS's code and message.

**A CA bundle that rotates** (``tls.ca_file``, for an endpoint behind a private CA: MinIO,
a VPC endpoint behind a proxy): botocore reads the bundle once, when a client is made, so
:meth:`AwsClient.refresh` (called before each batch of requests) makes a new client when the
file changed. Watching and validating are :mod:`kubetrail.core.tls_files`' (stat at most once
a second; a bundle that does not load keeps the current client, logged once, counted as
``kubetrail_secret_reload_errors_total{option="tls.ca_file"}``). Requests in flight finish on
the old client, which is closed at the next rotation or at shutdown.

**Templates** (:class:`Template`): Fluent Bit's record-accessor templates used by
``log_group_template``/``log_stream_template``: literal text with ``$key['sub']`` accessors,
``$TAG`` and ``$TAG[n]`` (the tag split on dots).
"""

from __future__ import annotations

import logging
import re
import ssl
import uuid
from collections.abc import Callable, Mapping
from contextlib import AsyncExitStack
from typing import Any

from aiobotocore.config import AioConfig
from aiobotocore.credentials import (
    AioAssumeRoleCredentialFetcher,
    AioCredentialResolver,
    AioDeferredRefreshableCredentials,
)
from aiobotocore.session import AioSession
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    NoCredentialsError,
    NoRegionError,
    PartialCredentialsError,
)
from botocore.exceptions import (
    ConnectionError as BotoConnectionError,
)

from kubetrail.core.accessor import RecordAccessor
from kubetrail.core.errors import ConfigError, PermanentError, RetryableError
from kubetrail.core.options import Option
from kubetrail.core.tls_files import ClientTls
from kubetrail.sinks.http_base import TLS_OPTIONS

AWS_OPTIONS: tuple[Option, ...] = (
    Option("region", help="AWS region (required)"),
    Option("endpoint", help="Custom API endpoint: a URL, or a host name (https is assumed)"),
    Option("role_arn", help="IAM role to assume on top of the credentials found (cross-account)"),
    Option("external_id", help="External ID for role_arn's AssumeRole"),
    Option("sts_endpoint", help="Custom STS endpoint for role_arn"),
    Option("profile", help="Profile in ~/.aws/credentials and ~/.aws/config (default: AWS_PROFILE or default)"),
    Option("auto_retry_requests", "bool", True, help="Retry a failed request once at once, before the backoff"),
    Option("extra_user_agent", help="Appended to the User-Agent (AWS's vended configs, e.g. Container Insights)"),
    Option("net.connect_timeout", "duration", 10.0, help="Time to establish a connection"),
    Option("net.io_timeout", "duration", 60.0, help="Time to wait for an answer"),
    *TLS_OPTIONS,  # tls.verify and tls.ca_file are honoured; AWS endpoints are https by their URL
)

# AWS error codes that say the service refuses this client (credentials, permissions), not the data.
REFUSED_CLIENT_CODES = frozenset(
    {
        "AccessDenied",
        "AccessDeniedException",
        "UnrecognizedClientException",
        "InvalidClientTokenId",
        "ExpiredToken",
        "ExpiredTokenException",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "IncompleteSignature",
        "MissingAuthenticationToken",
        "RequestExpired",
        "NoSuchBucket",
        "AllAccessDisabled",
    }
)
RETRYABLE_CODES = frozenset(
    {
        "ThrottlingException",
        "Throttling",
        "SlowDown",
        "ServiceUnavailableException",
        "ServiceUnavailable",
        "InternalError",
        "InternalFailure",
        "RequestTimeout",
        "RequestTimeoutException",
        "OperationAbortedException",
        "LimitExceededException",
    }
)


def endpoint_url(value: str | None, key: str = "endpoint") -> str | None:
    """Fluent Bit's ``endpoint``: a URL, or a bare host (``logs.example.com``) meaning https."""
    if not value:
        return None
    text = value.strip()
    if "://" not in text:
        text = "https://" + text
    if not re.match(r"^https?://[^/\s]+", text):
        raise ConfigError(f"bad endpoint {value!r}; expected a URL such as https://logs.example.com", key=key)
    return text


def error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def error_text(exc: ClientError) -> str:
    err = exc.response.get("Error", {})
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return f"{exc.operation_name}: {err.get('Code', '?')} (HTTP {status}): {err.get('Message', '')}".strip()


def classify(exc: Exception, what: str) -> Exception:
    """The error the sink runner should see for a failed AWS call (see the module docstring)."""
    if isinstance(exc, ClientError):
        code = error_code(exc)
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        text = f"{what}: {error_text(exc)}"
        if code in RETRYABLE_CODES or status >= 500 or status in (408, 429):
            return RetryableError(text)
        if code in REFUSED_CLIENT_CODES or status in (401, 403):
            return RetryableError(f"{text} (check the credentials, role and permissions)")
        return PermanentError(text)
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return RetryableError(
            f"{what}: no usable AWS credentials ({exc}); looked in the environment, the web identity token "
            "file (IRSA), container credentials, ~/.aws/credentials and config, and the instance metadata"
        )
    if isinstance(exc, (BotoConnectionError, HTTPClientError)):
        return RetryableError(f"{what}: {exc}")
    if isinstance(exc, BotoCoreError):
        return RetryableError(f"{what}: {type(exc).__name__}: {exc}")
    return exc


class _AssumedRoleProvider:
    """A credential provider for :class:`AioCredentialResolver`: ``role_arn`` assumed with the
    credentials of the default chain, refreshed by aiobotocore before they expire."""

    METHOD = "assume-role"
    CANONICAL_NAME = "kubetrail-assume-role"

    def __init__(self, base: AioSession, region: str, role_arn: str, external_id: str | None, sts: str | None) -> None:
        self.base = base
        self.region = region
        self.role_arn = role_arn
        self.external_id = external_id
        self.sts = sts

    async def load(self) -> Any:
        source = await self.base.get_credentials()
        if source is None:
            raise NoCredentialsError()

        def client_creator(service: str, **kwargs: Any) -> Any:
            return self.base.create_client(service, region_name=self.region, endpoint_url=self.sts, **kwargs)

        extra: dict[str, Any] = {"RoleSessionName": f"kubetrail-{uuid.uuid4().hex[:12]}"}
        if self.external_id:
            extra["ExternalId"] = self.external_id
        fetcher = AioAssumeRoleCredentialFetcher(client_creator, source, self.role_arn, extra_args=extra)
        return AioDeferredRefreshableCredentials(refresh_using=fetcher.fetch_credentials, method=self.METHOD)


class AwsClient:
    """One aiobotocore client for ``service``, built from :data:`AWS_OPTIONS` values."""

    def __init__(self, service: str, config: Mapping[str, Any], *, endpoint_key: str = "endpoint") -> None:
        region = (config.get("region") or "").strip()
        if not region:
            raise ConfigError("the AWS region is required (e.g. us-east-1)", key="region")
        self.service = service
        self.region = region
        self.endpoint = endpoint_url(config.get(endpoint_key), endpoint_key)
        self.role_arn: str | None = config.get("role_arn") or None
        self.external_id: str | None = config.get("external_id") or None
        self.sts_endpoint = endpoint_url(config.get("sts_endpoint"), "sts_endpoint")
        self.profile: str | None = config.get("profile") or None
        attempts = 2 if config.get("auto_retry_requests", True) else 1
        self.client_config = AioConfig(
            connect_timeout=float(config.get("net.connect_timeout") or 10.0),
            read_timeout=float(config.get("net.io_timeout") or 60.0),
            # The sink runner owns the backoff; botocore only does Fluent Bit's one immediate retry.
            retries={"total_max_attempts": attempts, "mode": "standard"},
            user_agent_extra=" ".join(filter(None, ["kubetrail", config.get("extra_user_agent")])),
        )
        # botocore's verify: False, a CA bundle path, or None for the system's.
        self.verify: bool | str | None = None
        if config.get("tls.verify") is False:
            self.verify = False
        elif config.get("tls.ca_file"):
            self.verify = str(config["tls.ca_file"])
        # The bundle's rotations (a ConfigError naming tls.ca_file here when it does not load).
        self.ca_file: ClientTls | None = None
        if isinstance(self.verify, str):
            path = self.verify
            self.ca_file = ClientTls({"tls.ca_file": path}, lambda: _ca_bundle(path))
        self._ca_version = 0
        self._stack: AsyncExitStack | None = None
        self._retired: list[AsyncExitStack] = []  # clients replaced by a rotation, closed later
        self.client: Any = None
        self.on_client: list[Callable[[Any], None]] = []  # run on every new client (event hooks)

    def bind(self, logger: logging.Logger, metrics: Any) -> None:
        """Log and count the CA bundle's reloads as the owning sink."""
        if self.ca_file is not None:
            self.ca_file.bind(logger, metrics)

    async def start(self) -> None:
        if self.client is not None:
            return
        try:
            session = AioSession(profile=self.profile)
        except BotoCoreError as exc:  # an unknown profile
            raise ConfigError(str(exc), key="profile") from None
        if self.role_arn:
            base = AioSession(profile=self.profile)
            provider = _AssumedRoleProvider(base, self.region, self.role_arn, self.external_id, self.sts_endpoint)
            session.register_component("credential_provider", AioCredentialResolver([provider]))
        stack = AsyncExitStack()
        try:
            self.client = await stack.enter_async_context(
                session.create_client(
                    self.service,
                    region_name=self.region,
                    endpoint_url=self.endpoint,
                    config=self.client_config,
                    verify=self.verify,
                )
            )
        except NoRegionError:
            await stack.aclose()
            raise ConfigError("the AWS region is required", key="region") from None
        except Exception:
            await stack.aclose()
            raise
        self._stack = stack
        for hook in self.on_client:
            hook(self.client)

    async def refresh(self) -> None:
        """A new client when ``tls.ca_file`` changed since this one was made (see the module
        docstring); the current one otherwise. A new client that cannot be made raises, as
        :meth:`start` does, and the current one stays."""
        if self.ca_file is None or self.client is None:
            return
        self.ca_file.context()  # stats at most once a second; a bad bundle keeps the last good
        if self.ca_file.version == self._ca_version:
            return
        current = (self.client, self._stack)
        self.client = self._stack = None
        try:
            await self.start()
        except BaseException:
            self.client, self._stack = current
            raise
        self._ca_version = self.ca_file.version
        retired, self._retired = self._retired, [current[1]] if current[1] is not None else []
        for stack in retired:
            await stack.aclose()

    async def close(self) -> None:
        stacks = [*self._retired, *([self._stack] if self._stack is not None else [])]
        self._stack, self._retired = None, []
        self.client = None
        for stack in stacks:
            await stack.aclose()


def _ca_bundle(path: str) -> ssl.SSLContext:
    """Load ``path`` as botocore will, to know that it can (the context itself is not used)."""
    try:
        return ssl.create_default_context(cafile=path)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load CA certificates from {path}: {exc}", key="tls.ca_file") from None


_TEMPLATE_PART = re.compile(r"\$TAG\[(\d+)\]|\$TAG\b|\$([A-Za-z0-9_\-@]+(?:\[\s*(?:'[^']*'|\"[^\"]*\"|\d+)\s*\])*)")


class Template:
    """Fluent Bit's record-accessor template: ``app-$kubernetes['namespace_name']-$TAG[1]``.

    :meth:`render` returns None when an accessor finds nothing (or a value that is not a string
    or number): the caller then falls back to the plain option, as Fluent Bit does.
    """

    def __init__(self, text: str, key: str) -> None:
        self.text = text
        self.parts: list[str | RecordAccessor | int] = []  # literal, accessor, or tag part (-1: whole tag)
        position = 0
        for match in _TEMPLATE_PART.finditer(text):
            if match.start() > position:
                self.parts.append(text[position : match.start()])
            if match.group(1) is not None:
                self.parts.append(int(match.group(1)))
            elif match.group(2) is None:
                self.parts.append(-1)
            else:
                try:
                    self.parts.append(RecordAccessor("$" + match.group(2)))
                except ValueError as exc:
                    raise ConfigError(str(exc), key=key) from None
            position = match.end()
        if position < len(text):
            self.parts.append(text[position:])

    @property
    def dynamic(self) -> bool:
        return any(not isinstance(part, str) for part in self.parts)

    def render(self, tag: str, body: dict[str, Any]) -> str | None:
        out = []
        for part in self.parts:
            if isinstance(part, str):
                out.append(part)
            elif isinstance(part, int):
                if part < 0:
                    out.append(tag)
                    continue
                pieces = tag.split(".")
                if part >= len(pieces):
                    return None
                out.append(pieces[part])
            else:
                value = part.get(body)
                if isinstance(value, bool) or not isinstance(value, (str, int, float)) or value == "":
                    return None
                out.append(str(value))
        return "".join(out)
