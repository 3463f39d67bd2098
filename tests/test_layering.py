"""The two sides of the consortium never import each other: a hospital's ClientApp loads no
operator code, and the operator's tools load no site code. What both need lives in `shared/`;
`fl_sim` (the whole consortium on one machine) is the one place that imports both."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"fl_client": "fl_server", "fl_server": "fl_client", "shared": ("fl_client", "fl_server", "fl_sim")}


def imported_packages(path: Path) -> set[str]:
    """Top-level package of every import in a file, at any depth (function-local ones too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_does_not_import_the_other_side(package):
    forbidden = FORBIDDEN[package]
    forbidden = {forbidden} if isinstance(forbidden, str) else set(forbidden)
    offenders = [f"{path.relative_to(ROOT)} imports {sorted(imported_packages(path) & forbidden)}"
                 for path in sorted((ROOT / package).rglob("*.py")) if imported_packages(path) & forbidden]
    assert not offenders, "; ".join(offenders)


def test_the_check_sees_a_cross_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from fl_server.run_dir import RunDir\n")
    assert "fl_server" in imported_packages(bad)
