"""The package's import layers (``diffusion.LAYERS``): no import cycle between modules, no import of a higher layer.

Every module of the package is parsed with ``ast`` (nothing is imported), and every import statement counts, those
inside functions included, so a deferred import cannot hide a circle or an upward dependency. So do a module's
implied imports (``import diffusion.a.b`` runs ``diffusion/a/__init__.py`` first) and a string naming a module
(what ``importlib.import_module`` is given). The checks are tried on small planted graphs too, so that they cannot
pass by finding nothing.
"""

from __future__ import annotations

import ast
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

import pytest

import diffusion
from diffusion import LAYERS

PACKAGE = 'diffusion'
PACKAGE_DIR = os.path.dirname(os.path.abspath(diffusion.__file__))


class Module(NamedTuple):
    path: str
    source: str
    is_package: bool


class Edge(NamedTuple):
    importer: str
    target: str
    line: int


def read_package(folder: str = PACKAGE_DIR, package: str = PACKAGE) -> dict[str, Module]:
    """Every ``.py`` file under ``folder`` by dotted module name (``pkg/__init__.py`` is ``pkg``)."""
    modules = {}
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if d != '__pycache__')
        for name in sorted(f for f in files if f.endswith('.py')):
            path = os.path.join(root, name)
            parts = os.path.relpath(path, folder)[: -len('.py')].split(os.sep)
            is_package = parts[-1] == '__init__'
            dotted = '.'.join([package, *(parts[:-1] if is_package else parts)])
            with open(path, encoding='utf-8') as f:
                modules[dotted] = Module(path, f.read(), is_package)
    return modules


def _ancestors(name: str) -> list[str]:
    parts = name.split('.')
    return ['.'.join(parts[:i]) for i in range(1, len(parts))]


def import_edges(modules: Mapping[str, Module], package: str = PACKAGE) -> tuple[list[Edge], list[str]]:
    """The imports of ``package`` modules by ``package`` modules, and the imports that name no module of it."""
    edges, unknown = [], []
    for importer, module in modules.items():
        own_package = importer if module.is_package else importer.rpartition('.')[0]
        named: list[tuple[str, int]] = []
        tree = ast.parse(module.source, filename=module.path)
        # The layer table names every module without importing any.
        table = {
            id(constant)
            for node in tree.body
            if isinstance(node, ast.Assign) and any(getattr(t, 'id', None) == 'LAYERS' for t in node.targets)
            for constant in ast.walk(node)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                named += [(alias.name, node.lineno) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from the importer's package, one level up per extra dot
                    base = own_package.split('.')[: len(own_package.split('.')) - node.level + 1]
                    source = '.'.join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ''
                for alias in node.names:
                    submodule = f'{source}.{alias.name}'
                    named.append((submodule if submodule in modules else source, node.lineno))
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in table:
                if '.' in node.value and node.value in modules:  # a module imported by name (importlib)
                    named.append((node.value, node.lineno))
        for name, line in named:
            if name != package and not name.startswith(package + '.'):
                continue
            target = name
            if target not in modules:
                unknown.append(f'{module.path}:{line}: {importer} imports {name}, which is no module of {package}')
                continue
            # Importing a module runs its packages' __init__ first; the importer's own packages are running already.
            for implied in [*_ancestors(target), target]:
                if implied != importer and implied not in _ancestors(importer):
                    edges.append(Edge(importer, implied, line))
    return edges, unknown


def find_cycles(edges: Iterable[Edge]) -> list[list[str]]:
    """One import cycle (``[a, b, ..., a]``) per strongly connected group of modules (Tarjan's algorithm)."""
    graph: dict[str, list[str]] = {}
    for edge in edges:
        graph.setdefault(edge.importer, [])
        graph.setdefault(edge.target, [])
        if edge.target not in graph[edge.importer]:
            graph[edge.importer].append(edge.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(start: str) -> None:
        work = [(start, iter(graph[start]))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    group = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        group.append(member)
                        if member == node:
                            break
                    groups.append(group)
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(graph[child])))
            elif child in on_stack:
                low[node] = min(low[node], index[child])

    for node in sorted(graph):
        if node not in index:
            visit(node)
    cycles = []
    for group in groups:
        members = set(group)
        start = min(group)
        if len(group) == 1 and start not in graph[start]:
            continue
        # Shortest way back to start inside the group (breadth first).
        previous: dict[str, str] = {}
        frontier = [start]
        while start not in previous:
            following = []
            for node in frontier:
                for child in graph[node]:
                    if child in members and child not in previous:
                        previous[child] = node
                        following.append(child)
            frontier = following
        path = [start]
        while len(path) == 1 or path[-1] != start:
            path.append(previous[path[-1]])
        cycles.append(path[::-1])
    return sorted(cycles)


def layer_of(module: str, layers: Sequence[tuple[str, Sequence[str]]] = LAYERS) -> tuple[int, str] | None:
    """``(position from the bottom, layer name)`` of ``module``: its most specific entry in ``layers``."""
    best = None
    for position, (layer, entries) in enumerate(layers):
        for entry in entries:
            prefix = entry[:-2] if entry.endswith('.*') else entry
            if module == prefix or (entry.endswith('.*') and module.startswith(prefix + '.')):
                if best is None or len(prefix) > best[0]:
                    best = (len(prefix), position, layer)
    return None if best is None else best[1:]


def upward_imports(
    edges: Iterable[Edge], modules: Mapping[str, Module], layers: Sequence[tuple[str, Sequence[str]]] = LAYERS
) -> list[str]:
    """A message for each import of a module of a higher layer than the importer's."""
    found = []
    for edge in edges:
        importer, target = layer_of(edge.importer, layers), layer_of(edge.target, layers)
        if importer is None or target is None:  # test_the_layers_cover_every_module_once names it
            continue
        (low, low_name), (high, high_name) = importer, target
        if high > low:
            found.append(
                f'{modules[edge.importer].path}:{edge.line}: {edge.importer} (layer {low_name}) imports '
                f'{edge.target} (layer {high_name}, higher)'
            )
    return sorted(set(found))


def _format_cycle(cycle: list[str], edges: Iterable[Edge], modules: Mapping[str, Module]) -> str:
    lines = {(e.importer, e.target): e.line for e in edges}
    steps = [f'{modules[a].path}:{lines[a, b]}: {a} -> {b}' for a, b in zip(cycle, cycle[1:])]
    return ' -> '.join(cycle) + '\n    ' + '\n    '.join(steps)


@pytest.fixture(scope='module')
def package():
    modules = read_package()
    edges, unknown = import_edges(modules)
    return modules, edges, unknown


def test_the_layers_cover_every_module_once(package):
    modules, _, _ = package
    names = [layer for layer, _ in LAYERS]
    assert len(names) == len(set(names)), f'Layer names repeat: {names}'
    entries = [entry for _, group in LAYERS for entry in group]
    assert len(entries) == len(set(entries)), f'An entry is in two layers: {entries}'
    unassigned = [name for name in modules if layer_of(name) is None]
    assert not unassigned, f'Add these modules to diffusion.LAYERS: {", ".join(unassigned)}'
    unused = [e for e in entries if not any(layer_of(name, [('x', [e])]) for name in modules)]
    assert not unused, f'diffusion.LAYERS names modules that do not exist: {", ".join(unused)}'


def test_every_import_names_a_module_of_the_package(package):
    _, _, unknown = package
    assert not unknown, '\n'.join(unknown)


def test_no_import_cycles(package):
    modules, edges, _ = package
    cycles = find_cycles(edges)
    assert not cycles, 'Import cycles:\n' + '\n'.join(_format_cycle(c, edges, modules) for c in cycles)


def test_no_module_imports_a_higher_layer(package):
    modules, edges, _ = package
    upward = upward_imports(edges, modules)
    assert not upward, 'Imports of a higher layer (see diffusion.LAYERS):\n' + '\n'.join(upward)


def _planted(sources: dict[str, str]) -> dict[str, Module]:
    packages = {name for name in sources for other in sources if other.startswith(name + '.')}
    return {name: Module(f'{name.replace(".", "/")}.py', source, name in packages) for name, source in sources.items()}


PLANTED_LAYERS = (('low', ('diffusion', 'diffusion.low.*')), ('high', ('diffusion.high',)))


def test_the_checks_find_a_planted_cycle_and_upward_import():
    modules = _planted(
        {
            'diffusion': '',
            'diffusion.low': 'from diffusion.low import a\n',
            # Deferred and relative: still an import of diffusion.low.b by diffusion.low.a.
            'diffusion.low.a': 'import os\n\n\ndef f():\n    from . import b\n    return b, os\n',
            'diffusion.low.b': 'def g():\n    import diffusion.high\n',
            'diffusion.high': "import importlib\n\nMODULE = importlib.import_module('diffusion.low.a')\n",
        }
    )
    edges, unknown = import_edges(modules)
    assert not unknown
    assert set(edges) >= {
        Edge('diffusion.low.a', 'diffusion.low.b', 5),
        Edge('diffusion.low.b', 'diffusion.high', 2),
        Edge('diffusion.high', 'diffusion.low', 3),  # the package diffusion.low is run before diffusion.low.a
        Edge('diffusion.high', 'diffusion.low.a', 3),
    }
    # The shortest way round: diffusion.high names diffusion.low.a itself.
    assert find_cycles(edges) == [['diffusion.high', 'diffusion.low.a', 'diffusion.low.b', 'diffusion.high']]
    assert upward_imports(edges, modules, PLANTED_LAYERS) == [
        'diffusion/low/b.py:2: diffusion.low.b (layer low) imports diffusion.high (layer high, higher)'
    ]
    message = _format_cycle(find_cycles(edges)[0], edges, modules)
    assert 'diffusion/low/b.py:2: diffusion.low.b -> diffusion.high' in message


def test_the_checks_accept_a_layered_package():
    modules = _planted(
        {
            'diffusion': '',
            # A package importing its modules, which import each other through it, is no cycle: it runs first.
            'diffusion.low': 'from diffusion.low.a import A\nfrom diffusion.low.b import B\n',
            'diffusion.low.a': 'A = 1\n',
            'diffusion.low.b': 'from diffusion.low import a\n\nB = a.A\n',
            'diffusion.high': 'from diffusion.low import A\nfrom diffusion.low.b import B\n',
        }
    )
    edges, unknown = import_edges(modules)
    assert not unknown and edges
    assert find_cycles(edges) == []
    assert upward_imports(edges, modules, PLANTED_LAYERS) == []


def test_an_import_of_a_missing_module_is_reported():
    modules = _planted({'diffusion': '', 'diffusion.low': 'from diffusion.gone import x\n'})
    assert import_edges(modules)[1] == [
        'diffusion/low.py:1: diffusion.low imports diffusion.gone, which is no module of diffusion'
    ]
