"""A pod's environment rebuilt from rendered manifests, runnable on this machine.

ConfigMap values and literal values as rendered; Secret references get the
kind of value an operator puts there; files under /etc/belfry/ (mounted
Secrets in the pod) are made in a local folder, TLS material from a given
test CA.
"""

from __future__ import annotations

import base64
import json
import secrets
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tests.deploy.manifests import Obj, container, environment
from tests.deploy.pki import Authority

_MOUNT_ROOT = "/etc/belfry/"


def _secret_value(secret: str, key: str) -> str:
    """What an operator would put in the Secret under this key."""
    values = {
        "keys": f"k1={secrets.token_urlsafe(48)}",
        "active-kid": "k1",
        "url": "postgresql://belfry:password@postgres:5432/belfry",
        "uri": "postgresql://belfry:password@belfry-db-rw:5432/belfry",
        "secret-key": base64.b64encode(secrets.token_bytes(32)).decode(),
        "key-id": "ABC123DEFG",
        "team-id": "TEAM123456",
    }
    return values.get(key, secrets.token_urlsafe(48))


def _private_pem(*, rsa_key: bool = False) -> bytes:
    # Google service-account keys are RSA; Apple's .p8 keys are P-256.
    key = rsa.generate_private_key(65537, 2048) if rsa_key else ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write_file(path: Path, name: str, tls: Any) -> None:
    """A file of the kind the mounted Secret holds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name in {"tls.crt", "tls.key", "ca.crt"}:
        source = {"tls.crt": tls.cert, "tls.key": tls.key, "ca.crt": tls.ca}[path.name]
        path.write_bytes(Path(source).read_bytes())
    elif path.suffix == ".json":
        account = {
            "type": "service_account",
            "project_id": "belfry-test",
            "client_email": f"{name}@belfry-test.iam.gserviceaccount.com",
            "private_key": _private_pem(rsa_key=True).decode(),
            "token_uri": "https://oauth2.googleapis.com/token",
        }
        path.write_text(json.dumps(account))
    else:
        path.write_bytes(_private_pem())


def pod_environ(deployment: Obj, objs: tuple[Obj, ...], folder: Path, authority: Authority) -> dict[str, str]:
    """The environment the pod's container would see, with its files made under ``folder``."""
    name = deployment["metadata"]["name"]
    env = environment(deployment, objs)
    for item in container(deployment)["env"]:
        source = item.get("valueFrom", {})
        if "secretKeyRef" in source:
            env[item["name"]] = _secret_value(source["secretKeyRef"]["name"], source["secretKeyRef"]["key"])
        elif "fieldRef" in source:
            env[item["name"]] = f"{name}-7d9f8c6b5-x2x4z"
    tls = authority.issue(name)
    for variable, value in list(env.items()):
        if value.startswith(_MOUNT_ROOT):
            local = folder / name / value.removeprefix(_MOUNT_ROOT)
            _write_file(local, name, tls)
            env[variable] = str(local)
    return env
