"""The ``aws`` filter: EC2 instance metadata (IMDS) added to every record, as Fluent Bit's
``filter_aws``.

Options and keys are Fluent Bit's: ``az`` and ``ec2_instance_id`` on by default,
``ec2_instance_type``, ``private_ip``, ``ami_id``, ``account_id``, ``hostname``, ``vpc_id`` off;
``tags_enabled`` adds the instance's tags (IMDS ``tags/instance``, which the instance must have
enabled), limited by ``tags_include`` or ``tags_exclude`` (comma-separated; both together is a
configuration error, as in Fluent Bit). ``imds_version v2`` (the default) first PUTs
``/latest/api/token`` with a TTL header and sends the token with every GET; ``v1`` sends plain
GETs.

Design decisions:

* The metadata is fetched once, in a task started with the pipeline, never per record: the
  instance's identity does not change while it runs. Until the fetch has succeeded, records pass
  through unchanged (as Fluent Bit's filter does while IMDS cannot be reached) and are counted in
  ``kubetrail_aws_records_without_metadata_total``; a failed fetch is retried every
  ``retry_interval_s`` seconds (Fluent Bit's option and default, 300).
* All or nothing: one attempt fetches every enabled key and the tags; a record gets either all of
  them or none, never a mix that depends on which request happened to fail.
* A bad answer (an error status, an empty value, an identity document that is not JSON, a
  refused connection) fails that attempt with a message naming the path and what was wrong. It is
  counted (``kubetrail_errors_total{type="imds"}``) and logged once as a warning per
  distinct message (later repeats at debug level), so an instance without IMDS does not fill the
  log every five minutes.
* ``imds_endpoint`` (kubetrail's addition, named in Fluent Bit's style) points the filter at
  another IMDS, e.g. a local one in tests; Fluent Bit's own tests use an environment variable.
* A key the record already has is overwritten (Fluent Bit appends a second key of the same name
  to the msgpack map, which most outputs then resolve to the last one anyway).
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson

from kubetrail.core.component import ComponentContext, Transform
from kubetrail.core.errors import ConfigError
from kubetrail.core.options import Option
from kubetrail.core.record import Record

DEFAULT_ENDPOINT = "http://169.254.169.254"
TOKEN_PATH = "/latest/api/token"
TOKEN_TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aws-ec2-metadata-token"
TOKEN_TTL_S = 21600  # Fluent Bit's (6 h); the token is used only during one fetch
REQUEST_TIMEOUT_S = 5.0
IDENTITY_DOCUMENT = "/latest/dynamic/instance-identity/document"
TAGS_PATH = "/latest/meta-data/tags/instance"

# Record key -> IMDS path, in the order Fluent Bit adds them. vpc_id and account_id need two
# steps and are handled in _fetch.
SIMPLE_KEYS: dict[str, str] = {
    "az": "/latest/meta-data/placement/availability-zone",
    "ec2_instance_id": "/latest/meta-data/instance-id",
    "ec2_instance_type": "/latest/meta-data/instance-type",
    "private_ip": "/latest/meta-data/local-ipv4",
    "ami_id": "/latest/meta-data/ami-id",
    "hostname": "/latest/meta-data/hostname",
}
KEY_ORDER = ("az", "ec2_instance_id", "ec2_instance_type", "private_ip", "vpc_id", "ami_id", "account_id", "hostname")


class ImdsError(Exception):
    """One failed IMDS request, with what was wrong."""


class NotFound(ImdsError):
    """IMDS answered 404: for the tag list, no tags (not an error)."""


def _tag_list(text: str | None) -> frozenset[str] | None:
    if text is None:
        return None
    return frozenset(name.strip() for name in text.split(",") if name.strip())


class AwsTransform(Transform):
    plugin_name = "aws"
    description = "Adds EC2 instance metadata (availability zone, instance id, tags, ...) from IMDS"
    options = (
        Option("imds_version", "choice", "v2", choices=("v1", "v2"), help="v2: session token first; v1: plain GETs"),
        Option("az", "bool", True, help="Add the availability zone as az"),
        Option("ec2_instance_id", "bool", True, help="Add the instance id as ec2_instance_id"),
        Option("ec2_instance_type", "bool", False, help="Add the instance type as ec2_instance_type"),
        Option("private_ip", "bool", False, help="Add the private IPv4 address as private_ip"),
        Option("ami_id", "bool", False, help="Add the image id as ami_id"),
        Option("account_id", "bool", False, help="Add the account id as account_id"),
        Option("hostname", "bool", False, help="Add the instance's private hostname as hostname"),
        Option("vpc_id", "bool", False, help="Add the VPC id as vpc_id"),
        Option("tags_enabled", "bool", False, help="Add the instance's tags (needs instance metadata tags on)"),
        Option("tags_include", help="Comma-separated tag names: only these are added"),
        Option("tags_exclude", help="Comma-separated tag names: these are not added"),
        Option("retry_interval_s", "int", 300, help="Seconds between attempts while IMDS cannot be read"),
        Option("imds_endpoint", "str", DEFAULT_ENDPOINT, help="IMDS base URL (kubetrail's addition, for tests)"),
    )

    def __init__(self, ctx: ComponentContext, config: dict[str, Any]) -> None:
        super().__init__(ctx, config)
        self.v2: bool = config["imds_version"] == "v2"
        self.keys = tuple(key for key in KEY_ORDER if config[key])
        self.tags_enabled: bool = config["tags_enabled"]
        self.tags_include = _tag_list(config["tags_include"])
        self.tags_exclude = _tag_list(config["tags_exclude"])
        if self.tags_include is not None and self.tags_exclude is not None:
            raise ConfigError("tags_include and tags_exclude cannot both be set (Fluent Bit refuses it too)")
        self.retry_interval: int = config["retry_interval_s"]
        if self.retry_interval < 1:
            raise ConfigError(f"bad value {self.retry_interval}; expected at least 1 second", key="retry_interval_s")
        endpoint: str = config["imds_endpoint"]
        if not endpoint.startswith(("http://", "https://")):
            raise ConfigError(f"bad value {endpoint!r}; expected an http:// or https:// URL", key="imds_endpoint")
        self.endpoint = endpoint.rstrip("/")
        self.fields: dict[str, str] | None = None  # None until a fetch succeeded
        self.attempts = 0
        self._logged: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        self._without = ctx.metrics.counter(
            "kubetrail_aws_records_without_metadata_total",
            "Records that passed the aws filter unchanged because the instance metadata was not known yet",
        )

    # -- the records ----------------------------------------------------------------------

    def process(self, records: list[Record]) -> list[Record]:
        fields = self.fields
        if fields is None:
            self._without.inc(len(records))
            return records
        for record in records:
            record.mutable_body().update(fields)
        return records

    # -- fetching -----------------------------------------------------------------------------

    async def start(self) -> None:
        self._task = asyncio.create_task(self._fetch_until_known(), name=f"aws-imds-{self.ctx.component_id}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def _fetch_until_known(self) -> None:
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                self.attempts += 1
                try:
                    self.fields = await self._fetch(session)
                except ImdsError as exc:
                    self._failed(str(exc))
                else:
                    self.log.info(
                        "instance metadata from %s: %s",
                        self.endpoint,
                        ", ".join(self.fields),
                        extra={"component": self.ctx.component_id},
                    )
                    return
                await asyncio.sleep(self.retry_interval)

    def _failed(self, message: str) -> None:
        self.metrics.error("imds")
        self._warn_once(
            f"cannot read the instance metadata (records pass unchanged; retrying every "
            f"{self.retry_interval} s): {message}"
        )

    def _warn_once(self, message: str) -> None:
        # Once per distinct problem: IMDS down for an hour is one warning, not twelve.
        level = self.log.debug if message in self._logged else self.log.warning
        self._logged.add(message)
        level("%s", message, extra={"component": self.ctx.component_id})

    async def _fetch(self, session: aiohttp.ClientSession) -> dict[str, str]:
        headers: dict[str, str] = {}
        if self.v2:
            headers[TOKEN_HEADER] = await self._request(
                session, "PUT", TOKEN_PATH, {TOKEN_TTL_HEADER: str(TOKEN_TTL_S)}
            )
        fields: dict[str, str] = {}
        for key in self.keys:
            if key in SIMPLE_KEYS:
                fields[key] = await self._request(session, "GET", SIMPLE_KEYS[key], headers)
            elif key == "vpc_id":
                mac = await self._request(session, "GET", "/latest/meta-data/mac", headers)
                path = f"/latest/meta-data/network/interfaces/macs/{mac}/vpc-id"
                fields[key] = await self._request(session, "GET", path, headers)
            elif key == "account_id":
                fields[key] = self._account_id(await self._request(session, "GET", IDENTITY_DOCUMENT, headers))
        if self.tags_enabled:
            fields.update(await self._tags(session, headers))
        return fields

    @staticmethod
    def _account_id(document: str) -> str:
        try:
            parsed = orjson.loads(document)
        except orjson.JSONDecodeError as exc:
            raise ImdsError(f"{IDENTITY_DOCUMENT}: not a JSON document ({exc})") from None
        account = parsed.get("accountId") if isinstance(parsed, dict) else None
        if not isinstance(account, str) or not account:
            raise ImdsError(f"{IDENTITY_DOCUMENT}: no accountId string in the document")
        return account

    async def _tags(self, session: aiohttp.ClientSession, headers: dict[str, str]) -> dict[str, str]:
        try:
            listing = await self._request(session, "GET", TAGS_PATH, headers)
        except NotFound:
            # Fluent Bit's reading of a 404 too: no tags, or the instance does not expose them
            # (instance metadata tags off); said once, the other keys are added all the same.
            self._warn_once(f"GET {self.endpoint}{TAGS_PATH}: 404: the instance has no tags or does not expose them")
            return {}
        names = [n.strip() for n in listing.splitlines()]
        tags: dict[str, str] = {}
        for name in names:
            if not name:
                continue
            if self.tags_include is not None and name not in self.tags_include:
                continue
            if self.tags_exclude is not None and name in self.tags_exclude:
                continue
            # An empty tag value is legal in EC2, unlike an empty instance id.
            tags[name] = await self._request(session, "GET", f"{TAGS_PATH}/{name}", headers, allow_empty=True)
        return tags

    async def _request(
        self,
        session: aiohttp.ClientSession,
        method: str,
        path: str,
        headers: dict[str, str],
        *,
        allow_empty: bool = False,
    ) -> str:
        url = self.endpoint + path
        try:
            async with session.request(method, url, headers=headers) as response:
                body = await response.read()
                status = response.status
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise ImdsError(f"{method} {url}: {type(exc).__name__}: {exc}") from None
        if status == 404:
            raise NotFound(f"{method} {url}: HTTP 404")
        if status != 200:
            raise ImdsError(f"{method} {url}: HTTP {status}: {body[:200].decode('utf-8', 'replace')}")
        try:
            text = body.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise ImdsError(f"{method} {url}: the answer is not UTF-8 text") from None
        if not text and not allow_empty:
            raise ImdsError(f"{method} {url}: empty answer")
        return text
