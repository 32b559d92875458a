"""No service imports another service's modules: what they share is in the kit (``libs/belfry``) or the API."""

from __future__ import annotations

import ast
from pathlib import Path

import services

ROOT = Path(services.__file__).parent


def _imports(path: Path, package: str) -> list[tuple[int, str]]:
    """Every module ``path`` imports (lazy imports in functions included), relative ones made absolute."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return found


def test_no_service_imports_another_services_modules() -> None:
    names = {d.name for d in ROOT.iterdir() if (d / "__init__.py").is_file()}
    assert {"dispatcher", "preferences", "gateway", "email"} <= names  # the scan sees the services
    crossings = []
    for name in sorted(names):
        for path in sorted((ROOT / name).rglob("*.py")):
            package = ".".join(("services", *path.relative_to(ROOT).parent.parts))
            for line, module in _imports(path, package):
                parts = module.split(".")
                if parts[0] == "services" and len(parts) > 1 and parts[1] in names - {name}:
                    crossings.append(f"{path.relative_to(ROOT.parent)}:{line} imports {module}")
    assert crossings == []
