"""The import graph of `policy` and `moderation`: no cycles, and no runtime module imports a test helper.

Every `import` counts, including those inside functions (lazy imports still tie modules together),
except those under `if TYPE_CHECKING:`.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("policy", "moderation")
# Modules that build synthetic checkpoints or records: the demo, the benchmark and tests use them;
# the engine, storage, review queue, integrations and CLI must not.
SYNTHETIC = ("moderation.synthetic",)
MAY_USE_SYNTHETIC = ("moderation.demo", "moderation.bench")
# Modules directly in moderation/ that are not the engine core: the error base and the output
# escaping every package shares, the entry point and the tools. Each is a node of its own in the
# package graph.
STANDALONE = (
    "moderation.errors",
    "moderation.text",
    "moderation.__main__",
    "moderation.demo",
    "moderation.synthetic",
)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            found[module_name(path)] = path
    return found


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Project modules that `name` imports (a package import counts as its __init__)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    is_package = path.name == "__init__.py"
    found: set[str] = set()

    def resolve(target: str) -> None:
        # `from a.b import c` may import module a.b.c or name c of a.b: take the longest known.
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking_only(child):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    resolve(alias.name)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parent = name if is_package else name.rpartition(".")[0]
                    for _ in range(child.level - 1):
                        parent = parent.rpartition(".")[0]
                    base = f"{parent}.{base}" if base else parent
                for alias in child.names:
                    resolve(f"{base}.{alias.name}")
            visit(child)

    visit(tree)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    # Test modules are known too, so that an import of one from runtime code is seen.
    known = set(mods) | {module_name(p) for p in (ROOT / "tests").glob("*.py")}
    return {name: imports_of(name, path, known) for name, path in mods.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                strong(w)
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
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            strong(v)
    return found


def package_of(module: str) -> str:
    """The node of a module in the package graph.

    Subpackages of `moderation` (storage, review, ...) are one node each; the core modules directly
    in `moderation/` are one node, except the STANDALONE ones.
    A package's own `__init__` belongs to it.
    """
    parts = module.split(".")
    if parts[0] == "policy":
        return "policy"
    if module in STANDALONE:
        return module
    if len(parts) >= 2 and (ROOT / "moderation" / parts[1]).is_dir():
        return ".".join(parts[:2])
    return "moderation"


def package_graph(edges: dict[str, set[str]]) -> dict[str, set[str]]:
    packages: dict[str, set[str]] = {}
    for source, targets in edges.items():
        node = package_of(source)
        packages.setdefault(node, set())
        for target in targets:
            other = package_of(target)
            # Importing a subpackage's __init__ from the root only makes the root depend on it.
            if other != node:
                packages[node].add(other)
    return packages


def test_no_module_cycles():
    assert cycles(graph()) == []


def test_no_package_cycles():
    assert cycles(package_graph(graph())) == []


def test_policy_imports_nothing_from_moderation():
    edges = graph()
    bad = {m: sorted(t for t in ts if t.startswith("moderation")) for m, ts in edges.items()}
    assert {m: ts for m, ts in bad.items() if m.startswith("policy") and ts} == {}


def test_runtime_modules_import_no_test_or_synthetic_helpers():
    edges = graph()
    bad = {}
    for module, targets in edges.items():
        allowed = module in SYNTHETIC or module.startswith(MAY_USE_SYNTHETIC)
        wrong = sorted(t for t in targets if t in SYNTHETIC and not allowed)
        wrong += sorted(t for t in targets if t.startswith("tests"))
        if wrong:
            bad[module] = wrong
    assert bad == {}


def test_the_checker_finds_a_cycle(tmp_path):
    # The check itself must be able to fail.
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_is_over_the_size_limit():
    # Modules stay small and single-purpose; a longer one wants splitting by job.
    limit = 420
    long = {n: len(p.read_text().splitlines()) for n, p in modules().items()}
    assert {n: size for n, size in long.items() if size > limit} == {}
