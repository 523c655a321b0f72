"""The chart's ``credentialSecrets`` on the real API server (the plain control plane): a Secret
that does not exist fails ``helm install`` naming it; with the Secrets there, the rendered
manifests pass a server-side dry run (the API server validates the secret volumes and mounts)
and the release installs and uninstalls. The rendering itself: tests/unit/test_secrets_chart.py."""

from __future__ import annotations

import base64
from pathlib import Path

from localcluster import KubeAPI, LocalCluster
from tests.integration.test_chart import CHART, helm, run_helm, server_dry_run  # noqa: F401 (helm: fixture)
from tests.unit.test_secrets_chart import OUTPUTS

SECRETS = ["--set", "credentialSecrets[0].name=es", "--set", "credentialSecrets[1].name=kafka"]


def test_install_fails_naming_a_missing_secret_and_works_once_it_exists(
    local_cluster: LocalCluster,
    helm: Path,  # noqa: F811 (the fixture imported above)
    admin: KubeAPI,
    namespace: str,
    tmp_path: Path,
) -> None:
    outputs = tmp_path / "outputs.conf"
    outputs.write_text(OUTPUTS)
    # No node runs pods in this cluster, so the pre-install check Job could never finish here.
    args = [*SECRETS, "--set-file", f"config.outputs={outputs}", "--set", "configCheck.enabled=false"]
    args += ["-n", namespace]
    missing = run_helm(local_cluster, "install", "kt-cred", str(CHART), *args, check=False)
    assert missing.returncode != 0
    assert f'credentialSecrets[0]: Secret "es" not found in namespace "{namespace}"' in missing.stderr

    for name in ("es", "kafka"):
        data = {k: base64.b64encode(f"{name}-{k}\n".encode()).decode() for k in ("username", "password")}
        resp = admin.post(f"/api/v1/namespaces/{namespace}/secrets", {"metadata": {"name": name}, "data": data})
        assert resp.status == 201, resp
    manifest = tmp_path / "rendered.yaml"
    rendered = run_helm(local_cluster, "template", "kt-cred", str(CHART), "--skip-tests", *args).stdout
    manifest.write_text(rendered)
    server_dry_run(local_cluster, namespace, manifest)
    run_helm(local_cluster, "install", "kt-cred", str(CHART), *args)
    deployments = admin.get(f"/apis/apps/v1/namespaces/{namespace}/deployments").json()["items"]
    assert deployments
    for deployment in deployments:
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        assert volumes["credentials-es"]["secret"]["secretName"] == "es"
    run_helm(local_cluster, "uninstall", "kt-cred", "-n", namespace, "--wait")
