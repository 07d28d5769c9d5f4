"""The layers of the code (docs/architecture.md), checked on the source: who may import whom, no import cycles,
explicit ``__all__`` on the public modules, no private names reached across modules."""
import ast
import pathlib

import pytest

SRC = pathlib.Path(__file__).resolve().parent.parent / "src" / "qkv"

# Layer of each top-level part of the package; a module may import its own layer and those below it.
LAYERS = {
    "core": 0,
    "engines": 1,
    "dispatch": 2,
    "api": 3,
    "masks": 3, "scores": 3,                           # public names of core parts
    "nn": 4, "models": 4, "integrations": 4, "distributed": 4, "linear": 4, "__init__": 4, "__main__": 6,
    "testing": 5,                                      # independent oracle; may call the API lazily
    "tools": 6,
}


def _modules():
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        yield ".".join(["qkv", *parts]) if parts != ["__init__"] else "qkv", path


def _resolve(mod: str, path: pathlib.Path, node: ast.ImportFrom) -> list[str]:
    """Absolute qkv module names an ImportFrom refers to (the module and, for `from . import x`, x)."""
    if node.level:
        pkg = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
        base = pkg[: len(pkg) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if not target.startswith("qkv"):
        return []
    names = [f"{target}.{a.name}" for a in node.names]
    return names if node.module is None else [target] + names


def _imports(mod, path, top_level_only):
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] == "qkv"]
        elif isinstance(node, ast.ImportFrom):
            found += _resolve(mod, path, node)
    known = {m for m, _ in _modules()}
    return sorted({f for f in found if f in known and f != mod})


def _layer(mod: str) -> int:
    parts = mod.split(".")
    return LAYERS[parts[1] if len(parts) > 1 else "__init__"]


MODULES = dict(_modules())


@pytest.mark.parametrize("mod", sorted(MODULES))
def test_layers(mod):
    """Every import (module level or inside a function) goes to the same layer or one below — except the
    oracle (qkv.testing) running qkv's API lazily and the package root."""
    mine = _layer(mod)
    for dep in _imports(mod, MODULES[mod], top_level_only=False):
        if mod == "qkv.testing" and dep == "qkv":
            continue                      # compare() runs the engines under test; the oracle itself does not
        if mod.startswith("qkv.integrations") and dep == "qkv":
            continue                      # a hook calls the public API by its public name
        theirs = _layer(dep)
        assert theirs <= mine, f"{mod} (layer {mine}) imports {dep} (layer {theirs})"
        if mod != "qkv.__main__" and not mod.startswith("qkv.tools"):
            assert not dep.startswith("qkv.tools"), f"the library module {mod} imports the tool {dep}"
        if mod.startswith("qkv.core"):
            assert dep.startswith("qkv.core"), f"the core module {mod} imports {dep}"
        if mod.startswith("qkv.engines"):
            assert dep.startswith(("qkv.core", "qkv.engines")), f"the engine module {mod} imports {dep}"


def test_no_import_cycles():
    graph = {m: _imports(m, p, top_level_only=True) for m, p in MODULES.items()}
    state: dict = {}

    def visit(m, stack):
        state[m] = 1
        for d in graph.get(m, []):
            if state.get(d) == 1:
                cyc = stack[stack.index(d):] + [d]
                raise AssertionError("import cycle: " + " -> ".join(cyc))
            if state.get(d) is None:
                visit(d, stack + [d])
        state[m] = 2

    for m in graph:
        if state.get(m) is None:
            visit(m, [m])


PUBLIC = ["qkv", "qkv.api", "qkv.masks", "qkv.scores", "qkv.nn", "qkv.testing", "qkv.dispatch", "qkv.core",
          "qkv.core.call", "qkv.core.masks", "qkv.core.merge", "qkv.core.options", "qkv.engines.base",
          "qkv.engines.reference", "qkv.engines.sdpa", "qkv.engines.tiled", "qkv.engines.cpu_kernel",
          "qkv.distributed", "qkv.distributed.ring", "qkv.distributed.layout"]


@pytest.mark.parametrize("mod", PUBLIC)
def test_public_modules_declare_all(mod):
    tree = ast.parse(MODULES[mod].read_text())
    assert any(isinstance(n, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in n.targets)
               for n in tree.body) or "import __all__" in MODULES[mod].read_text(), f"{mod} has no __all__"


@pytest.mark.parametrize("mod", sorted(MODULES))
def test_no_private_names_across_modules(mod):
    """``from x import _name`` of another qkv module is reaching into its privates."""
    tree = ast.parse(MODULES[mod].read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("qkv")):
            for a in node.names:
                assert not (a.name.startswith("_") and not a.name.startswith("__")), \
                    f"{mod} imports the private name {a.name} from {node.module or '.'}"
