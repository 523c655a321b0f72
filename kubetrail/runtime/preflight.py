"""``kubetrail check --in-cluster``: can this process do what its configuration asks, from here?

Run inside the pod (the Helm chart's ``helm test`` does), it checks, one line each:

* the files a plugin will read (service-account token and CA, TLS and token files of the audit
  receiver) exist and are readable;
* the directories it will write (``db``, ``storage.path``, a ``file`` output's path) are writable;
* the API server answers with those credentials (``/version``), and who it takes us for;
* every permission the configured plugins use (``Component.api_access``) is granted, asked with a
  ``SelfSubjectAccessReview``; a refusal names the RBAC rule to add;
* every network output's ``host:port`` (and every kafka input's and output's bootstrap broker)
  accepts a TCP connection, and optional extra URLs
  (``--expect-url``, e.g. the metrics endpoint of a running replica) answer 2xx.

Nothing is sent through the pipeline and nothing is changed in the cluster. The checks are
independent: one failing does not hide the others.
"""

from __future__ import annotations

import asyncio
import glob
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from kubetrail.core.component import ApiAccess
from kubetrail.kube.client import ApiError, KubeClient
from kubetrail.kube.config import ConnectionConfig

log = logging.getLogger("kubetrail.preflight")
TIMEOUT = 5.0


@dataclass
class Check:
    ok: bool
    name: str
    detail: str

    def line(self) -> str:
        return f"{'ok  ' if self.ok else 'FAIL'}  {self.name}: {self.detail}"


def _readable(name: str, path: str) -> Check:
    if not os.path.exists(path):
        return Check(False, name, f"{path} does not exist")
    if not os.access(path, os.R_OK):
        return Check(False, name, f"{path} is not readable by uid {os.getuid()}")
    return Check(True, name, f"{path} readable")


def _writable_dir(name: str, directory: Path) -> Check:
    """The directory (or the nearest existing parent, which kubetrail creates it under)."""
    probe = directory
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not os.access(probe, os.W_OK | os.X_OK):
        return Check(False, name, f"{directory} is not writable by uid {os.getuid()} ({probe} refuses)")
    return Check(True, name, f"{directory} writable")


def _file_checks(pipeline: Any) -> list[Check]:
    checks: list[Check] = []
    storage = pipeline.service.get("storage.path")
    if storage:
        checks.append(_writable_dir("storage.path", Path(storage)))
    for built in [*pipeline.sources, *pipeline.transforms, *pipeline.sinks]:
        cfg = built.config
        cid = built.component_id
        if cfg.get("db"):
            checks.append(_writable_dir(f"{cid} db", Path(cfg["db"]).parent))
        for key in ("tls.crt_file", "tls.key_file", "tls.ca_file", "bearer_token_file"):
            if built.kind == "input" and cfg.get(key):
                checks.append(_readable(f"{cid} {key}", cfg[key]))
        if built.plugin == "tail":
            checks += _tail_checks(cid, cfg)
        if built.plugin == "file" and cfg.get("path"):
            checks.append(_writable_dir(f"{cid} path", Path(cfg["path"])))
    return checks


def _tail_checks(cid: str, cfg: dict[str, Any]) -> list[Check]:
    checks = []
    for pattern in cfg.get("path") or []:
        directory = os.path.dirname(pattern) or "."
        if not os.access(directory, os.R_OK | os.X_OK):
            checks.append(Check(False, f"{cid} path", f"{directory} cannot be listed by uid {os.getuid()}"))
            continue
        matches = glob.glob(pattern)
        unreadable = [m for m in matches if not os.access(m, os.R_OK)]
        if unreadable:
            checks.append(
                Check(
                    False, f"{cid} path", f"{len(unreadable)} of {len(matches)} files unreadable, e.g. {unreadable[0]}"
                )
            )
        else:
            checks.append(Check(True, f"{cid} path", f"{pattern}: {len(matches)} files, all readable"))
    return checks


async def _api_checks(connection: ConnectionConfig, needs: list[tuple[str, ApiAccess]]) -> list[Check]:
    checks: list[Check] = []
    name = f"kubernetes api {connection.url}"
    for key, path in (("token", connection.token_file), ("ca", connection.ca_file)):
        if path:
            check = _readable(f"{name} {key}", path)
            if not check.ok:
                return [check]
            checks.append(check)
    if not connection.token_file and not connection.client_cert_file:
        checks.append(Check(False, f"{name} credentials", "no token file and no client certificate: anonymous"))
    client = KubeClient(connection, log)
    try:
        try:
            version = await client.request("GET", "/version", timeout=TIMEOUT)
        except (TimeoutError, ApiError, aiohttp.ClientError, OSError) as exc:
            return [*checks, Check(False, name, f"not reachable: {exc or type(exc).__name__}")]
        who = await _whoami(client)
        checks.append(Check(True, name, f"reachable, {version.get('gitVersion', '?')}, as {who}"))
        for cid, access in needs:
            checks.append(await _access_check(client, cid, access, who))
    finally:
        await client.close()
    return checks


async def _whoami(client: KubeClient) -> str:
    body = {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}
    try:
        review = await client.request(
            "POST", "/apis/authentication.k8s.io/v1/selfsubjectreviews", body=body, timeout=TIMEOUT
        )
    except (TimeoutError, ApiError, aiohttp.ClientError, OSError):
        return "(unknown user)"
    return str(review.get("status", {}).get("userInfo", {}).get("username", "(unknown user)"))


async def _access_check(client: KubeClient, cid: str, access: ApiAccess, who: str) -> Check:
    attributes = {"verb": access.verb, "group": access.group, "resource": access.resource}
    if access.namespace:
        attributes["namespace"] = access.namespace
    if access.name:
        attributes["name"] = access.name
    body = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SelfSubjectAccessReview",
        "spec": {"resourceAttributes": attributes},
    }
    where = f"in namespace {access.namespace}" if access.namespace else "in all namespaces"
    resource = f"{access.group}/{access.resource}" if access.group else access.resource
    if access.name:
        resource += f" {access.name}"
    name = f"{cid} rbac"
    try:
        review = await client.request(
            "POST", "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews", body=body, timeout=TIMEOUT
        )
    except (TimeoutError, ApiError, aiohttp.ClientError, OSError) as exc:
        return Check(False, name, f"cannot ask whether {access.verb} {resource} is allowed: {exc}")
    if review.get("status", {}).get("allowed"):
        return Check(True, name, f"{access.verb} {resource} {where}")
    kind = f"a Role in namespace {access.namespace}" if access.namespace else "a ClusterRole"
    return Check(
        False,
        name,
        f"{access.verb} {resource} {where} is denied to {who}: add {access.rule()} to {kind} bound to it",
    )


async def _tcp_check(name: str, host: str, port: int) -> Check:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), TIMEOUT)
    except (TimeoutError, OSError) as exc:
        return Check(False, name, f"{host}:{port} not reachable: {exc or type(exc).__name__}")
    writer.close()
    return Check(True, name, f"{host}:{port} accepts connections")


async def _url_check(url: str) -> Check:
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(url, timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as response,
        ):
            return Check(200 <= response.status < 300, f"url {url}", f"HTTP {response.status}")
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        return Check(False, f"url {url}", f"no answer: {exc or type(exc).__name__}")


KINDS = ("files", "api", "outputs", "urls")


async def run_preflight(pipeline: Any, expect_urls: Iterable[str] = (), kinds: Iterable[str] = KINDS) -> list[Check]:
    """The checks of ``kinds`` for the built (not started) ``pipeline``. Leaving out ``files``
    suits a pod that has the part's credentials but not its host mounts (the chart's helm test)."""
    kinds = set(kinds)
    checks = _file_checks(pipeline) if "files" in kinds else []
    by_connection: dict[tuple[Any, ...], tuple[ConnectionConfig, list[tuple[str, ApiAccess]]]] = {}
    for built in [*pipeline.sources, *pipeline.transforms] if "api" in kinds else []:
        needs = built.instance.api_access()
        if not needs:
            continue
        conn: ConnectionConfig = built.instance.connection
        key = (conn.url, conn.token_file, conn.ca_file, conn.client_cert_file)
        entry = by_connection.setdefault(key, (conn, []))
        entry[1].extend((built.component_id, access) for access in needs)
    for conn, needs in by_connection.values():
        checks += await _api_checks(conn, needs)
    tasks = []
    for built in pipeline.sinks if "outputs" in kinds else []:
        host, port = built.config.get("host"), built.config.get("port")
        if host and port:
            tasks.append(_tcp_check(f"{built.component_id} output", str(host), int(port)))
    for built in [*pipeline.sources, *pipeline.sinks] if "outputs" in kinds else []:
        # kafka: every bootstrap broker (a wrong one is otherwise only a client log line)
        for address in str(built.config.get("brokers") or "").split(","):
            host, _, port = address.strip().rpartition(":")
            if host and port.isdigit():
                tasks.append(_tcp_check(f"{built.component_id} broker", host.strip("[]"), int(port)))
    if "urls" in kinds:
        tasks += [_url_check(url) for url in expect_urls]
    checks += await asyncio.gather(*tasks)
    return checks
