"""The container image definition: lint-clean, pinned, non-root, no build tools or development tooling at run time."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

from tests.deploy.manifests import ROOT

DOCKERFILE = ROOT / "Dockerfile"


def _stages() -> list[list[str]]:
    """Instructions (continuations joined, comments dropped) grouped by FROM."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    stages: list[list[str]] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            stages.append([])
        stages[-1].append(line)
    return stages


def test_hadolint_is_clean() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    done = subprocess.run([str(hadolint), str(DOCKERFILE)], capture_output=True, text=True, check=False)  # noqa: S603
    assert done.returncode == 0, done.stdout + done.stderr


def test_base_images_are_pinned_slim_python() -> None:
    for stage in _stages():
        image = stage[0].split()[1]
        assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?", image), image


def test_final_stage_runs_as_non_root_without_build_tools() -> None:
    final = _stages()[-1]
    users = [line.split()[1] for line in final if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in {"0", "root"}
    assert int(users[-1].split(":")[0]) > 0
    body = " ".join(final).lower()
    for tool in ("apt-get install", "gcc", "build-essential", "make ", "pip install"):
        assert tool not in body, f"the run stage must not carry {tool!r}"
    assert any(line.startswith('ENTRYPOINT ["belfry"]') for line in final)


def test_context_carries_the_code_and_generated_modules() -> None:
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    kept = {line[1:] for line in ignore if line.startswith("!")}
    assert {"libs/", "services/", "pyproject.toml"} <= kept
    assert not any(line.startswith("libs/belfry/api") for line in ignore)
    build = " ".join(_stages()[0])
    assert "COPY libs ./libs" in build and "COPY services ./services" in build
    assert (ROOT / "libs" / "belfry" / "api").is_dir()


# Development tooling of ``belfry up`` (the ``local`` extra), made unimportable.
_WITHOUT_LOCAL_EXTRA = """
import importlib, sys
from pathlib import Path

class Absent:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {"aiosmtpd", "pgserver"}:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, Absent())
from belfry import cli, service
from belfry.errors import ConfigError
from belfry.local import database, mailcatcher

for declared in service.declared():
    for module in ("settings", "server"):
        importlib.import_module(f"{declared.package}.{module}")
assert mailcatcher.caught(Path(sys.argv[1])) == []
for start in (mailcatcher.start, database.start):
    try:
        start(Path(sys.argv[1]) / "tooling")
    except ConfigError as exc:
        assert "local extra" in exc.message, exc.message
    else:
        raise AssertionError(f"{start.__module__} started without the local extra")
print("ok")
"""


def test_development_tooling_is_an_extra_the_image_leaves_out() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    # aiosmtpd is both: the email service's bounce receiver runs on it in production, and the mail catcher of
    # `belfry up` uses it too; the embedded PostgreSQL is tooling only.
    tooling = {"pgserver"}
    named = {re.split(r"[<>=;\[ ]", dep, maxsplit=1)[0].lower() for dep in project["dependencies"]}
    assert not tooling & named, "development tooling belongs in the local extra, not the runtime dependencies"
    assert "aiosmtpd" in named, "the bounce receiver needs aiosmtpd in the image"
    assert tooling <= {
        re.split(r"[<>=;\[ ]", dep, maxsplit=1)[0].lower() for dep in project["optional-dependencies"]["local"]
    }
    installs = [line for line in _stages()[0] if "pip install" in line]
    assert installs and not any("[" in line for line in installs), installs


def test_every_service_and_the_cli_import_without_the_local_extra(tmp_path: Path) -> None:
    done = subprocess.run(  # noqa: S603 - our own interpreter and script
        [sys.executable, "-c", _WITHOUT_LOCAL_EXTRA, str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stdout + done.stderr
