"""The committed generated code matches the protos (regenerate with scripts/gen_protos.py)."""

from __future__ import annotations

import filecmp
import importlib.util
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _load_generator() -> object:
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_protos"] = module
    spec.loader.exec_module(module)
    return module


def _differences(left: Path, right: Path) -> list[str]:
    cmp = filecmp.dircmp(left, right, ignore=["__pycache__"])
    found = [f"only in committed: {n}" for n in cmp.left_only] + [f"only in fresh: {n}" for n in cmp.right_only]
    found += [f"differs: {n}" for n in cmp.diff_files]
    for sub in cmp.common_dirs:
        found += _differences(left / sub, right / sub)
    return found


def test_generated_code_is_fresh() -> None:
    generator = _load_generator()
    with tempfile.TemporaryDirectory() as tmp:
        generator.generate(Path(tmp))  # type: ignore[attr-defined]
        diffs = _differences(ROOT / "libs" / "belfry" / "api", Path(tmp) / "belfry" / "api")
    assert not diffs, "generated code is stale; run `python scripts/gen_protos.py`:\n" + "\n".join(diffs)
