"""The public tiers: which modules are public, and the benchmark scripts use nothing else.

The public modules are listed once, in docs/conf.py (``PUBLIC_MODULES``: each has a page in docs/api/), and
named in docs/usage.md ("Public API"). Every script in benchmarks/ may import only public modules, and from
them only the names in their ``__all__``; ``laftr.X`` attribute chains may start only with a public name.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = sorted((ROOT / "benchmarks").glob("*.py"))


def public_modules() -> list[str]:
    """``PUBLIC_MODULES`` of docs/conf.py, read without importing Sphinx."""
    tree = ast.parse((ROOT / "docs" / "conf.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "PUBLIC_MODULES"
                                                for t in node.targets):
            return list(ast.literal_eval(node.value))
    raise AssertionError("docs/conf.py has no PUBLIC_MODULES")


PUBLIC = public_modules()


def _exported(module: str) -> set[str]:
    mod = importlib.import_module(module)
    return set(getattr(mod, "__all__", ()))


def private_uses(source: str, public: list[str]) -> list[str]:
    """What ``source`` uses of laftr beyond the public names (one line per use, with its line number)."""
    problems: list[str] = []
    laftr_aliases: set[str] = set()  # local names bound to the laftr package itself
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "laftr" or alias.name.startswith("laftr."):
                    if alias.name not in public:
                        problems.append(f"line {node.lineno}: import {alias.name} (not a public module)")
                    elif alias.name == "laftr":
                        laftr_aliases.add(alias.asname or "laftr")
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and (
                node.module == "laftr" or node.module.startswith("laftr.")):
            if node.module not in public:
                problems.append(f"line {node.lineno}: from {node.module} import ... (not a public module)")
                continue
            names = _exported(node.module)
            for alias in node.names:
                if alias.name not in names:
                    problems.append(f"line {node.lineno}: from {node.module} import {alias.name} (not in its "
                                    "__all__)")
    for node in ast.walk(ast.parse(source)):
        # laftr.<name>...: the first attribute must be public (laftr.estimators.REGISTRY is not)
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in laftr_aliases):
            sub = f"laftr.{node.attr}"
            if node.attr not in _exported("laftr") and sub not in public:
                problems.append(f"line {node.lineno}: {node.value.id}.{node.attr} (not a public name of laftr)")
    return problems


def test_public_modules_are_documented_as_public():
    assert {"laftr", "laftr.continual", "laftr.influence", "laftr.rules", "laftr.errors"} <= set(PUBLIC)
    usage = (ROOT / "docs" / "usage.md").read_text(encoding="utf-8")
    tiers = usage[usage.index("## Public API"):]
    tiers = tiers[:tiers.index("\n## ", 1)]
    for name in PUBLIC:
        assert f"`{name}`" in tiers, f"{name} is not named in docs/usage.md, 'Public API'"
        assert importlib.import_module(name).__all__, name


def test_the_check_catches_private_uses():
    planted = [
        "from laftr.influence.experiment import train_model",       # a private submodule
        "from laftr.exact import exact_fsd_and_grad",               # a private module
        "import laftr.estimators",                                  # a private module
        "from laftr.influence import _estimator_options",           # not in __all__
        "import laftr\nx = laftr.estimators.REGISTRY",              # an attribute chain through a private module
        "import laftr as L\nx = L.graph",
        "def f():\n    from laftr.models import _check_sizes\n",   # inside a function too
    ]
    for source in planted:
        assert private_uses(source, PUBLIC), source
    fine = ("import laftr\nfrom laftr.influence import train_model, ParamSpace\nfrom laftr.report import markdown_table\n"
            "x = laftr.exact_fsd_and_grad\ny = laftr.rules.register\n")
    assert private_uses(fine, PUBLIC) == []


@pytest.mark.parametrize("path", BENCHMARKS, ids=[p.name for p in BENCHMARKS])
def test_benchmark_scripts_use_public_names_only(path):
    assert private_uses(path.read_text(encoding="utf-8"), PUBLIC) == []


def test_there_are_benchmark_scripts():
    assert len(BENCHMARKS) >= 5
