"""The package's imports: no cycle between modules, and no package importing a higher layer.

Every import counts, including those inside functions: a deferred import hides a cycle from the
interpreter, not from a reader. Imports are read with ``ast`` (nothing is executed), relative ones
resolved against the importing module's package.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

import flashu_compile

ROOT = Path(flashu_compile.__file__).parent

# Lowest first. A unit (a subpackage or a top-level module of flashu_compile) may import units of lower layers
# only; units sharing a layer do not import each other.
LAYERS: list[tuple[str, ...]] = [
    ("validate", "files"),  # argument checks and file helpers, shared by everything
    ("runtime",),  # per-request step state read by guard ops
    ("options",),  # knobs and presets
    ("graph",),  # analysis of FX graphs and the FX utilities passes share
    ("passes",),  # the rewrites
    ("backends",),  # lowering of a rewritten graph
    ("models",),  # Show-o2 on transformers parts; knows the compiler only through its marker ops (see below)
    ("scenes",),  # the embedded model's data and scorers
    ("calibrate",),  # plans, scored on a model
    ("backend",),  # the "flashu" entry point
    ("tasks",),  # Show-o2's task entry points compiled
    ("tools", "__init__"),  # command lines and the package's public names
]


def module_name(path: Path) -> str:
    parts = ["flashu_compile", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in ROOT.rglob("*.py")}


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules ``name`` imports; ``from pkg import sub`` counts as importing ``pkg.sub`` alone
    when ``sub`` is a module (so a package's submodules importing their siblings is not a cycle through it)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            submodules = {f"{source}.{alias.name}" for alias in node.names} & known
            found.update(submodules)
            if len(submodules) < len(node.names):
                found.add(source)
    return {target for target in found if target in known and target != name}


def import_graph() -> nx.DiGraph:
    found = modules()
    graph = nx.DiGraph()
    graph.add_nodes_from(found)
    for name, path in found.items():
        graph.add_edges_from((name, target) for target in imports(name, path, set(found)))
    return graph


def unit(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_imports_are_read_with_relative_and_deferred_imports_resolved():
    graph = import_graph()
    # A relative import at module level, and one inside a function.
    assert "flashu_compile.runtime.guards" in graph["flashu_compile.graph.specialize"]
    assert "flashu_compile.models.showo2.checkpoint" in graph["flashu_compile.models.showo2.modeling"]


def test_no_module_imports_itself_through_others():
    cycles = sorted(" -> ".join([*cycle, cycle[0]]) for cycle in nx.simple_cycles(import_graph()))
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_every_unit_has_a_layer():
    declared = {u for layer in LAYERS for u in layer}
    assert {unit(name) for name in import_graph()} <= declared


def test_no_package_imports_a_higher_or_sibling_layer():
    layer = {u: i for i, units in enumerate(LAYERS) for u in units}
    back = sorted(f"{a} ({unit(a)}) imports {b} ({unit(b)})" for a, b in import_graph().edges
                  if unit(a) != unit(b) and layer[unit(a)] <= layer[unit(b)])
    assert not back, "imports against the layer order:\n" + "\n".join(back)


def test_loading_the_backend_imports_neither_transformers_nor_the_model():
    """Dynamo loads the ``flashu`` backend by its entry point: that must not cost the model's imports."""
    import subprocess
    import sys

    probe = ("import sys, flashu_compile.backend; "
             "print(sorted(m for m in sys.modules if m == 'transformers' or m.startswith('flashu_compile.models') "
             "or m.startswith('flashu_compile.calibrate')))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_the_model_knows_nothing_of_the_compiler_but_its_marker_ops():
    """Show-o2 is a model: no compile helper, option, request or schedule; it asks a compiled call for sampler
    rules by duck type (see Showo2.compile). What it may use: argument checks, file helpers, and the marker op
    that tells token_drop where an answer's image tokens are (a fact only the model knows)."""
    allowed = {"flashu_compile.validate", "flashu_compile.files", "flashu_compile.runtime.markers"}
    graph = import_graph()
    used = sorted(f"{a} imports {b}" for a, b in graph.edges
                  if unit(a) == "models" and unit(b) != "models" and b not in allowed)
    assert not used, "\n".join(used)
