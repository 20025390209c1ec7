"""The import graph of `policy` and `moderation`: no cycles, `policy` independent of
`moderation`, the engine core free of the review, lifecycle and CLI layers, no runtime module
importing a test helper, and every name imported from the module that defines it (no re-exports).

Every `import` counts, including those inside functions (lazy imports still tie modules together),
except those under `if TYPE_CHECKING:`.
"""

from __future__ import annotations

import ast
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("policy", "moderation")
# Modules that build synthetic checkpoints or records: the demo, the benchmark and tests use them;
# the engine, storage, review queue, integrations and CLI must not.
SYNTHETIC = ("moderation.synthetic",)
MAY_USE_SYNTHETIC = ("moderation.demo", "moderation.bench")
# Modules directly in moderation/ that are not the engine core: what every package shares (the
# error base, output escaping, tables and numbers, time), the entry point and the tools. Each is
# a node of its own in the package graph.
STANDALONE = (
    "moderation.errors",
    "moderation.text",
    "moderation.times",
    "moderation.tables",
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


def imported_module(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    """The absolute name of the module a `from ... import` statement of `importer` reads."""
    base = node.module or ""
    if node.level:
        parent = importer if is_package else importer.rpartition(".")[0]
        for _ in range(node.level - 1):
            parent = parent.rpartition(".")[0]
        base = f"{parent}.{base}" if base else parent
    return base


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
                base = imported_module(child, name, is_package)
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


# Layers the engine core (the modules directly in moderation/: encode, score, decide, act, log)
# must not reach: they are built on it.
ABOVE_THE_CORE = ("moderation.review", "moderation.lifecycle", "moderation.cli")


def test_the_engine_core_imports_no_review_lifecycle_or_cli():
    edges = graph()
    bad = {
        (module, target)
        for module, targets in edges.items()
        if package_of(module) == "moderation"
        for target in targets
        if target.startswith(ABOVE_THE_CORE)
    }
    assert bad == set()


# -- re-exports ---------------------------------------------------------------------------------


def defined_names(path: Path) -> set[str]:
    """Names a module defines at its top level (functions, classes, assignments), also inside
    top-level if/try blocks; not the names it imports."""
    found: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                found.add(node.name)
            elif isinstance(node, ast.Assign):
                for target in node.targets:
                    found.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
            elif isinstance(node, ast.AnnAssign | ast.AugAssign) and isinstance(
                node.target, ast.Name
            ):
                found.add(node.target.id)
            elif isinstance(node, ast.If | ast.Try | ast.With):
                for block in ("body", "orelse", "finalbody"):
                    visit(getattr(node, block, []))
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)

    visit(ast.parse(path.read_text(encoding="utf-8")).body)
    return found


def reexported_imports(files: dict[str, Path], homes: dict[str, Path]) -> list[str]:
    """`from A import N` in `files` where A is a project module (not a package: a package's
    __init__ is its public face) that does not define N but imports it from elsewhere."""
    defined = {name: defined_names(path) for name, path in homes.items()}
    found = []
    for importer, path in sorted(files.items()):
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ImportFrom):
                continue
            source = imported_module(node, importer, is_package)
            home = homes.get(source)
            if home is None or home.name == "__init__.py":
                continue
            for alias in node.names:
                if alias.name != "*" and alias.name not in defined[source]:
                    found.append(f"{importer}: {alias.name} from {source}")
    return found


def test_no_module_reexports_another_modules_names():
    # Every name is imported from the module that defines it: the runtime packages and the
    # tests alike, so that moving a function moves its importers, not a shim.
    homes = modules()
    tests = {module_name(p): p for p in sorted((ROOT / "tests").glob("*.py"))}
    assert reexported_imports({**homes, **tests}, homes) == []


def test_no_module_lists_another_modules_names_in_all():
    # A package's __init__ is its public face; any other module's __all__ is its own names.
    bad = {}
    for name, path in modules().items():
        if path.name == "__init__.py":
            continue
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
            ):
                listed = {e.value for e in node.value.elts}  # type: ignore[attr-defined]
                if listed - defined_names(path):
                    bad[name] = sorted(listed - defined_names(path))
    assert bad == {}


def test_the_reexport_check_can_fail(tmp_path):
    (tmp_path / "home.py").write_text("import os\nfrom json import dumps\nVALUE = 1\n")
    (tmp_path / "user.py").write_text("from home import VALUE, dumps, os\n")
    homes = {"home": tmp_path / "home.py", "user": tmp_path / "user.py"}
    assert reexported_imports(homes, homes) == ["user: dumps from home", "user: os from home"]


# -- size ---------------------------------------------------------------------------------------

# A guide, not a rule: modules are split by job, and a module over this many lines is a question
# to ask (two jobs in one?), so it is reported as a warning rather than a failure.
SIZE_GUIDE = 600


def test_modules_over_the_size_guide_are_reported():
    sizes = {n: len(p.read_text().splitlines()) for n, p in modules().items()}
    for name, size in sorted(sizes.items()):
        if size > SIZE_GUIDE:
            warnings.warn(
                f"{name} has {size} lines (guide: {SIZE_GUIDE}): does it do more than one job?",
                stacklevel=1,
            )
