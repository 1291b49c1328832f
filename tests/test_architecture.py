"""The seams, held by the imports: each stage knows its neighbours only through a port."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "clickpulse"


def imported_modules(path: Path) -> set[str]:
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
            modules.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
    return modules


def imports_of(folder: str) -> dict[str, set[str]]:
    return {str(path.relative_to(PACKAGE)): imported_modules(path) for path in sorted((PACKAGE / folder).rglob("*.py"))}


FORBIDDEN = {
    "http": ("clickpulse.spool", "clickpulse.memory_limit", "clickpulse.batcher", "clickpulse.intake"),
    "writer": ("clickpulse.spool", "clickpulse.memory_limit", "clickpulse.batcher", "clickpulse.intake"),
}


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_a_stage_does_not_import_what_lies_behind_its_port(folder: str) -> None:
    files = imports_of(folder)
    assert files, f"no modules under clickpulse/{folder}"
    offending = {
        name: sorted(module for module in modules if module.startswith(FORBIDDEN[folder]))
        for name, modules in files.items()
    }
    assert {name: found for name, found in offending.items() if found} == {}


def test_every_actor_sentinel_is_defined_once_in_messages() -> None:
    names = {"Stop", "_Stop", "Refused", "PipelineDown", "Delivery", "Batch", "SpoolPosition"}
    definitions = sorted(
        (node.name, str(path.relative_to(PACKAGE)))
        for path in PACKAGE.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ClassDef) and node.name in names
    )
    assert definitions == sorted((name, "messages.py") for name in names - {"_Stop"})
