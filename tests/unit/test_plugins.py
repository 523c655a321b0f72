"""The plugin registry: every name resolves to its class, and only used plugins are imported."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kubetrail.core.component import Component, Sink, Source, Transform
from kubetrail.runtime.plugins import SINKS, SOURCES, TRANSFORMS, LazyPlugins


@pytest.mark.parametrize(("registry", "kind"), [(SOURCES, Source), (TRANSFORMS, Transform), (SINKS, Sink)])
def test_every_name_resolves_to_a_plugin_of_that_name_and_kind(
    registry: LazyPlugins[Component], kind: type[Component]
) -> None:
    assert len(registry) == len(list(registry)) > 0
    for name in registry:
        cls = registry[name]
        assert issubclass(cls, kind) and cls.plugin_name == name
        assert registry[name] is cls  # imported once
    assert registry.get("no-such-plugin") is None


def test_a_file_only_pipeline_never_imports_the_network_sinks() -> None:
    code = (
        "import sys\n"
        "from kubetrail.runtime.pipeline import Pipeline\n"
        "from kubetrail.runtime.plugins import SINKS, SOURCES\n"
        "SOURCES['tail'], SINKS['file']\n"
        "print(sorted(m for m in ('aiohttp', 'kubetrail.sinks.es', 'kubetrail.sinks.loki') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
