"""Regenerate the Python code for every contract in protos/ into libs/.

Run from anywhere: ``python scripts/gen_protos.py``. The output is committed
and never edited by hand; tests/test_generated.py fails when it is stale.
The generator versions are pinned in pyproject.toml (grpcio-tools,
mypy-protobuf) so that every machine produces the same bytes.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
OUT = ROOT / "libs" / "belfry" / "api"


def generate(out_root: Path) -> None:
    """Write the generated package ``belfry/api`` below ``out_root``."""
    # The mypy plugins live beside the interpreter, which may not be on PATH.
    bindir = str(Path(sys.executable).parent)
    os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    files = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTOS}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--mypy_out={out_root}",
        f"--mypy_grpc_out={out_root}",
        *files,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    api = out_root / "belfry" / "api"
    for folder in [api, *[p for p in api.rglob("*") if p.is_dir()]]:
        (folder / "__init__.py").touch()


def main() -> None:
    """Regenerate into a scratch folder, then replace libs/belfry/api whole."""
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        if OUT.exists():
            shutil.rmtree(OUT)
        shutil.copytree(Path(tmp) / "belfry" / "api", OUT)
    print(f"generated {OUT.relative_to(ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    main()
