"""The layout reads as the data flow: every import, lazy ones included, points down the stages, there are
no cycles, only the render layer touches rich, and backends use only the public plugin API."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# import package -> folder in the repository
FOLDERS = {"ftplan": ROOT / "planner", "ftplan.backends": ROOT / "plugins"}
# Stages, lowest first: a module may import its own stage or lower ones, never higher.
LAYERS = [
    {"ftplan", "ftplan.errors", "ftplan.names"},
    {"ftplan.data"},
    {"ftplan.model"},
    {"ftplan.estimate"},
    {"ftplan.recommend"},
    {"ftplan.plan"},
    {"ftplan.run", "ftplan.train"},
    {"ftplan.measure"},
    {"ftplan.api"},
    {"ftplan.render"},
    {"ftplan.cli", "ftplan.__main__"},
]
CORE_FORBIDDEN = ("ftplan.cli", "ftplan.render", "ftplan.__main__", "rich")
HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "boto3", "botocore", "sky")
HEAVY_ALLOWED = ("ftplan.model.meta_count", "ftplan.train", "ftplan.measure", "ftplan.data.aws",
                 "ftplan.data.aws_prices", "ftplan.data.dataset", "ftplan.backends")


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def imports(name: str, path: Path) -> set[str]:
    """Every module `name` imports, at the top or inside functions, as absolute names."""
    out = set()
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")
                parent = parent[:len(parent) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}
    return out


MODULES = modules()
# a module's own parent packages are imported before it anyway: not an edge
GRAPH = {name: {m for m in imports(name, path) if m in MODULES and m != name and not name.startswith(m + ".")}
         for name, path in MODULES.items()}


def layer(name: str) -> int:
    for rank, stage in reversed(list(enumerate(LAYERS))):
        if any(name == s or name.startswith(s + ".") for s in stage if s != "ftplan"):
            return rank
    return 0


def is_core(name: str) -> bool:
    return not name.startswith(("ftplan.cli", "ftplan.render", "ftplan.__main__", "ftplan.backends"))


def test_the_stages_are_all_listed():
    assert len(MODULES) > 40
    for name in MODULES:
        if name.startswith("ftplan.") and not name.startswith("ftplan.backends"):
            stage = ".".join(name.split(".")[:2])
            assert any(stage in s for s in LAYERS), f"{name}: add its stage to LAYERS"


@pytest.mark.parametrize("name", sorted(n for n in MODULES if not n.startswith("ftplan.backends")))
def test_imports_point_down_the_stages(name):
    upward = [m for m in GRAPH[name] if not m.startswith("ftplan.backends") and layer(m) > layer(name)]
    assert not upward, f"{name} (stage {layer(name)}) imports a later stage: {upward}"


def test_no_import_cycles_not_even_lazy_ones():
    state: dict[str, int] = {}  # 1 visiting, 2 done
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(GRAPH):
        if node not in state:
            visit(node)


@pytest.mark.parametrize("name", sorted(n for n in MODULES if is_core(n)))
def test_the_core_never_imports_cli_render_or_rich(name):
    bad = [m for m in imports(name, MODULES[name]) if m.startswith(CORE_FORBIDDEN) or m.split(".")[0] == "rich"]
    assert not bad, f"{name} imports {bad}: only ftplan.render words things for the terminal"


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n.startswith("ftplan.backends.")))
def test_backends_import_only_the_public_api(name):
    own = name.split(".")[:3]
    used = {m for m in imports(name, MODULES[name]) if m.startswith("ftplan")}
    foreign = [m for m in used if m != "ftplan.api" and not m.startswith("ftplan.api.")
               and m.split(".")[:3] != own]
    assert not foreign, f"{name} reaches into ftplan's internals: {sorted(foreign)}; use ftplan.api"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_heavy_libraries_only_where_training_happens(name):
    heavy = {m.split(".")[0] for m in imports(name, MODULES[name])} & set(HEAVY)
    if heavy:
        assert name.startswith(HEAVY_ALLOWED), f"{name} imports {sorted(heavy)}"
