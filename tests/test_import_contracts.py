"""Architecture contracts, run with the tests: the layering and the acyclic packages
(import-linter, configured in pyproject.toml), and no scheduler module reaching for a
private name of another."""
import ast
import pathlib
import textwrap

import pytest

# A plain import: the `test` extra installs import-linter, so a missing one must fail CI.
from importlinter import cli  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_the_import_contracts_hold(monkeypatch):
    monkeypatch.chdir(ROOT)
    assert cli.lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True) == 0


def test_a_broken_layer_is_caught(tmp_path, monkeypatch):
    """The checker itself: an upward import in a throwaway pair of packages fails."""
    for name, body in (("lowpkg", "import highpkg\n"), ("highpkg", "")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(body)
    cfg = tmp_path / "contracts.toml"
    cfg.write_text(textwrap.dedent("""
        [tool.importlinter]
        root_packages = ["highpkg", "lowpkg"]
        [[tool.importlinter.contracts]]
        name = "high above low"
        type = "layers"
        layers = ["highpkg", "lowpkg"]
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert cli.lint_imports(config_filename=str(cfg), no_cache=True) != 0


def _private_uses(path: pathlib.Path) -> list[str]:
    """``from .x import _y`` / ``from scheduler.x import _y`` and ``mod._y`` on an imported
    scheduler module, in one file."""
    tree = ast.parse(path.read_text())
    modules: set[str] = set()
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            inside = node.level > 0 or (node.module or "").startswith("scheduler")
            for a in node.names:
                if inside and a.name.startswith("_") and not a.name.startswith("__"):
                    found.append(f"{path.name}: imports {a.name} from {node.module}")
                if inside and node.module in (None, "scheduler"):
                    modules.add(a.asname or a.name)     # `from . import measures`
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("scheduler."):
                    modules.add(a.asname or a.name)
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in modules and node.attr.startswith("_")
                and not node.attr.startswith("__")):
            found.append(f"{path.name}: uses {node.value.id}.{node.attr}")
    return found


def test_no_scheduler_module_uses_a_private_name_of_another():
    found = [f for p in sorted((ROOT / "scheduler").glob("*.py")) for f in _private_uses(p)]
    assert found == []


def test_the_private_name_check_sees_one(tmp_path):
    p = tmp_path / "m.py"
    p.write_text("from .loop import _by_admission\nfrom . import metrics\nmetrics._x\n")
    assert len(_private_uses(p)) == 2
