"""docs/configuration.md: every setting the code reads, exactly as scripts/config_reference.py generates it."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest
from belfry import service

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT / "docs" / "configuration.md"


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("config_reference", ROOT / "scripts" / "config_reference.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("config_reference", module)  # dataclasses resolve their annotations through it
    spec.loader.exec_module(module)
    return module


def _listed() -> set[str]:
    """The variables the reference's tables list."""
    return set(re.findall(r"^\| `([A-Z][A-Z0-9_]*)` \|", REFERENCE.read_text(), re.MULTILINE))


def _literal_names() -> set[str]:
    """Every quoted ``BELFRY_*`` name in the code, however it is read (as tests/deploy's invariants scan)."""
    names: set[str] = set()
    for folder in (ROOT / "libs", ROOT / "services"):
        for path in folder.rglob("*.py"):
            names |= set(re.findall(r"[\"'](BELFRY_[A-Z0-9_]+)[\"']", path.read_text()))
    return names


def test_the_reference_is_what_the_code_gives() -> None:
    diff = _generator().check(ROOT)
    assert diff == "", "docs/configuration.md is stale; run `python scripts/config_reference.py`:\n" + diff


def test_every_variable_named_in_the_code_is_listed() -> None:
    # Also catches a name read some other way than the generator follows (os.environ.get, a helper).
    missing = _literal_names() - _listed()
    assert missing == set(), f"read by the code but not in docs/configuration.md: {sorted(missing)}"


def test_names_built_at_run_time_are_listed_for_each_service_and_sender() -> None:
    listed = _listed()
    senders = set()
    for path in (ROOT / "services").rglob("*.py"):
        senders |= set(re.findall(r"load_sender_settings\(\s*\w+,\s*\w+,\s*\"(\w+)\"", path.read_text()))
    assert senders, "no sender found: the scan below would prove nothing"
    wanted = {
        f"BELFRY_{s.upper()}_{part}" for s in senders for part in ("BATCH", "CONCURRENCY", "LEASE_SECONDS", "FANOUT")
    }
    wanted |= {f"BELFRY_{d.name.upper()}_GRPC_ADDRESS" for d in service.declared()}
    assert wanted - listed == set()


def test_a_variable_without_a_description_stops_the_generator(monkeypatch: pytest.MonkeyPatch) -> None:
    generator = _generator()
    monkeypatch.delitem(generator.DESCRIPTIONS, "BELFRY_GATEWAY_QUEUE_SIZE")
    monkeypatch.delitem(generator.DESCRIPTIONS, "BELFRY_<NAME>_FANOUT")
    with pytest.raises(generator.GeneratorError) as caught:
        generator.collect(ROOT)
    assert "BELFRY_GATEWAY_QUEUE_SIZE (read at services/gateway/settings.py:" in str(caught.value)
    assert "BELFRY_EMAIL_FANOUT (read at libs/belfry/queue/sender.py:" in str(caught.value)


def test_a_description_of_a_variable_nobody_reads_stops_the_generator(monkeypatch: pytest.MonkeyPatch) -> None:
    generator = _generator()
    monkeypatch.setitem(generator.DESCRIPTIONS, "BELFRY_NO_LONGER_READ", "gone")
    with pytest.raises(generator.GeneratorError, match="DESCRIPTIONS names BELFRY_NO_LONGER_READ, which no code reads"):
        generator.collect(ROOT)
