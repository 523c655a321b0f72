"""The members of a Kubernetes audit event (``audit.k8s.io/v1`` Event) that kubetrail decodes.

One definition for the ``kubernetes_audit`` filter's scan and the ``detect`` filter's rules
(``native/src/lib.rs`` mirrors it field for field); every other member is skipped by msgspec.
It lives in ``core`` because both plugins' layers (transforms and detect) use it.
"""

from __future__ import annotations

import msgspec


class _User(msgspec.Struct, gc=False):
    username: str | None = None
    uid: str | None = None
    groups: list[str] | None = None


class _ObjectRef(msgspec.Struct, gc=False):
    resource: str | None = None
    subresource: str | None = None
    namespace: str | None = None
    name: str | None = None
    apiGroup: str | None = None


class _Status(msgspec.Struct, gc=False):
    code: int | None = None
    # Kept raw (any JSON type) for the detect filter's ka.response.reason: typing it would turn
    # an event with an odd reason away from the scan, which never reads it.
    reason: msgspec.Raw = msgspec.Raw()


class _Annotations(
    msgspec.Struct,
    gc=False,
    rename={"decision": "authorization.k8s.io/decision", "reason": "authorization.k8s.io/reason"},
):
    decision: str | None = None
    reason: str | None = None


class AuditEvent(msgspec.Struct, gc=False):
    """The members of an audit event decoded here, and by the ``detect`` filter's rules (the one
    definition of both; ``native/src/lib.rs`` mirrors it field for field)."""

    auditID: str | None = None
    stage: str | None = None
    level: str | None = None
    kind: str | None = None
    verb: str | None = None
    requestURI: str | None = None
    userAgent: str | None = None
    sourceIPs: list[str] | None = None
    stageTimestamp: str | None = None
    user: _User | None = None
    impersonatedUser: _User | None = None
    objectRef: _ObjectRef | None = None
    responseStatus: _Status | None = None
    annotations: _Annotations | None = None
    # For the detect filter's rules: kept as their bytes (no parse, any JSON type), parsed only
    # when a rule reads into them.
    requestObject: msgspec.Raw = msgspec.Raw()  # empty: the event has none
    responseObject: msgspec.Raw = msgspec.Raw()


__all__ = ["AuditEvent"]
