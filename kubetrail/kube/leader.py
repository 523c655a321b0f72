"""Leader election on a ``coordination.k8s.io/v1`` Lease, the way client-go does it.

* Expiry is judged by *local* observation time (when this replica last saw the lease record
  change), never by comparing its clock with the holder's ``renewTime``: replicas' clocks differ.
* The leader renews every ``retry_period``; if it cannot renew for ``renew_deadline`` (shorter
  than ``lease_duration``) it gives up leadership and its work is cancelled, so it has stopped
  before any other replica may consider the lease expired.
* The lease also carries the work's checkpoint (an annotation), written at every renewal, so a
  new leader on another machine resumes where the old one stopped.

RBAC needed: ``get``, ``create``, ``update`` on ``leases`` in the lease's namespace.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import aiohttp
import orjson

from kubetrail.kube.client import ApiError, KubeClient
from kubetrail.kube.credentials import CredentialError

CHECKPOINT_ANNOTATION = "kubetrail.io/checkpoint"


def _micro_time() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    def __init__(
        self,
        client: KubeClient,
        namespace: str,
        name: str,
        identity: str,
        lease_duration: float,
        renew_deadline: float,
        retry_period: float,
        logger: logging.Logger,
        checkpoint: Callable[[], dict[str, str]] = dict,
    ) -> None:
        self.client = client
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.lease_duration = lease_duration
        self.renew_deadline = renew_deadline
        self.retry_period = retry_period
        self.log = logger
        self.checkpoint = checkpoint
        self.adopted_checkpoint: dict[str, str] = {}
        self._observed: tuple[Any, ...] | None = None
        self._observed_at = 0.0
        self._last_renew = -1e9
        self._leading = False
        self._lease: dict[str, Any] | None = None  # the lease as last written by us
        self._checkpoint_task: asyncio.Task[None] | None = None
        self._checkpoint_dirty = False

    @property
    def path(self) -> str:
        return f"/apis/coordination.k8s.io/v1/namespaces/{self.namespace}/leases/{self.name}"

    def is_leader(self) -> bool:
        return self._leading and time.monotonic() - self._last_renew < self.renew_deadline

    async def acquire(self, stop: asyncio.Event) -> bool:
        """Wait until this replica holds the lease (True) or ``stop`` is set (False)."""
        self.log.info(
            "waiting for leadership", extra={"lease": f"{self.namespace}/{self.name}", "identity": self.identity}
        )
        while not stop.is_set():
            if await self._try_acquire_or_renew():
                self._leading = True
                self.log.info(
                    "became leader", extra={"lease": f"{self.namespace}/{self.name}", "identity": self.identity}
                )
                return True
            try:
                await asyncio.wait_for(stop.wait(), self.retry_period * random.uniform(1.0, 1.2))
            except TimeoutError:
                pass
        return False

    async def hold(self, stop: asyncio.Event) -> None:
        """Renew until leadership is lost (returns) or ``stop`` is set (returns)."""
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), self.retry_period)
                return
            except TimeoutError:
                pass
            renewed = await self._try_acquire_or_renew()
            if not renewed and time.monotonic() - self._last_renew >= self.renew_deadline:
                self._leading = False
                self.log.warning(
                    "lost leadership: could not renew within renew_deadline; stopping work",
                    extra={"renew_deadline": self.renew_deadline},
                )
                return
            if not self._leading:
                return

    def checkpoint_changed(self) -> None:
        """The work's checkpoint moved: write it into the lease soon (one write in flight).

        Waiting for the next renewal would widen the window in which a new leader replays what
        the old one had already delivered; writing right away narrows it to one API call.
        """
        self._checkpoint_dirty = True
        if self._leading and (self._checkpoint_task is None or self._checkpoint_task.done()):
            self._checkpoint_task = asyncio.create_task(self._flush_checkpoint())

    async def _flush_checkpoint(self) -> None:
        while self._checkpoint_dirty and self._leading and self._lease is not None:
            self._checkpoint_dirty = False
            lease = self._lease
            self._write_checkpoint(lease)
            try:
                self._lease = await self.client.request("PUT", self.path, body=lease, timeout=5)
            except ApiError as exc:
                if exc.status == 409:  # a renewal raced us: take the fresh copy and try again
                    try:
                        fresh = await self.client.request("GET", self.path, timeout=5)
                    except (ApiError, CredentialError, aiohttp.ClientError, OSError, TimeoutError):
                        return
                    if (fresh.get("spec") or {}).get("holderIdentity") != self.identity:
                        return
                    self._lease = fresh
                    self._checkpoint_dirty = True
                    continue
                return  # the next renewal writes it
            except (CredentialError, aiohttp.ClientError, OSError, TimeoutError):
                return

    async def release(self) -> None:
        """Hand the lease back on shutdown (with a final checkpoint) so a standby takes over at once."""
        if not self._leading:
            return
        if self._checkpoint_task is not None:
            await asyncio.gather(self._checkpoint_task, return_exceptions=True)
        self._leading = False
        try:
            lease = await self.client.request("GET", self.path, timeout=5)
            spec = lease.get("spec") or {}
            if spec.get("holderIdentity") != self.identity:
                return
            spec["holderIdentity"] = ""
            spec["leaseDurationSeconds"] = 1
            self._write_checkpoint(lease)
            await self.client.request("PUT", self.path, body=lease, timeout=5)
            self.log.info("released leadership")
        except (ApiError, CredentialError, aiohttp.ClientError, OSError, TimeoutError) as exc:
            self.log.warning("could not release the lease; it will expire", extra={"error": str(exc)})

    def _write_checkpoint(self, lease: dict[str, Any]) -> None:
        checkpoint = self.checkpoint()
        if checkpoint:
            annotations = lease.setdefault("metadata", {}).setdefault("annotations", {})
            annotations[CHECKPOINT_ANNOTATION] = orjson.dumps(checkpoint).decode()

    async def _try_acquire_or_renew(self) -> bool:
        timeout = max(1.0, min(5.0, self.renew_deadline / 2))
        try:
            return await asyncio.wait_for(self._attempt(), timeout)
        except ApiError as exc:
            if exc.status != 409:  # 409: someone else updated first; not worth a log line
                self.log.warning("lease request failed", extra={"status": exc.status, "error": exc.message})
            return False
        except (CredentialError, aiohttp.ClientError, OSError, TimeoutError) as exc:
            self.log.warning("lease request failed", extra={"error": str(exc) or type(exc).__name__})
            return False

    async def _attempt(self) -> bool:
        now = time.monotonic()
        try:
            lease = await self.client.request("GET", self.path, timeout=5)
        except ApiError as exc:
            if exc.status != 404:
                raise
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": self._spec(transitions=0, acquire=True),
            }
            self._write_checkpoint(body)
            self._lease = await self.client.request(
                "POST", f"/apis/coordination.k8s.io/v1/namespaces/{self.namespace}/leases", body=body, timeout=5
            )
            self.adopted_checkpoint = {}
            self._last_renew = now
            return True
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity") or ""
        record = (holder, spec.get("renewTime"), spec.get("leaseDurationSeconds"))
        if record != self._observed:
            self._observed, self._observed_at = record, now
        duration = float(spec.get("leaseDurationSeconds") or self.lease_duration)
        if holder and holder != self.identity and self._observed_at + duration > now:
            return False  # held by someone else and not (yet) expired as we observe it
        if holder != self.identity:
            annotation = ((lease.get("metadata") or {}).get("annotations") or {}).get(CHECKPOINT_ANNOTATION)
            try:
                self.adopted_checkpoint = orjson.loads(annotation) if annotation else {}
            except orjson.JSONDecodeError:
                self.adopted_checkpoint = {}
            lease["spec"] = self._spec(int(spec.get("leaseTransitions") or 0) + 1, acquire=True)
        else:
            lease["spec"] = {**spec, **self._spec(int(spec.get("leaseTransitions") or 0), acquire=False)}
            self._write_checkpoint(lease)
        # The lease's resourceVersion makes this an optimistic lock: a concurrent taker gets 409.
        self._lease = await self.client.request("PUT", self.path, body=lease, timeout=5)
        self._last_renew = now
        self._observed = None
        return True

    def _spec(self, transitions: int, acquire: bool) -> dict[str, Any]:
        stamp = _micro_time()
        spec: dict[str, Any] = {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": max(1, round(self.lease_duration)),
            "renewTime": stamp,
            "leaseTransitions": transitions,
        }
        if acquire:
            spec["acquireTime"] = stamp
        return spec
