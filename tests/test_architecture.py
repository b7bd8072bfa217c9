"""The package structure the design promises, checked by walking every import with ast:
no adapter in pyconv/formats/ imports another (nor the registry), the shared Megatron-Core layer
imports no adapter, and the layout maths and family tables import neither."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "pyconv"


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, package: Path = PACKAGE) -> set[str]:
    """Every module a file imports, at any depth (lazy imports inside functions count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the importing module's package
                package_parts = module_name(path, package).split(".")
                if path.name != "__init__.py":
                    package_parts = package_parts[:-1]
                base = ".".join(package_parts[:len(package_parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return found


def _files(sub: str) -> list[Path]:
    return sorted((PACKAGE / sub).rglob("*.py"))


def _violations(files, forbidden, package: Path = PACKAGE) -> list[str]:
    out = []
    for path in files:
        me = module_name(path, package)
        for name in sorted(imported_modules(path, package)):
            if any((name == f or name.startswith(f + ".")) for f in forbidden(me)) and name != me:
                out.append(f"{me} imports {name}")
    return out


def test_no_adapter_imports_another_adapter_or_the_registry():
    adapters = [p for p in _files("formats") if p.name != "__init__.py"]
    assert len(adapters) >= 7
    assert _violations(adapters, lambda me: ["pyconv.formats"]) == []


@pytest.mark.parametrize("package,forbidden", [
    ("mcore", ["pyconv.formats", "pyconv.api", "pyconv.cli"]),
    ("layout", ["pyconv.formats", "pyconv.mcore", "pyconv.families", "pyconv.io"]),
    ("families", ["pyconv.formats", "pyconv.mcore", "pyconv.io"]),
    ("io", ["pyconv.formats", "pyconv.mcore", "pyconv.families", "pyconv.layout"]),
])
def test_shared_layers_import_no_adapter(package, forbidden):
    assert _violations(_files(package), lambda me: forbidden) == []


def test_the_walk_sees_lazy_and_relative_imports(tmp_path):
    """The checker itself can fail: an adapter importing another lazily, relatively or through
    the registry package is reported."""
    package = tmp_path / "pyconv"
    (package / "formats").mkdir(parents=True)
    cases = {"lazy.py": "def f():\n    from pyconv.formats.megatron import read\n",
             "relative.py": "from . import nemo\n",
             "registry.py": "from pyconv.formats import register_format\n",
             "clean.py": "from pyconv.mcore.names import hf_names\n"}
    for name, source in cases.items():
        (package / "formats" / name).write_text(source)
    found = _violations(sorted((package / "formats").glob("*.py")), lambda me: ["pyconv.formats"], package)
    assert {v.split()[0] for v in found} == {"pyconv.formats.lazy", "pyconv.formats.registry",
                                            "pyconv.formats.relative"}
    assert "pyconv.formats.relative imports pyconv.formats.nemo" in found
