"""Policies that extend others: `extends: FILE` or `extends: builtin:NAME`, flattened before validation.

A child policy is its base with the child's keys laid over it:
- top-level settings (`policy`, `version`, `model`, `review_band`, `categories`, ...) are replaced;
- `defaults`, `actions` and `special_care` merge key by key (`actions.blur.radius` alone changes
  only the blur radius);
- `concepts` (and `special_care.concepts`) merge by name: a child entry whose name is a base
  concept changes only the fields it gives (giving one of `prompts`, `embedding`, `examples`
  replaces the base's definition), any other entry is added at the end;
- `remove: [NAME, ...]` drops base concepts (regular or special-care) before the child's entries
  are merged, so removing and listing a name again redefines it from scratch.

The result is one ordinary policy document: validation, compilation, the digest and `policy diff`
see only the flattened policy. Every value keeps the file and line it was written on (`origins`),
so an error in an inherited value names the base's file, and relative file names (embeddings,
example folders, a model folder) are read from the folder of the file that wrote them.
A base named by path is relative to the file that says `extends` and must stay inside the folder
of the policy being loaded (symlinks resolved); `builtin:NAME` is a policy shipped with the
engine (`policies/NAME.yaml`, installed as package data).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from policy.errors import KeyPath, PolicyError, PolicyIssue, format_path, kind_of
from policy.paths import PathOutside, resolve_inside
from policy.yaml_loader import LoadedYaml, load_yaml

BUILTIN = "builtin:"
MAX_DEPTH = 16  # knob: longest chain of bases (a cycle is reported long before)
DEFINITION_KEYS = ("prompts", "embedding", "examples")
_CHILD_ONLY = ("extends", "remove")


def builtin_folder() -> Path:
    """The shipped policies: `policies/` beside this package (source tree or site-packages)."""
    return Path(__file__).resolve().parent.parent / "policies"


def builtin_names() -> list[str]:
    """Names accepted by `extends: builtin:NAME`."""
    folder = builtin_folder()
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def flatten_extends(loaded: LoadedYaml, file: str, read_text: Callable[[str], str]) -> LoadedYaml:
    """The document with its chain of bases merged in (unchanged when it extends nothing).

    read_text(file) reads a base's text, raising PolicyError about that file.
    """
    data = loaded.data
    if not isinstance(data, dict) or not any(key in data for key in _CHILD_ONLY):
        return loaded
    root = Path(file).absolute().parent.resolve()
    return _Flattener(read_text).flatten(_Layer(loaded, file), root, [])


class _Problem(Exception):
    """Why the base named at `extends` cannot be used."""


class _Layer:
    """One document of the chain and the file it was read from."""

    def __init__(self, loaded: LoadedYaml, file: str) -> None:
        self.loaded, self.file = loaded, file

    @property
    def data(self) -> Any:
        return self.loaded.data

    def issue(self, path: KeyPath, message: str, *, key: bool = False) -> PolicyIssue:
        origin, line, col = self.loaded.where(path, key=key)
        shown = format_path(self.loaded.source_path(path))
        return PolicyIssue(origin or self.file, line, col, shown, message)


class _Flattener:
    def __init__(self, read_text: Callable[[str], str]) -> None:
        self.read_text = read_text

    def flatten(self, child: _Layer, root: Path, chain: list[tuple[Path, str]]) -> LoadedYaml:
        data = child.data
        if "extends" not in data:
            message = "'remove' applies only to a policy that extends another (add 'extends')"
            raise PolicyError([child.issue(("remove",), message, key=True)])
        ref = data["extends"]
        if not isinstance(ref, str) or not ref.strip():
            got = "an empty string" if isinstance(ref, str) else kind_of(ref)
            message = f"expected a policy file name or {BUILTIN}NAME, got {got}"
            raise PolicyError([child.issue(("extends",), message)])
        try:
            base_file, base_root = _resolve(ref.strip(), child.file, root)
        except _Problem as problem:
            raise PolicyError([child.issue(("extends",), str(problem))]) from None
        here = (Path(child.file).absolute().resolve(), child.file)
        chain = [*chain, here]
        resolved = Path(base_file).resolve()
        seen = [path for path, _ in chain]
        if resolved in seen:
            loop = [name for _, name in chain[seen.index(resolved) :]] + [base_file]
            message = "extends cycle: " + " -> ".join(loop)
            raise PolicyError([child.issue(("extends",), message)])
        if len(chain) > MAX_DEPTH:
            message = f"extends chain is longer than {MAX_DEPTH} policies"
            raise PolicyError([child.issue(("extends",), message)])
        base = _Layer(load_yaml(self.read_text(base_file), base_file), base_file)
        if not isinstance(base.data, dict):
            message = f"the base policy must be a mapping, got {kind_of(base.data)}"
            raise PolicyError([base.issue((), message)])
        if any(key in base.data for key in _CHILD_ONLY):
            base = _Layer(self.flatten(base, base_root, chain), base_file)
        return _Merge(base, child).result()


def _resolve(ref: str, file: str, root: Path) -> tuple[str, Path]:
    """(base file as shown in messages, folder its own bases must stay in)."""
    if ref.startswith(BUILTIN):
        name, names = ref[len(BUILTIN) :], builtin_names()
        if name not in names:
            raise _Problem(f"no shipped policy '{name}' (shipped: {', '.join(names) or 'none'})")
        return str(builtin_folder() / f"{name}.yaml"), builtin_folder().resolve()
    shown = os.path.normpath(os.path.join(os.path.dirname(file), ref))
    try:
        found = resolve_inside(
            Path(file).absolute().parent,
            ref,
            root=root,
            relative=f"a path relative to this policy's folder, or {BUILTIN}NAME",
            shown=f"base policy '{ref}'",
        )
    except PathOutside as exc:
        raise _Problem(str(exc)) from None
    if not found.exists:
        raise _Problem(f"base policy '{ref}' not found")
    if not found.is_file:
        raise _Problem(f"base policy '{ref}' is not a file")
    return shown, root


def _name(item: Any) -> str | None:
    name = item.get("name") if isinstance(item, dict) else None
    return name if isinstance(name, str) else None


class _Merge:
    """The child laid over its (flattened) base, with every position copied from its layer."""

    def __init__(self, base: _Layer, child: _Layer) -> None:
        self.base, self.child = base, child
        self.out = LoadedYaml(data=None)
        self.removed = self._removed()

    def result(self) -> LoadedYaml:
        self.out.data = self._root()
        return self.out

    # -- positions -----------------------------------------------------------------------------

    def mark(self, layer: _Layer, src: KeyPath, dst: KeyPath) -> None:
        """Copy the position (value and key) of one node."""
        loaded = layer.loaded
        if src in loaded.values:
            self.out.values[dst] = loaded.values[src]
        if src in loaded.keys:
            self.out.keys[dst] = loaded.keys[src]
        if src in loaded.scalar_items:  # a list of scalars keeps its items' positions compact
            self.out.scalar_items[dst] = loaded.scalar_items[src]
        self.out.origins[dst] = loaded.origins.get(src, (layer.file, src))

    def copy(self, layer: _Layer, src: KeyPath, dst: KeyPath, value: Any) -> Any:
        """Copy a whole subtree's positions; returns the value."""
        self.mark(layer, src, dst)
        if isinstance(value, dict):
            for key, item in value.items():
                self.copy(layer, (*src, key), (*dst, key), item)
        elif isinstance(value, list) and src not in layer.loaded.scalar_items:
            for i, item in enumerate(value):
                self.copy(layer, (*src, i), (*dst, i), item)
        return value

    # -- merging -------------------------------------------------------------------------------

    def _removed(self) -> set[str]:
        value = self.child.data.get("remove")
        if value is None:
            return set()
        if not isinstance(value, list):
            message = f"expected a list of concept names, got {kind_of(value)}"
            raise PolicyError([self.child.issue(("remove",), message)])
        known = self._base_names()
        issues, names = [], set()
        for i, name in enumerate(value):
            if not isinstance(name, str):
                issues.append(
                    self.child.issue(("remove", i), f"expected a concept name, got {kind_of(name)}")
                )
            elif name not in known:
                listed = ", ".join(known[:20]) + (
                    f" and {len(known) - 20} more" if len(known) > 20 else ""
                )
                message = f"'{name}' is not a concept of the base policy {self.base.file} (it has: {listed or 'none'})"
                issues.append(self.child.issue(("remove", i), message))
            names.add(name)
        if issues:
            raise PolicyError(issues)
        return names

    def _base_names(self) -> list[str]:
        data = self.base.data
        items = list(data.get("concepts") or []) if isinstance(data.get("concepts"), list) else []
        care = data.get("special_care")
        if isinstance(care, dict) and isinstance(care.get("concepts"), list):
            items += care["concepts"]
        return [n for n in (_name(item) for item in items) if n is not None]

    def _root(self) -> dict[str, Any]:
        base, child = self.base.data, self.child.data
        self.mark(self.child, (), ())
        out: dict[str, Any] = {}
        for key, value in base.items():
            if key not in child:
                out[key] = self._inherit((key,), value)
        for key, value in child.items():
            if key in _CHILD_ONLY:
                continue
            path = (key,)
            if key not in base:
                out[key] = self.copy(self.child, path, path, value)
            elif key == "concepts" and isinstance(value, list) and isinstance(base[key], list):
                out[key] = self._concepts(path, base[key], value, self.child)
            elif key == "special_care" and isinstance(value, dict) and isinstance(base[key], dict):
                out[key] = self._mapping(path, base[key], value)
            elif (
                key in ("defaults", "actions")
                and isinstance(value, dict)
                and isinstance(base[key], dict)
            ):
                out[key] = self._mapping(path, base[key], value)
            else:
                out[key] = self.copy(self.child, path, path, value)
        if "special_care" in out and "special_care" not in child:
            care = out["special_care"]
            if isinstance(care, dict) and care.get("concepts") == [] and self.removed:
                del out["special_care"]  # every special-care concept was removed: no special care
        return out

    def _inherit(self, path: KeyPath, value: Any) -> Any:
        """A base value the child does not touch (concept lists still lose removed entries)."""
        if path in (("concepts",), ("special_care", "concepts")) and isinstance(value, list):
            return self._concepts(path, value, [], self.base)
        if path == ("special_care",) and isinstance(value, dict):
            self.mark(self.base, path, path)
            return {k: self._inherit((*path, k), v) for k, v in value.items()}
        return self.copy(self.base, path, path, value)

    def _mapping(
        self, path: KeyPath, base: dict[str, Any], child: dict[str, Any]
    ) -> dict[str, Any]:
        """Key by key: nested mappings merge, concept lists merge by name, the rest is replaced."""
        self.mark(self.child, path, path)
        out: dict[str, Any] = {}
        for key, value in base.items():
            if key not in child:
                out[key] = self._inherit((*path, key), value)
        for key, value in child.items():
            here, old = (*path, key), base.get(key)
            if (
                key == "concepts"
                and path == ("special_care",)
                and isinstance(value, list)
                and isinstance(old, list)
            ):
                out[key] = self._concepts(here, old, value, self.child)
            elif isinstance(value, dict) and isinstance(old, dict):
                out[key] = self._mapping(here, old, value)
            else:
                out[key] = self.copy(self.child, here, here, value)
        return out

    def _concepts(
        self, path: KeyPath, base: list[Any], child: list[Any], owner: _Layer
    ) -> list[Any]:
        """Base entries (less removed ones) in order, child entries merged by name or added;
        the list itself is positioned where `owner` wrote it."""
        self.mark(owner, path, path)
        entries: list[tuple[int | None, int | None]] = []  # (base index, child index)
        slot: dict[str, int] = {}
        for i, item in enumerate(base):
            name = _name(item)
            if name in self.removed:
                continue
            if name is not None and isinstance(item, dict):
                slot.setdefault(name, len(entries))
            entries.append((i, None))
        for j, item in enumerate(child):
            name = _name(item)
            k = slot.pop(name, None) if name is not None and isinstance(item, dict) else None
            if k is None:
                entries.append((None, j))
            else:
                entries[k] = (entries[k][0], j)
        out = []
        for new, (i, j) in enumerate(entries):
            dst = (*path, new)
            if j is None:
                out.append(self.copy(self.base, (*path, i), dst, base[i]))
            elif i is None:
                out.append(self.copy(self.child, (*path, j), dst, child[j]))
            else:
                out.append(self._concept(path, i, j, dst, base[i], child[j]))
        return out

    def _concept(
        self, path: KeyPath, i: int, j: int, dst: KeyPath, base: dict, child: dict
    ) -> dict[str, Any]:
        """One concept overridden field by field; a new definition replaces the old one."""
        self.mark(self.child, (*path, j), dst)
        redefined = any(key in child for key in DEFINITION_KEYS)
        out: dict[str, Any] = {}
        for key, value in base.items():
            if key not in child and not (redefined and key in DEFINITION_KEYS):
                out[key] = self.copy(self.base, (*path, i, key), (*dst, key), value)
        for key, value in child.items():
            out[key] = self.copy(self.child, (*path, j, key), (*dst, key), value)
        return out
