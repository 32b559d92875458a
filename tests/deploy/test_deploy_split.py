"""The dispatcher-split component: accepting and fan-out as two Deployments.

Each overlay is rendered again with ``k8s/components/dispatcher-split`` listed
last among its components, as docs/deploy.md says to enable it, in a copy of
``k8s/`` in a temporary folder. The ``dispatcher`` Deployment behind the
dispatcher Service must become accept-only; ``dispatcher-fanout`` must be the
same process (image, command, configuration, Secrets, database, identity,
certificate) with fan-out workers, reached by no Service, and keep every rule
the other Deployments keep; nothing else in the overlay may change.
"""

from __future__ import annotations

import copy
import functools
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml

from services.dispatcher.settings import load_settings
from tests.deploy.manifests import (
    K8S,
    ROOT,
    Obj,
    assert_locked_down,
    container,
    environment,
    kubectl,
    names_read_by_code,
    of_kind,
    port_of,
    quantity,
    render,
    secret_refs,
    validate,
)
from tests.deploy.pki import Authority
from tests.deploy.podenv import pod_environ

OVERLAYS = ("dev", "prod")
COMPONENT = "dispatcher-split"
ACCEPT, FANOUT = "dispatcher", "dispatcher-fanout"
WORKERS = "BELFRY_DISPATCHER_FANOUT_WORKERS"
NAME = "app.kubernetes.io/name"


@functools.cache
def render_split(overlay: str) -> tuple[Obj, ...]:
    """``k8s/overlays/<overlay>`` with the component appended to its components (a copy of k8s/, rendered)."""
    with tempfile.TemporaryDirectory() as folder:
        tree = Path(folder) / "k8s"
        shutil.copytree(K8S, tree)
        path = tree / "overlays" / overlay / "kustomization.yaml"
        kustomization = yaml.safe_load(path.read_text())
        kustomization["components"] = [*kustomization.get("components", []), f"../../components/{COMPONENT}"]
        path.write_text(yaml.safe_dump(kustomization, sort_keys=False))
        done = subprocess.run(  # noqa: S603 - the kubectl of the test helpers and our own copy of k8s/
            [kubectl(), "kustomize", str(path.parent)], capture_output=True, text=True, check=False
        )
    if done.returncode != 0:
        raise AssertionError(f"kustomize failed for {overlay} + {COMPONENT}:\n{done.stderr}")
    return tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)


def _pair(overlay: str) -> tuple[Obj, Obj]:
    deployments = of_kind(render_split(overlay), "Deployment")
    return deployments[ACCEPT], deployments[FANOUT]


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return selector.items() <= labels.items()


def _pod_labels(deployment: Obj) -> dict[str, str]:
    labels: dict[str, str] = deployment["spec"]["template"]["metadata"]["labels"]
    return labels


def _key(obj: Obj) -> tuple[str, str]:
    return obj["kind"], obj["metadata"]["name"]


def _without_workers(pod: Obj) -> Obj:
    """A pod spec without the fan-out workers setting (the one thing the two Deployments differ in)."""
    pod = copy.deepcopy(pod)
    for spec in pod["containers"]:
        spec["env"] = [e for e in spec.get("env", []) if e["name"] != WORKERS]
    return pod


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates(overlay: str) -> None:
    for obj in render_split(overlay):
        validate(obj)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_the_dispatcher_changes(overlay: str) -> None:
    # The component adds the fan-out Deployment and its budget and turns the dispatcher accept-only;
    # every other object renders exactly as in the overlay alone.
    before = {_key(o): o for o in render(overlay)}
    after = {_key(o): o for o in render_split(overlay)}
    assert set(after) - set(before) == {("Deployment", FANOUT), ("PodDisruptionBudget", FANOUT)}
    assert set(before) <= set(after)
    changed = {k for k in before if before[k] != after[k]}
    assert changed == {("Deployment", ACCEPT)}
    # The dispatcher itself gains only the setting and a description.
    accept, _ = _pair(overlay)
    assert (
        _without_workers(accept["spec"]["template"]["spec"])
        == before[("Deployment", ACCEPT)]["spec"]["template"]["spec"]
    )
    assert accept["spec"]["selector"] == before[("Deployment", ACCEPT)]["spec"]["selector"]
    assert _pod_labels(accept) == _pod_labels(before[("Deployment", ACCEPT)])
    annotations = dict(accept["metadata"]["annotations"])
    assert annotations.pop("kubernetes.io/description")
    assert annotations == before[("Deployment", ACCEPT)]["metadata"].get("annotations", {})


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_accept_only_behind_the_service_fan_out_behind_none(overlay: str) -> None:
    objs = render_split(overlay)
    accept, fanout = _pair(overlay)
    assert environment(accept, objs)[WORKERS] == "0"
    assert int(environment(fanout, objs).get(WORKERS, "2")) >= 1
    services = of_kind(objs, "Service")
    # Producers (and peers: BELFRY_DISPATCHER_ADDRESS=dns:///dispatcher:50052) reach the accept-only pods only.
    assert _matches(services["dispatcher"]["spec"]["selector"], _pod_labels(accept))
    for name, service in services.items():
        assert not _matches(service["spec"].get("selector", {}), _pod_labels(fanout)), (
            f"Service {name} selects {FANOUT}"
        )
    (config,) = of_kind(objs, "ConfigMap").values()
    assert config["data"]["BELFRY_DISPATCHER_ADDRESS"].removeprefix("dns:///").rsplit(":", 1)[0] == "dispatcher"
    # Neither Deployment's selector takes the other's pods (their ReplicaSets would fight over them).
    assert not _matches(accept["spec"]["selector"]["matchLabels"], _pod_labels(fanout))
    assert not _matches(fanout["spec"]["selector"]["matchLabels"], _pod_labels(accept))
    assert _matches(fanout["spec"]["selector"]["matchLabels"], _pod_labels(fanout))
    # Only the network policies every Belfry pod gets apply: the gRPC port stays closed to producers.
    for policy in of_kind(objs, "NetworkPolicy").values():
        if _matches(policy["spec"]["podSelector"]["matchLabels"], _pod_labels(fanout)):
            for rule in policy["spec"].get("ingress", []):
                sources = rule.get("from", [])
                from_mesh = bool(sources) and all("podSelector" in s and "namespaceSelector" not in s for s in sources)
                assert from_mesh or [p["port"] for p in rule.get("ports", [])] == ["metrics"], policy["metadata"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_fan_out_is_the_same_process(overlay: str) -> None:
    accept, fanout = _pair(overlay)
    # Image, command, configuration and Secret references, database URL, probes, resources, security
    # context, identity (service account, service token, certificate), mounts: all of the pod but the setting.
    assert _without_workers(fanout["spec"]["template"]["spec"]) == _without_workers(accept["spec"]["template"]["spec"])
    assert container(fanout)["image"] == container(accept)["image"]
    assert container(fanout)["args"] == ["serve", "dispatcher"]
    assert container(fanout)["envFrom"] == container(accept)["envFrom"]
    assert secret_refs(fanout) == secret_refs(accept)
    database = [[e for e in container(d)["env"] if e["name"] == "BELFRY_DATABASE_URL"] for d in (accept, fanout)]
    assert database[0] == database[1] and len(database[0]) == 1
    # Scrape annotations on the pods, Reloader's on the Deployment (mtls): the same on both.
    template_annotations = [d["spec"]["template"]["metadata"].get("annotations") for d in (accept, fanout)]
    assert template_annotations[0] == template_annotations[1]
    own = [
        {k: v for k, v in d["metadata"].get("annotations", {}).items() if "description" not in k}
        for d in (accept, fanout)
    ]
    assert own[0] == own[1]
    labels = _pod_labels(fanout)
    assert labels[NAME] == FANOUT and labels["app.kubernetes.io/part-of"] == "belfry"
    assert fanout["metadata"]["namespace"] == accept["metadata"]["namespace"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_dispatcher_reads_each_environment_as_intended(overlay: str, tmp_path: Path) -> None:
    # The dispatcher's own settings code, given each pod's rendered environment (as test_deploy_settings).
    objs = render_split(overlay)
    authority = Authority.create(tmp_path / "pki", "mesh")
    workers = {}
    for deployment in _pair(overlay):
        name = deployment["metadata"]["name"]
        settings = load_settings(pod_environ(deployment, objs, tmp_path / name, authority))
        assert settings.common.service == "dispatcher"
        assert settings.common.tls.enabled == (overlay == "prod")
        workers[name] = settings.fanout_workers
    assert workers[ACCEPT] == 0 and workers[FANOUT] >= 1


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_fan_out_keeps_the_rules_every_deployment_keeps(overlay: str) -> None:
    objs = render_split(overlay)
    _, fanout = _pair(overlay)
    spec, pod = container(fanout), fanout["spec"]["template"]["spec"]
    env = environment(fanout, objs)
    ports = {p["name"]: p["containerPort"] for p in spec["ports"]}
    assert ports["metrics"] == port_of(env["BELFRY_METRICS_ADDRESS"])
    health = port_of(env["BELFRY_HEALTH_ADDRESS"])
    assert ports["health"] == health
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert spec[probe]["grpc"]["port"] == health and spec[probe]["grpc"].get("service", "") == ""
    for resource in ("cpu", "memory"):
        assert 0 < quantity(spec["resources"]["requests"][resource]) <= quantity(spec["resources"]["limits"][resource])
    assert_locked_down(fanout)
    pre_stop = spec["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > pre_stop + float(env.get("BELFRY_DRAIN_SECONDS", "10"))
    assert pod["serviceAccountName"] in of_kind(objs, "ServiceAccount")
    assert {e["name"] for e in spec["env"]} - names_read_by_code() == set()
    # Every file a variable names comes from a mounted, required Secret volume.
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    mounts = {m["mountPath"]: m["name"] for m in spec.get("volumeMounts", [])}
    for value in (e.get("value", "") for e in spec["env"]):
        if value.startswith("/etc/belfry/"):
            source = volumes[mounts[value.rsplit("/", 1)[0]]]["secret"]
            assert not source.get("optional", False)
    # The one rendered image, shared with the migration Job.
    (job,) = of_kind(objs, "Job").values()
    assert {container(d)["image"] for d in of_kind(objs, "Deployment").values()} == {container(job)["image"]}


def test_prod_fan_out_replicas_budget_spread_database_and_certificate() -> None:
    objs = render_split("prod")
    _, fanout = _pair("prod")
    labels = _pod_labels(fanout)
    # No HPA names the dispatcher in prod, so none for its fan-out either: two replicas, scaled by hand.
    hpas = {h["spec"]["scaleTargetRef"]["name"] for h in of_kind(objs, "HorizontalPodAutoscaler").values()}
    assert ACCEPT not in hpas and FANOUT not in hpas
    assert fanout["spec"]["replicas"] >= 2
    budgets = of_kind(objs, "PodDisruptionBudget").values()
    covering = [b for b in budgets if _matches(b["spec"]["selector"]["matchLabels"], labels)]
    assert [b["metadata"]["name"] for b in covering] == [FANOUT] and covering[0]["spec"]["maxUnavailable"] == 1
    assert len(budgets) == len(of_kind(objs, "Deployment"))
    constraints = fanout["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert {c["topologyKey"] for c in constraints} == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}
    assert all(_matches(c["labelSelector"]["matchLabels"], labels) and NAME in c["matchLabelKeys"] for c in constraints)
    (url,) = [e for e in container(fanout)["env"] if e["name"] == "BELFRY_DATABASE_URL"]
    assert url["valueFrom"]["secretKeyRef"] == {"name": "belfry-db-app", "key": "uri"}
    # The dispatcher's identity: its certificate (rolled by Reloader on renewal) and its TLS settings.
    env = environment(fanout, objs)
    (tls,) = [v for v in fanout["spec"]["template"]["spec"]["volumes"] if "secret" in v]
    assert tls["secret"]["secretName"] == "belfry-dispatcher-tls"
    assert tls["secret"]["secretName"] in {c["spec"]["secretName"] for c in of_kind(objs, "Certificate").values()}
    assert fanout["metadata"]["annotations"]["secret.reloader.stakater.com/reload"] == "belfry-dispatcher-tls"
    assert {env[f"BELFRY_TLS_{part}"].rsplit("/", 1)[1] for part in ("CERT", "KEY", "CA")} == {
        "tls.crt",
        "tls.key",
        "ca.crt",
    }


def test_docs_say_how_to_enable_it() -> None:
    docs = (ROOT / "docs" / "deploy.md").read_text()
    assert "## Splitting accepting from fan-out" in docs
    assert f"- ../../components/{COMPONENT}" in docs
    assert f"`k8s/components/{COMPONENT}/`" in docs
