"""kubetrail's layers (README "Layout") import only downward, checked on the source itself.

Every ``import`` of a ``kubetrail.*`` module, at the top of a file or inside a function (a
lazy import is still a dependency), is read with :mod:`ast`. The ranks follow the README:
``cli`` on top; ``runtime`` and ``history`` (each used only by ``cli``); the plugins
(``sources``, ``transforms``, ``sinks``: one layer, so an input may reuse its output twin's
helpers, as ``kafka`` does); ``detect``, ``kube`` and ``parsers``; ``core`` at the bottom.
"""

from __future__ import annotations

import ast
from pathlib import Path

import kubetrail

PACKAGE = Path(kubetrail.__file__).parent
RANK = {
    "cli": 5,
    "runtime": 4,
    "history": 4,
    "sources": 3,
    "transforms": 3,
    "sinks": 3,
    "detect": 2,
    "kube": 2,
    "parsers": 2,
    "core": 1,
}
PLUGINS = {"sources", "transforms", "sinks"}


def kubetrail_imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found += [(node.lineno, name) for name in names if name.startswith("kubetrail.")]
    return found


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in RANK else None


def upward_imports() -> list[str]:
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        if len(relative.parts) < 2 or relative.parts[0] not in RANK:
            continue  # kubetrail/__init__.py
        own = relative.parts[0]
        for line, module in kubetrail_imports(path):
            other = layer_of(module)
            if other is None or other == own or (own in PLUGINS and other in PLUGINS):
                continue
            if RANK[other] >= RANK[own]:
                wrong.append(f"kubetrail/{relative}:{line}: {own} imports {module}")
    return wrong


def test_every_layer_imports_only_the_layers_below_it() -> None:
    assert upward_imports() == []


def test_every_package_has_a_rank() -> None:
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert packages == set(RANK)


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from kubetrail.runtime.pipeline import Pipeline\n")
    assert kubetrail_imports(source) == [(2, "kubetrail.runtime.pipeline")]
