"""The packages depend on each other in one direction only (issue 13, layering); no module is imported
by a module it imports."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# package -> packages it must never import (at module level or inside a function)
FORBIDDEN = {
    # common/ (the atomic writer) is the bottom layer: every package may import it, it imports none.
    # renderer/ could not host it: dataset/ and pose/ must not import renderer/.
    "common": {"renderer", "models", "dataset", "export", "pose"},
    "renderer": {"models", "dataset", "export", "pose"},
    "pose": {"renderer", "models", "dataset", "export"},
    "dataset": {"renderer", "models", "export"},
    "models": {"export"},
}


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports (absolute names; relative imports resolved against its package)."""
    tree = ast.parse(path.read_text())
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            names.add(base)
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_a_package_never_imports_a_higher_layer(package):
    offenders = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        bad = {name for name in imported_modules(path) if name.split(".")[0] in FORBIDDEN[package]}
        if bad:
            offenders[str(path.relative_to(ROOT))] = sorted(bad)
    assert not offenders, f"{package}/ imports what it must not: {offenders}"


def test_no_two_modules_import_each_other():
    packages = ("common", "renderer", "pose", "dataset", "models", "export")
    modules = {".".join(p.relative_to(ROOT).with_suffix("").parts): p
               for pkg in packages for p in (ROOT / pkg).rglob("*.py")}
    imports = {name: {m for m in imported_modules(path) if m in modules} for name, path in modules.items()}
    cycles = sorted({tuple(sorted((a, b))) for a, deps in imports.items() for b in deps
                     if a != b and a in imports.get(b, set()) and not b.endswith("__init__")
                     and not a.endswith("__init__")})
    assert not cycles, f"modules that import each other: {cycles}"
