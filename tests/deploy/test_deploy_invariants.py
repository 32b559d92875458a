"""What every Deployment must satisfy, in both overlays, and what each overlay promises.

Service names and gRPC ports come from the code (the services' declarations),
so the manifests cannot drift from what the services actually bind.
"""

from __future__ import annotations

import pytest
from belfry import service

from tests.deploy.manifests import (
    ROOT,
    Obj,
    assert_locked_down,
    container,
    environment,
    names_read_by_code,
    of_kind,
    port_of,
    quantity,
    render,
    secret_refs,
)

GRPC_PORTS = {d.name: d.port for d in service.declared()}
SERVICES = tuple(GRPC_PORTS)
OVERLAYS = ("dev", "prod")
SENDERS_AND_GATEWAY = {"email", "webpush", "mobile", "webhooks", "gateway"}
# Secrets the operator creates (docs/deploy.md says how); everything else is rendered.
OPERATOR_SECRETS = {
    "belfry-tokens",
    "belfry-email",
    "belfry-smtp",
    "belfry-vapid",
    "belfry-webhooks",
    "belfry-fcm",
    "belfry-apns",
    "belfry-service-tokens",
}
# Secrets made by operators running in the cluster: CloudNativePG and cert-manager.
CONTROLLER_SECRETS = {"belfry-db-app"} | {f"belfry-{name}-tls" for name in SERVICES}


def _deployments(overlay: str) -> list[tuple[str, Obj]]:
    found = sorted(of_kind(render(overlay), "Deployment").items())
    assert [name for name, _ in found] == sorted(SERVICES), f"{overlay} must deploy every service once"
    return found


def _cases() -> list[tuple[str, str]]:
    return [(overlay, name) for overlay in OVERLAYS for name in sorted(SERVICES)]


def _deployment(overlay: str, name: str) -> Obj:
    return of_kind(render(overlay), "Deployment")[name]


@pytest.mark.parametrize(("overlay", "name"), _cases())
def test_runs_the_named_service_on_its_port(overlay: str, name: str) -> None:
    spec = container(_deployment(overlay, name))
    assert spec["args"] == ["serve", name]
    env = environment(_deployment(overlay, name), render(overlay))
    assert port_of(env["BELFRY_GRPC_ADDRESS"]) == GRPC_PORTS[name]
    ports = {p["name"]: p["containerPort"] for p in spec["ports"]}
    assert ports["grpc"] == GRPC_PORTS[name] and ports["metrics"] == port_of(env["BELFRY_METRICS_ADDRESS"])


@pytest.mark.parametrize(("overlay", "name"), _cases())
def test_grpc_probes_on_the_health_service(overlay: str, name: str) -> None:
    deployment = _deployment(overlay, name)
    spec = container(deployment)
    health_port = port_of(environment(deployment, render(overlay))["BELFRY_HEALTH_ADDRESS"])
    for probe in ("readinessProbe", "livenessProbe"):
        assert set(spec[probe]) & {"httpGet", "tcpSocket", "exec"} == set(), f"{name} {probe} must use gRPC"
        assert spec[probe]["grpc"]["port"] == health_port
        # The empty service name is the server's overall status (set by belfry.rpc).
        assert spec[probe]["grpc"].get("service", "") == ""
    assert {p["name"]: p["containerPort"] for p in spec["ports"]}["health"] == health_port


@pytest.mark.parametrize(("overlay", "name"), _cases())
def test_resources_requested_and_limited(overlay: str, name: str) -> None:
    resources = container(_deployment(overlay, name))["resources"]
    for resource in ("cpu", "memory"):
        request, limit = resources["requests"][resource], resources["limits"][resource]
        assert 0 < quantity(request) <= quantity(limit), f"{name}: {resource} request {request} > limit {limit}"


@pytest.mark.parametrize(("overlay", "name"), _cases())
def test_non_root_read_only_no_escalation(overlay: str, name: str) -> None:
    assert_locked_down(_deployment(overlay, name))


@pytest.mark.parametrize(("overlay", "name"), _cases())
def test_grace_period_covers_the_drain(overlay: str, name: str) -> None:
    deployment = _deployment(overlay, name)
    drain = float(environment(deployment, render(overlay)).get("BELFRY_DRAIN_SECONDS", "10"))
    pre_stop = container(deployment).get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > pre_stop + drain, f"{name}: {grace}s grace < {pre_stop}s preStop + {drain}s drain"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_accounts_and_selectors(overlay: str) -> None:
    objs = render(overlay)
    services, accounts = of_kind(objs, "Service"), of_kind(objs, "ServiceAccount")
    for name, deployment in _deployments(overlay):
        pod = deployment["spec"]["template"]
        assert pod["spec"]["serviceAccountName"] == name and name in accounts
        selector = services[name]["spec"]["selector"]
        assert selector.items() <= pod["metadata"]["labels"].items()
        assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
        service_ports = {p["name"]: p["port"] for p in services[name]["spec"]["ports"]}
        assert service_ports["grpc"] == GRPC_PORTS[name]
    # Any gateway replica serves any user.
    assert services["gateway"]["spec"].get("sessionAffinity", "None") == "None"
    assert {p["name"] for p in services["gateway"]["spec"]["ports"]} >= {"http"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_reference_resolves_or_is_documented(overlay: str) -> None:
    objs = render(overlay)
    rendered_secrets, maps = set(of_kind(objs, "Secret")), set(of_kind(objs, "ConfigMap"))
    docs = (ROOT / "docs" / "deploy.md").read_text()
    workloads = [o for o in objs if o["kind"] in {"Deployment", "Job", "StatefulSet"}]
    for workload in workloads:
        for source in container(workload).get("envFrom", []):
            if "configMapRef" in source:
                assert source["configMapRef"]["name"] in maps
        for secret, optional in secret_refs(workload).items():
            if secret in rendered_secrets or secret in CONTROLLER_SECRETS:
                continue
            assert secret in OPERATOR_SECRETS, f"{workload['metadata']['name']} reads unknown Secret {secret}"
            assert optional or f"`{secret}`" in docs, f"docs/deploy.md must tell operators to create {secret}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_migration_job(overlay: str) -> None:
    objs = render(overlay)
    (job,) = of_kind(objs, "Job").values()
    spec = container(job)
    assert spec["args"] == ["migrate"]
    images = {container(d)["image"] for d in of_kind(objs, "Deployment").values()}
    assert images == {spec["image"]}, "the Job and the services run one image"
    assert ":" in spec["image"] and not spec["image"].endswith(":latest")
    assert_locked_down(job)
    assert job["spec"]["template"]["spec"]["restartPolicy"] in {"OnFailure", "Never"}


def test_dev_one_replica_one_postgres() -> None:
    objs = render("dev")
    for name, deployment in _deployments("dev"):
        assert deployment["spec"].get("replicas", 1) == 1, name
    (postgres,) = of_kind(objs, "StatefulSet").values()
    assert container(postgres)["image"].startswith("postgres:15")
    url = of_kind(objs, "Secret")
    assert any(name.startswith("belfry-database") for name in url)


def test_prod_replicas_hpas_and_disruption_budgets() -> None:
    objs = render("prod")
    hpas = {h["spec"]["scaleTargetRef"]["name"]: h for h in of_kind(objs, "HorizontalPodAutoscaler").values()}
    assert set(hpas) == SENDERS_AND_GATEWAY
    budgets = list(of_kind(objs, "PodDisruptionBudget").values())
    for name, deployment in _deployments("prod"):
        if name in hpas:
            hpa = hpas[name]["spec"]
            assert hpa["scaleTargetRef"]["kind"] == "Deployment"
            assert 2 <= hpa["minReplicas"] < hpa["maxReplicas"]
            # The HPA owns the count: a replicas field would reset it on every apply.
            assert "replicas" not in deployment["spec"], name
        else:
            assert deployment["spec"]["replicas"] >= 2, name
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        covering = [b for b in budgets if b["spec"]["selector"]["matchLabels"].items() <= labels.items()]
        assert len(covering) == 1, f"{name} needs exactly one PodDisruptionBudget"
        assert covering[0]["spec"].get("maxUnavailable") == 1 or covering[0]["spec"].get("minAvailable") == 1


def test_prod_config_is_not_a_dev_config() -> None:
    (config,) = of_kind(render("prod"), "ConfigMap").values()
    assert config["data"].get("BELFRY_GATEWAY_DEV_LOGIN", "false") == "false"
    assert config["data"]["BELFRY_PUBLIC_URL"].startswith("https://")
    assert config["data"]["BELFRY_LOG_LEVEL"] != "debug"


def test_prod_topology_spread() -> None:
    for name, deployment in _deployments("prod"):
        constraints = deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]
        keys = {c["topologyKey"] for c in constraints}
        assert keys == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}, name
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        for constraint in constraints:
            # Spread per service: the selector plus the pod's own name label pick this service's pods only.
            assert constraint["labelSelector"]["matchLabels"].items() <= labels.items()
            assert "app.kubernetes.io/name" in constraint["matchLabelKeys"]


def test_prod_database_is_the_cloudnativepg_cluster() -> None:
    objs = render("prod")
    (cluster,) = of_kind(objs, "Cluster").values()
    assert cluster["spec"]["instances"] >= 2
    app_secret = f"{cluster['metadata']['name']}-app"  # CloudNativePG's Secret for the owner of the app database
    for workload in [*of_kind(objs, "Deployment").values(), *of_kind(objs, "Job").values()]:
        (url,) = [e for e in container(workload)["env"] if e["name"] == "BELFRY_DATABASE_URL"]
        assert url["valueFrom"]["secretKeyRef"] == {"name": app_secret, "key": "uri"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_dispatcher_gateway_and_bounces_open_outside_the_mesh(overlay: str) -> None:
    objs = render(overlay)
    policies = list(of_kind(objs, "NetworkPolicy").values())
    mesh = {"app.kubernetes.io/part-of": "belfry"}
    deny = [p for p in policies if p["spec"]["podSelector"]["matchLabels"] == mesh and "ingress" not in p["spec"]]
    assert deny, "a default-deny policy must cover every Belfry pod"
    open_ports: set[tuple[str, str]] = set()
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            sources = rule.get("from", [])
            outside = not sources or any("podSelector" not in s or "namespaceSelector" in s for s in sources)
            if not outside:
                assert all(s["podSelector"]["matchLabels"] == mesh for s in sources)
                continue
            ports = [p["port"] for p in rule.get("ports", [])]
            assert ports, f"{policy['metadata']['name']} opens every port to outside the mesh"
            monitoring = sources and all(
                s.get("namespaceSelector", {}).get("matchLabels") == {"kubernetes.io/metadata.name": "monitoring"}
                for s in sources
            )
            if monitoring:
                assert ports == ["metrics"]
                continue
            target = policy["spec"]["podSelector"]["matchLabels"].get("app.kubernetes.io/name", "*")
            open_ports |= {(target, str(port)) for port in ports}
    # Producers, browsers, and the mail relay returning bounces to the email service's VERP-checked receiver.
    assert open_ports == {("dispatcher", "grpc"), ("gateway", "http"), ("email", "bounces")}


def test_prod_mutual_tls_everywhere() -> None:
    objs = render("prod")
    certificates = {c["spec"]["secretName"]: c for c in of_kind(objs, "Certificate").values()}
    env_config = {
        "BELFRY_TLS_CERT": "tls.crt",
        "BELFRY_TLS_KEY": "tls.key",
        "BELFRY_TLS_CA": "ca.crt",
    }
    for name, deployment in _deployments("prod"):
        env = environment(deployment, objs)
        mounts = {m["name"]: m["mountPath"] for m in container(deployment)["volumeMounts"]}
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        (tls_volume,) = [v for v in volumes.values() if v.get("secret", {}).get("secretName") == f"belfry-{name}-tls"]
        for variable, file in env_config.items():
            assert env[variable] == f"{mounts[tls_volume['name']]}/{file}", f"{name} {variable}"
        certificate = certificates[f"belfry-{name}-tls"]["spec"]
        # Peers dial the short Service name, producers the qualified one: both must be in the certificate.
        namespace = deployment["metadata"]["namespace"]
        assert {name, f"{name}.{namespace}.svc", f"{name}.{namespace}.svc.cluster.local"} <= set(
            certificate["dnsNames"]
        )
        assert {"server auth", "client auth"} <= set(certificate["usages"])
        assert certificate["issuerRef"]["name"] == "belfry-mesh"
    # Peer addresses use the Service names the certificates carry.
    for variable in (
        "BELFRY_PREFERENCES_ADDRESS",
        "BELFRY_WEBPUSH_ADDRESS",
        "BELFRY_DISPATCHER_ADDRESS",
    ):
        host = environment(_deployment("prod", "gateway"), objs)[variable].removeprefix("dns:///").rsplit(":", 1)[0]
        assert f"belfry-{host}-tls" in certificates


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_peers_are_dialled_on_every_pod_of_a_headless_service(overlay: str) -> None:
    # A virtual IP would pin each caller's one long-lived connection to one pod; a headless Service
    # resolves to every ready pod and the caller's channel goes round robin over them (belfry.balance).
    objs = render(overlay)
    (config,) = of_kind(objs, "ConfigMap").values()
    services = of_kind(objs, "Service")
    peers = {
        k: v
        for k, v in config["data"].items()
        if k.endswith("_ADDRESS") and k[len("BELFRY_") : -len("_ADDRESS")].lower() in GRPC_PORTS
    }
    assert peers, "the configuration names the peers services call"
    for variable, address in peers.items():
        name = variable[len("BELFRY_") : -len("_ADDRESS")].lower()
        assert address == f"dns:///{name}:{GRPC_PORTS[name]}", variable
        assert services[name]["spec"].get("clusterIP") == "None", f"{name}: a peer's Service must be headless"
    # Producers dial the dispatcher the same way.
    assert services["dispatcher"]["spec"].get("clusterIP") == "None"


def test_dev_has_no_tls_material() -> None:
    for name, deployment in _deployments("dev"):
        assert not any(e["name"].startswith("BELFRY_TLS_") for e in container(deployment)["env"]), name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_services_that_verify_user_tokens_hold_the_token_keys(overlay: str) -> None:
    # Whoever reads the user-token keys from a pod can mint a token for any user: only services that verify
    # user tokens (their package asks the kit for its verifier, belfry.auth.user_tokens) may hold them.
    for name, deployment in _deployments(overlay):
        verifies = any("user_tokens(" in p.read_text() for p in (ROOT / "services" / name).rglob("*.py"))
        holds = {e["name"] for e in container(deployment)["env"]} & {"BELFRY_TOKEN_KEYS", "BELFRY_TOKEN_ACTIVE_KID"}
        assert bool(holds) == verifies, f"{name}: verifies user tokens {verifies}, holds {sorted(holds)}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_variable_is_read_by_the_code(overlay: str) -> None:
    # A misspelt variable would be ignored silently and the default used instead.
    objs = render(overlay)
    read = names_read_by_code()
    (config,) = of_kind(objs, "ConfigMap").values()
    assert set(config["data"]) - read == set()
    for name, deployment in _deployments(overlay):
        if not (ROOT / "services" / name / "settings.py").exists():
            continue  # a service still being written: checked once its settings exist
        names = {e["name"] for e in container(deployment)["env"]}
        assert names - read == set(), name


@pytest.mark.parametrize(("overlay", "name"), _cases())
def test_file_variables_point_into_required_mounts(overlay: str, name: str) -> None:
    # Services refuse to start when a configured file is missing, so each file
    # a variable names must come from a mounted, non-optional volume.
    deployment = _deployment(overlay, name)
    spec = container(deployment)
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"].get("volumes", [])}
    mounts = {m["mountPath"]: m["name"] for m in spec.get("volumeMounts", [])}
    for item in spec.get("env", []):
        value = item.get("value", "")
        if not value.startswith("/etc/belfry/"):
            continue
        folder, file = value.rsplit("/", 1)
        assert folder in mounts, f"{name}: {item['name']}={value} is not under a mounted volume"
        source = volumes[mounts[folder]]["secret"]
        assert not source.get("optional", False), f"{name}: {item['name']} names a file that may be absent"
        if "items" in source:
            assert file in {i["path"] for i in source["items"]}
