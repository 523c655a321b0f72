"""Kubernetes kinds and the API resources that name them: ``Deployment`` <-> ``deployments``.

Events name an object by its kind (``involvedObject.kind``), audit records by its resource
(``objectRef.resource``). The sqlite output stores the resource so both meet in one index, and the
history backends turn a resource back into a kind to query Events. Both directions live here, on
one table of irregular plurals, so they cannot drift apart (they were in the sqlite output, the
reverse one in the history's es backend reading the table's private name).
"""

from __future__ import annotations

# Kinds (lower case) whose plural is not simply lower case + "s"/"es"/"ies"; anything else
# follows that rule (see resource_of_kind).
IRREGULAR_PLURALS: dict[str, str] = {
    "endpoints": "endpoints",
    "ingress": "ingresses",
    "networkpolicy": "networkpolicies",
    "podsecuritypolicy": "podsecuritypolicies",
    "priorityclass": "priorityclasses",
    "storageclass": "storageclasses",
    "ingressclass": "ingressclasses",
    "runtimeclass": "runtimeclasses",
    "componentstatus": "componentstatuses",
}
_KIND_OF: dict[str, str] = {v: k for k, v in IRREGULAR_PLURALS.items()}


def resource_of_kind(kind: str) -> str:
    """``Deployment`` -> ``deployments``: Events name an object's kind, audit records its
    resource; the store keeps the resource so both meet in one index."""
    lower = kind.lower()
    if lower in IRREGULAR_PLURALS:
        return IRREGULAR_PLURALS[lower]
    if lower.endswith(("s", "x", "ch", "sh")):
        return lower + "es"
    if lower.endswith("y") and lower[-2:-1] not in ("a", "e", "o", "u"):
        return lower[:-1] + "ies"
    return lower + "s"


def kind_of_resource(resource: str) -> str:
    """``deployments`` -> ``deployment`` (compared case-insensitively with an Event's kind)."""
    if resource in _KIND_OF:
        return _KIND_OF[resource]
    if resource.endswith("ies"):
        return resource[:-3] + "y"
    if resource.endswith(("ses", "xes", "ches", "shes")):
        return resource[:-2]
    return resource[:-1] if resource.endswith("s") else resource
