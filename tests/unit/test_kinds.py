"""kubetrail.core.kinds: a kind and its resource, both ways, on one table."""

from __future__ import annotations

import pytest

from kubetrail.core.kinds import IRREGULAR_PLURALS, kind_of_resource, resource_of_kind


@pytest.mark.parametrize(
    ("kind", "resource"),
    [
        ("Pod", "pods"),
        ("Deployment", "deployments"),
        ("ReplicaSet", "replicasets"),
        ("Policy", "policies"),
        ("Gateway", "gateways"),
        ("Ingress", "ingresses"),
        ("NetworkPolicy", "networkpolicies"),
        ("Endpoints", "endpoints"),
        ("ComponentStatus", "componentstatuses"),
        ("Box", "boxes"),
        ("Patch", "patches"),
        ("Mesh", "meshes"),
    ],
)
def test_kind_and_resource_both_ways(kind: str, resource: str) -> None:
    assert resource_of_kind(kind) == resource
    assert kind_of_resource(resource) == kind.lower()


def test_every_irregular_plural_goes_back_to_its_kind() -> None:
    for kind, resource in IRREGULAR_PLURALS.items():
        assert resource_of_kind(kind) == resource
        assert kind_of_resource(resource) == kind
