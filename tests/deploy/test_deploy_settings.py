"""Each Deployment's environment, as rendered, is one its service accepts.

The container's environment is rebuilt from the rendered objects (ConfigMap,
literal values, Secret references with plausible values, mounted files made
in a temporary folder) and handed to the service's own ``load_settings``:
a missing or misspelt variable, or a file the service cannot read, fails here
instead of in a crash-looping pod.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
from belfry import service

from tests.deploy.manifests import ROOT, of_kind, render
from tests.deploy.pki import Authority
from tests.deploy.podenv import pod_environ


def _cases() -> list[tuple[str, str]]:
    return [
        (overlay, name)
        for overlay in ("dev", "prod")
        for name in sorted(d.name for d in service.declared())
        if (ROOT / "services" / name / "settings.py").exists()
    ]


@pytest.mark.parametrize(("overlay", "name"), _cases())
def test_service_accepts_its_rendered_environment(overlay: str, name: str, tmp_path: Path) -> None:
    objs = render(overlay)
    deployment = of_kind(objs, "Deployment")[name]
    environ = pod_environ(deployment, objs, tmp_path, Authority.create(tmp_path / "pki", "mesh"))
    settings = importlib.import_module(f"services.{name}.settings").load_settings(environ)
    common = settings.common
    assert common.service == name
    assert common.grpc_address == environ["BELFRY_GRPC_ADDRESS"]
    assert common.health_address == environ["BELFRY_HEALTH_ADDRESS"]
    assert common.tls.enabled == (overlay == "prod")
