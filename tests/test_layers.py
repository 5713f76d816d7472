"""The package's import structure: layers import only downward, nothing imports in a circle, and no
module reaches into another's private names. Every import statement counts, the ones inside
functions (lazy imports) included: a lazy import still ties the two modules together.

Layers, bottom to top (a module may import its own layer and the layers below it):

    base        errors, determinism, version
    data        io, preprocess, crop, geometry, distributed, phantom, vocabulary, ...
    ops         ops (kernels and their dispatch), the compiled extension
    model       the network; knows nothing of adapters or inference
    adapters    the adapter kinds, attached at the network's seams
    use         inference | train: siblings, neither imports the other
    api         segevol_fast (the package), SegVol (network + segment/session), info, optimize, eval
    cli         the command line
    viewer      the napari plugin (reader, prompts from clicks, organ labels, dock widget)
"""

from __future__ import annotations

import ast
import pathlib
import sys

PACKAGE = "segevol_fast"
ROOT = pathlib.Path(__file__).resolve().parents[1] / PACKAGE

# bottom to top; a module belongs to the layer of its longest listed prefix
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("errors", "determinism", "version")),
    (
        "data",
        (
            "io",
            "preprocess",
            "crop",
            "geometry",
            "distributed",
            "phantom",
            "vocabulary",
            "totalseg_names",
            "modality_hint",
        ),
    ),
    ("ops", ("ops", "_native", "_C")),
    ("model", ("model",)),
    ("adapters", ("adapters",)),
    ("use", ("inference", "train")),
    ("api", ("", "segvol", "info", "optimize", "eval")),
    ("cli", ("cli", "__main__")),
    ("viewer", ("viewer",)),
]
SIBLINGS = [("inference", "train")]  # same layer, independent of each other


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _is_module(name: str) -> bool:
    return name in MODULES or name == f"{PACKAGE}._C"


def _imports(name: str, path: pathlib.Path) -> list[tuple[str, str, int]]:
    """(imported module, imported name or "" for a module, line) for every import of this package."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, "", node.lineno) for a in node.names if a.name.split(".")[0] == PACKAGE]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] != PACKAGE:
                continue
            for a in node.names:
                sub = f"{source}.{a.name}"
                found.append((sub, "", node.lineno) if _is_module(sub) else (source, a.name, node.lineno))
    return found


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def _layer(module: str) -> tuple[int, str]:
    rest = module[len(PACKAGE) + 1 :] if module != PACKAGE else ""
    best = None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if rest == prefix or (prefix and rest.startswith(prefix + ".")):
                if best is None or len(prefix) > len(best[2]):
                    best = (index, prefix, prefix)
    if best is None:
        raise AssertionError(f"{module} belongs to no layer: add it to LAYERS in {__file__}")
    return best[0], best[1]


def test_every_module_has_a_layer():
    for module in MODULES:
        _layer(module)


def _upward(graph) -> list[str]:
    bad = []
    for module, imports in graph.items():
        own, own_top = _layer(module)
        for target, _, line in imports:
            layer, top = _layer(target)
            if layer > own:
                bad.append(f"{module}:{line} imports {target} ({LAYERS[layer][0]} is above {LAYERS[own][0]})")
            for a, b in SIBLINGS:
                if {own_top, top} == {a, b}:
                    bad.append(f"{module}:{line} imports {target} ({a} and {b} are independent siblings)")
    return bad


def test_layers_import_only_downward():
    bad = _upward(GRAPH)
    assert not bad, "upward imports:\n" + "\n".join(bad)


def _cycles(graph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each a circle of imports."""
    edges = {m: sorted({t for t, _, _ in imports if t in graph and t != m}) for m, imports in graph.items()}
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(edges)))

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return out


def test_no_import_circles():
    cycles = _cycles(GRAPH)
    assert not cycles, "modules importing each other (lazy imports included):\n" + "\n".join(
        " <-> ".join(c) for c in cycles
    )


def _private(part: str) -> bool:
    return part.startswith("_") and not part.startswith("__")


def _private_uses(graph) -> list[str]:
    bad = []
    for module, imports in graph.items():
        for target, name, line in imports:
            if name and _private(name):
                what = f"{target}.{name}"
            else:
                parts = target.split(".")
                private = [i for i, p in enumerate(parts) if _private(p)]
                if not private:
                    continue
                owner = ".".join(parts[: private[-1]])  # the package the private module belongs to
                if module == owner or module.startswith(owner + "."):
                    continue
                what = target
            bad.append(f"{module}:{line} imports {what}")
    return bad


def test_no_private_names_across_modules():
    """A private module (`ops._backend`) is imported only inside its own package; a private name
    (`budget._model_device`) only inside its own module."""
    bad = _private_uses(GRAPH)
    assert not bad, "private names used outside their module:\n" + "\n".join(bad)


def test_the_contract_sees_what_it_forbids():
    """The checks above on a made-up graph holding one of each violation (lazy or not, an import is
    an edge): they must report every one, or a green run would prove nothing."""
    graph = {
        "segevol_fast.model.network": [("segevol_fast.inference.segment", "", 1)],  # model -> inference
        "segevol_fast.inference.segment": [("segevol_fast.model.network", "", 1)],  # ... and back: a circle
        "segevol_fast.inference.cohort": [("segevol_fast.train.trainer", "", 2)],  # sibling
        "segevol_fast.inference.session": [
            ("segevol_fast.inference.budget", "_plan", 3),  # a private name
            ("segevol_fast.ops._backend", "", 4),
        ],  # a private module
        "segevol_fast.train.trainer": [],
        "segevol_fast.inference.budget": [],
        "segevol_fast.ops._backend": [],
    }
    upward = _upward(graph)
    assert any("model.network:1" in b for b in upward) and any("siblings" in b for b in upward), upward
    assert _cycles(graph) == [["segevol_fast.inference.segment", "segevol_fast.model.network"]]
    assert len(_private_uses(graph)) == 2
