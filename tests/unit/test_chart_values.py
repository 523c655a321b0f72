"""The chart's values: every value documented, covered by the schema, and the README's table in
sync with values.yaml (deploy/helm/values_table.py generates it)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "deploy" / "helm"))

import values_table  # noqa: E402

CHART = ROOT / "deploy" / "helm" / "kubetrail"


def _leaves(node: Any, prefix: str = "") -> list[str]:
    """Dotted keys of values that are not sections (a section: a map whose keys are documented)."""
    if (
        isinstance(node, dict)
        and node
        and all(isinstance(v, dict | list | str | int | bool | None) for v in node.values())
    ):
        keys = []
        for key, value in node.items():
            keys.extend(_leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else [f"{prefix}{key}"])
        return keys
    return [prefix.rstrip(".")]


def test_every_value_is_documented() -> None:
    text = (CHART / "values.yaml").read_text()
    documented = {key for key, _ in values_table.documented_values(text)}
    values = yaml.safe_load(text)
    undocumented = []
    for key in _leaves(values):
        # A documented map (e.g. logs.kubernetesFilter) documents its entries too.
        parts = key.split(".")
        if not any(".".join(parts[:n]) in documented for n in range(1, len(parts) + 1)):
            undocumented.append(key)
    assert undocumented == []


def test_schema_knows_every_value() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def walk(node: Any, sub: dict[str, Any], path: str) -> None:
        if not isinstance(node, dict) or "properties" not in sub:
            return
        for key, value in node.items():
            assert key in sub["properties"], f"values.yaml has {path}{key}, values.schema.json does not"
            walk(value, sub["properties"][key], f"{path}{key}.")

    walk(values, schema, "")


def test_readme_table_is_generated_from_values_yaml() -> None:
    readme = (ROOT / "README.md").read_text()
    assert values_table.readme_table(readme) == values_table.table(), (
        "README's values table is stale: python deploy/helm/values_table.py --write"
    )
