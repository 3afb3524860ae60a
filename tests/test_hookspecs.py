"""In the manner of datasette: every hook is documented in the README with its signature, and exercised by a
test - the plugin API cannot drift from its documentation."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from ftplan.run import hookspecs

ROOT = Path(__file__).resolve().parents[1]
HOOKS = {name: fn for name, fn in vars(hookspecs).items()
         if callable(fn) and hasattr(fn, "ftplan_spec")}


def test_there_are_hooks():
    assert set(HOOKS) == {"register_backends", "register_catalog_entries"}


@pytest.mark.parametrize("name", sorted(HOOKS))
def test_every_hook_is_documented_in_the_readme_with_its_signature(name):
    readme = (ROOT / "README.md").read_text()
    signature = f"{name}({', '.join(inspect.signature(HOOKS[name]).parameters)})"
    assert f"`{signature}`" in readme, f"document {signature} in the README's Hooks section"
    assert HOOKS[name].__doc__ and ":returns:" in HOOKS[name].__doc__


@pytest.mark.parametrize("name", sorted(HOOKS))
def test_every_hook_is_implemented_and_called_by_a_test(name):
    tests = "\n".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py") if p.name != Path(__file__).name)
    example = "\n".join(p.read_text() for p in (ROOT / "examples").rglob("*.py"))
    assert f"def {name}(" in tests + example, f"no test plugin implements {name}"
    caller = {"register_backends": "backends()", "register_catalog_entries": "catalog_entries()"}[name]
    assert caller in tests, f"no test makes ftplan call {name}"
