"""Both overlays render, and every object validates offline against its schema."""

from __future__ import annotations

import copy

import jsonschema
import kubernetes_validate
import pytest

from tests.deploy.manifests import Obj, of_kind, render, validate

OVERLAYS = ("dev", "prod")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates(overlay: str) -> None:
    objs = render(overlay)
    assert objs, f"{overlay} rendered nothing"
    for obj in objs:
        validate(obj)


def test_kinds_per_overlay() -> None:
    dev, prod = render("dev"), render("prod")
    assert len(of_kind(dev, "StatefulSet")) == 1 and not of_kind(dev, "Cluster")
    assert len(of_kind(prod, "Cluster")) == 1 and not of_kind(prod, "StatefulSet")
    assert not of_kind(dev, "HorizontalPodAutoscaler") and not of_kind(dev, "Certificate")
    assert len(of_kind(prod, "PodDisruptionBudget")) == len(of_kind(prod, "Deployment"))


def _deployment() -> Obj:
    return copy.deepcopy(of_kind(render("dev"), "Deployment")["email"])


def _cluster() -> Obj:
    return copy.deepcopy(of_kind(render("prod"), "Cluster")["belfry-db"])


def test_validation_rejects_a_broken_deployment() -> None:
    broken = _deployment()
    broken["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(broken)
    typo = _deployment()
    typo["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"grpc": {"port": 50050}}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(typo)


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("spec", "instances"), 0),
        (("spec", "primaryUpdateStrategy"), "automatic"),
        (("spec", "storage", "sizee"), "10Gi"),
        (("spec", "resources", "limits", "memory"), "lots"),
    ],
)
def test_validation_rejects_a_broken_cluster(path: tuple[str, ...], value: object) -> None:
    broken = _cluster()
    node = broken
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(jsonschema.ValidationError):
        validate(broken)


def test_validation_rejects_a_cluster_without_instances() -> None:
    broken = _cluster()
    del broken["spec"]["instances"]
    with pytest.raises(jsonschema.ValidationError):
        validate(broken)
