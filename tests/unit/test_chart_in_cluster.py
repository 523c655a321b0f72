"""The chart relies on kubetrail's in-cluster address (no ``kube_url`` in its configs): rendered
by the real helm (skipped without it, like test_chart_aggregator.py), the ``logs`` part's
kubernetes filter and the ``events`` input, built from the rendered ConfigMaps in a pod's
environment, talk to ``https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT``. The same
configs against the real API server: tests/integration/test_chart.py (check --in-cluster)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetrail.core.config import load_config
from kubetrail.runtime.pipeline import Pipeline
from tests.unit.test_chart_aggregator import helm, objects, render  # noqa: F401 - helm is a fixture


def test_rendered_parts_use_the_service_environment_for_the_api_server(
    helm: Path,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    proc = render(helm)
    assert proc.returncode == 0, proc.stderr
    docs = objects(proc.stdout)
    token = tmp_path / "token"
    token.write_text("t")
    for key, value in {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "KUBERNETES_SERVICE_PORT": "443"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("NODE_NAME", "n")
    monkeypatch.setenv("POD_NAME", "p")
    urls = {}
    for part, anchor in (("logs", "    node_name ${NODE_NAME}"), ("events", "    kube_api ")):
        text = docs[("ConfigMap", f"t-kubetrail-{part}")]["data"]["kubetrail.conf"]
        assert "kube_url" not in text and "KUBERNETES_SERVICE" not in text
        # The pod's projected token is a file; here one in tmp_path stands in for it.
        path = tmp_path / f"{part}.conf"
        path.write_text(text.replace(anchor, f"    kube_token_file {token}\n{anchor}", 1))
        pipeline = Pipeline(load_config(path))
        (component,) = [c for c in (*pipeline.sources, *pipeline.transforms) if hasattr(c.instance, "connection")]
        urls[part] = component.instance.connection.url
    assert urls == {"logs": "https://10.0.0.1:443", "events": "https://10.0.0.1:443"}
