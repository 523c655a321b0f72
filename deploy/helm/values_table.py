"""The README's table of Helm values, generated from the ``# --`` comments in values.yaml.

``python deploy/helm/values_table.py`` prints the table; ``--write`` replaces it in README.md
between the ``<!-- values-table -->`` markers. tests/unit/test_chart_values.py fails when the
README and values.yaml disagree, so the table cannot go stale.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import yaml

CHART = Path(__file__).resolve().parent / "kubetrail"
README = Path(__file__).resolve().parents[2] / "README.md"
START, END = "<!-- values-table -->", "<!-- /values-table -->"


def documented_values(text: str) -> list[tuple[str, str]]:
    """(dotted key, description) for every key preceded by a ``# --`` comment, in file order."""
    rows: list[tuple[str, str]] = []
    stack: list[tuple[int, str]] = []  # (indent, key) of the enclosing mappings
    doc: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("# --"):
            doc = [stripped[4:].strip()]
            continue
        if stripped.startswith("#") and doc:
            doc.append(stripped[1:].strip())
            continue
        match = re.match(r"^(\s*)([A-Za-z0-9_.]+):", line)
        if not match:  # a list item or a continuation line: not a key of its own
            continue
        indent = len(match.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        key = ".".join([k for _, k in stack] + [match.group(2)])
        stack.append((indent, match.group(2)))
        if doc:
            rows.append((key, " ".join(doc)))
            doc = []
    return rows


def _default(values: dict[str, object], key: str) -> str:
    node: object = values
    for part in key.split("."):
        assert isinstance(node, dict)
        node = node[part]
    if isinstance(node, str) and "\n" in node:
        return "(see values.yaml)"
    text = json.dumps(node)
    return f"`{text}`" if len(text) <= 60 else "(see values.yaml)"


def table() -> str:
    text = (CHART / "values.yaml").read_text()
    values = yaml.safe_load(text)
    lines = ["| value | default | description |", "|---|---|---|"]
    for key, description in documented_values(text):
        lines.append(f"| `{key}` | {_default(values, key)} | {description.replace('|', '/')} |")
    return "\n".join(lines)


def readme_table(readme: str) -> str:
    start, end = readme.index(START) + len(START), readme.index(END)
    return readme[start:end].strip()


def main() -> None:
    generated = table()
    if "--write" in sys.argv:
        readme = README.read_text()
        start, end = readme.index(START) + len(START), readme.index(END)
        README.write_text(readme[:start] + "\n" + generated + "\n" + readme[end:])
    else:
        print(generated)


if __name__ == "__main__":
    main()
