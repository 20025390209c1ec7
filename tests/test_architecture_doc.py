"""docs/architecture.md lists every module of `policy` and `moderation`, one line each, and
names none that is gone.

The list is the fenced block under "## The modules": a tree of folder lines (`name/`) and module
lines (`name.py`), two spaces of indent per level. A package's folder line stands for its
`__init__.py`. One package, moderation/server/ (the HTTP service, merged from another branch), is
covered as a whole by its folder line.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "architecture.md"
PACKAGES = ("policy", "moderation")
# Packages whose modules are covered by their folder line alone (and that may not be here yet).
COVERED_BY_FOLDER = ("moderation/server/",)

ENTRY = re.compile(r"^( *)(\S+?(?:\.py|/))(?:\s|$)")


def tree_block(text: str) -> list[str]:
    """The lines of the first fenced block after the "## The modules" heading."""
    after = text.split("\n## The modules\n", 1)
    assert len(after) == 2, "docs/architecture.md has no '## The modules' section"
    lines = after[1].splitlines()
    start = lines.index("```") + 1
    end = lines.index("```", start)
    return lines[start:end]


def listed_paths(lines: list[str]) -> list[str]:
    """Every entry of the tree as a path from the repository root (folders end with '/')."""
    stack: list[str] = []
    found = []
    for line in lines:
        match = ENTRY.match(line)
        if match is None:
            continue
        indent, name = len(match.group(1)), match.group(2)
        depth = indent // 2
        if depth > len(stack):
            # A continuation line of a description, indented further than any entry.
            continue
        if indent % 2:
            raise AssertionError(f"odd indent in the module list: {line!r}")
        del stack[depth:]
        path = "".join(stack) + name
        found.append(path)
        if name.endswith("/"):
            stack.append(name)
    return found


def modules_on_disk() -> set[str]:
    found = set()
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            rel = path.relative_to(ROOT).as_posix()
            if rel.startswith(COVERED_BY_FOLDER):
                continue
            if path.name == "__init__.py":
                rel = rel[: -len("__init__.py")]
            found.add(rel)
    return found


def missing_and_stale(listed: list[str]) -> tuple[set[str], set[str]]:
    on_disk = modules_on_disk()
    listed_set = set(listed)
    missing = on_disk - listed_set
    stale = {
        path
        for path in listed_set
        if not path.startswith(COVERED_BY_FOLDER) and not (ROOT / path).exists()
    }
    return missing, stale


def test_every_module_has_its_line_and_no_line_names_a_module_that_is_gone():
    listed = listed_paths(tree_block(DOC.read_text(encoding="utf-8")))
    missing, stale = missing_and_stale(listed)
    assert sorted(missing) == [], "modules not in docs/architecture.md"
    assert sorted(stale) == [], "docs/architecture.md names paths that do not exist"
    duplicates = sorted({path for path in listed if listed.count(path) > 1})
    assert duplicates == [], "modules listed twice in docs/architecture.md"
    for folder in COVERED_BY_FOLDER:
        assert folder in listed


def test_the_check_finds_a_missing_module_and_a_stale_line():
    listed = listed_paths(
        [
            "moderation/              the engine",
            "  engine.py              Moderator",
            "                         a continuation line, not an entry",
            "  kernel/                the kernel",
            "    rule.py              the rule",
            "    gone.py              removed since",
            "  server/                the HTTP service",
        ]
    )
    assert listed == [
        "moderation/",
        "moderation/engine.py",
        "moderation/kernel/",
        "moderation/kernel/rule.py",
        "moderation/kernel/gone.py",
        "moderation/server/",
    ]
    missing, stale = missing_and_stale(listed)
    assert "moderation/decision.py" in missing
    assert "policy/" in missing
    assert "moderation/kernel/document.py" in missing
    assert stale == {"moderation/kernel/gone.py"}
