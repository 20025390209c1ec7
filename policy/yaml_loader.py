"""Safe YAML loading that remembers where every key and value is (1-based line and column).

Only plain data comes out: mappings, lists, strings, numbers, booleans and null. The loader
composes nodes with `yaml.SafeLoader` and builds the values itself, so no tag ever reaches a
constructor: `!!python/...`, `!!binary`, `!custom` and the like are errors, never objects.
Scalars follow the YAML 1.2 core schema: `yes`/`no`/`on`/`off` and dates stay strings, `1e-3`
is a number.

Speed: nodes are composed by libyaml (`yaml.CParser`) when PyYAML has it, about 20 times faster
than PyYAML's pure-Python parser (a policy of 100,000 concepts is millions of scalars). Anything
the fast path would report differently (a syntax error, an alias) is parsed again by the
pure-Python composer, so messages are the same with or without libyaml.
"""

from __future__ import annotations

import codecs
import gc
import re
from array import array
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import yaml
from yaml.composer import ComposerError
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from policy.errors import KeyPath, PolicyError, PolicyIssue, format_path

Position = tuple[int, int]  # (line, col), 1-based

_TAG = "tag:yaml.org,2002:"
_STR = _TAG + "str"
_SYNTAX_PATH = "(yaml)"
# YAML 1.1 resolvers replaced by YAML 1.2 core ones; timestamps are dropped (dates stay strings).
_DROPPED = {_TAG + "bool", _TAG + "float", _TAG + "timestamp"}
_BOOL = re.compile(r"(?:true|True|TRUE|false|False|FALSE)\Z")
_FLOAT = re.compile(
    r"""(?:[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
          |[0-9][0-9_]*[eE][-+]?[0-9]+
          |\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
          |\.(?:inf|Inf|INF))
        |\.(?:nan|NaN|NAN))\Z""",
    re.X,
)


class PolicyYamlLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 core scalars and no aliases; used only to compose nodes."""

    yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag not in _DROPPED]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        # Aliases would let a few lines expand into millions of values ("billion laughs").
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise ComposerError(
                None, None, f"YAML aliases (*{event.anchor}) are not supported", event.start_mark
            )
        return super().compose_node(parent, index)


PolicyYamlLoader.add_implicit_resolver(_TAG + "bool", _BOOL, list("tTfF"))
PolicyYamlLoader.add_implicit_resolver(_TAG + "float", _FLOAT, list("-+0123456789."))

try:
    from yaml.cyaml import CParser as _CParser
except ImportError:  # PyYAML built without libyaml
    _CParser = None

if _CParser is not None:

    class _FastComposer(_CParser, yaml.constructor.SafeConstructor, yaml.resolver.Resolver):
        """libyaml's composer with the same YAML 1.2 core resolvers as PolicyYamlLoader."""

        yaml_implicit_resolvers = PolicyYamlLoader.yaml_implicit_resolvers

        def __init__(self, stream: str) -> None:
            _CParser.__init__(self, stream)
            yaml.constructor.SafeConstructor.__init__(self)
            yaml.resolver.Resolver.__init__(self)


@contextmanager
def paused_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector while a large policy's objects are built.

    The collector rescans every live object each time enough new ones pile up, so building the
    millions of (acyclic) nodes, values and models of a large policy cost more in collections
    than in parsing: composing 10,000 concepts took 1.06 s of CPU with it, 0.29 s without.
    Nothing built here holds a cycle that must be collected meanwhile; it runs again after.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class _Alias(Exception):
    """The fast composer shared one node between two places: the text uses an alias."""


@dataclass
class LoadedYaml:
    """Plain data plus the position of every value and key, by key path.

    Items of lists that hold only scalars (an inline embedding is one) are kept apart, as one
    compact array of (line, col) per list: a dict entry per number would take gigabytes for a
    policy of 100,000 inline embeddings.

    A policy flattened from several files (`extends`, see policy/extends.py) also knows which
    file each value came from (`origins`); a single document leaves it empty.
    """

    data: Any
    values: dict[KeyPath, Position] = field(default_factory=dict)
    keys: dict[KeyPath, Position] = field(default_factory=dict)
    scalar_items: dict[KeyPath, array] = field(default_factory=dict)  # [line0, col0, line1, ...]
    origins: dict[KeyPath, tuple[str, KeyPath]] = field(default_factory=dict)  # (file, path there)

    def locate(self, path: KeyPath, *, key: bool = False) -> Position:
        """Position of the key (or value) at `path`, else of its nearest ancestor's value."""
        return self.where(path, key=key)[1:]

    def where(self, path: KeyPath, *, key: bool = False) -> tuple[str | None, int, int]:
        """(file, line, col) of the key (or value) at `path`, else of its nearest ancestor's
        value; file is None for the document's own file."""
        if key and path in self.keys:
            return (self.origins.get(path, (None,))[0], *self.keys[path])
        while path not in self.values and path:
            items = self.scalar_items.get(path[:-1])
            index = path[-1]
            if items is not None and isinstance(index, int) and 0 <= index < len(items) // 2:
                origin = self.origins.get(path[:-1], (None,))[0]
                return origin, items[2 * index], items[2 * index + 1]
            path = path[:-1]
        return (self.origins.get(path, (None,))[0], *self.values.get(path, (1, 1)))

    def source_path(self, path: KeyPath) -> KeyPath:
        """`path` as it is written in the file its value came from (list indexes of a base)."""
        here = path
        while here and here not in self.origins:
            here = here[:-1]
        if here not in self.origins:
            return path
        return (*self.origins[here][1], *path[len(here) :])


def _position(node: Node) -> Position:
    return node.start_mark.line + 1, node.start_mark.column + 1


def _short_tag(tag: str) -> str:
    return "!!" + tag[len(_TAG) :] if tag.startswith(_TAG) else tag


class _Builder:
    """Turns composed nodes into plain values, recording positions and collecting issues."""

    def __init__(self, file: str, loader: Any, *, find_aliases: bool = False) -> None:
        self.file = file
        self.loader = loader
        self.result = LoadedYaml(data=None)
        self.issues: list[PolicyIssue] = []
        # The fast composer resolves an alias to the node it names: the same object twice.
        self.seen: set[int] | None = set() if find_aliases else None

    def fail(self, node: Node, path: KeyPath, message: str) -> None:
        line, col = _position(node)
        self.issues.append(PolicyIssue(self.file, line, col, format_path(path), message))

    def build(self, node: Node, path: KeyPath) -> Any:
        if self.seen is not None:
            if id(node) in self.seen:
                raise _Alias
            self.seen.add(id(node))
        self.result.values[path] = _position(node)
        if isinstance(node, MappingNode):
            if node.tag != _TAG + "map":
                return self.fail(node, path, f"unsupported YAML tag {_short_tag(node.tag)}")
            return self.build_mapping(node, path)
        if isinstance(node, SequenceNode):
            if node.tag != _TAG + "seq":
                return self.fail(node, path, f"unsupported YAML tag {_short_tag(node.tag)}")
            if node.value and all(type(item) is ScalarNode for item in node.value):
                return self.build_scalar_items(node, path)
            return [self.build(item, (*path, i)) for i, item in enumerate(node.value)]
        return self.build_scalar(node, path)

    def build_scalar_items(self, node: SequenceNode, path: KeyPath) -> list[Any]:
        """A list of scalars, with item positions in one compact array."""
        positions = array("l")
        values = []
        for i, item in enumerate(node.value):
            if self.seen is not None:
                if id(item) in self.seen:
                    raise _Alias
                self.seen.add(id(item))
            mark = item.start_mark
            positions.append(mark.line + 1)
            positions.append(mark.column + 1)
            values.append(self.build_scalar(item, (*path, i)))
        self.result.scalar_items[path] = positions
        return values

    def build_mapping(self, node: MappingNode, path: KeyPath) -> dict[str, Any]:
        mapping: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, ScalarNode):
                self.fail(key_node, path, "a key must be a plain name, not a list or mapping")
                continue
            # The key as written: `yes:` and `1:` stay the names "yes" and "1".
            key = key_node.value
            key_path = (*path, key)
            if key_node.tag != _STR:
                self.build_scalar(key_node, key_path)  # rejects tags on keys
            if key in mapping:
                line, _ = self.result.keys[key_path]
                self.fail(key_node, key_path, f"duplicate key '{key}' (first given on line {line})")
                continue
            self.result.keys[key_path] = _position(key_node)
            mapping[key] = self.build(value_node, key_path)
        return mapping

    def build_scalar(self, node: ScalarNode, path: KeyPath) -> Any:
        tag = node.tag.removeprefix(_TAG)
        try:
            if tag == "float":
                try:  # the common spelling (0.25, -1e-3), without PyYAML's slower constructor
                    return float(node.value)
                except ValueError:  # .inf, .NaN, 1_000.5 ...
                    return self.loader.construct_yaml_float(node)
            if tag == "null":
                return None
            if tag == "bool":
                return self.loader.construct_yaml_bool(node)
            if tag == "int":
                value = node.value
                if value.isdecimal() and value.isascii() and (value[0] != "0" or value == "0"):
                    return int(value)  # a plain decimal (PyYAML reads 0123 as octal, 1_0 as 10)
                return self.loader.construct_yaml_int(node)
        except (ValueError, KeyError):
            return self.fail(node, path, f"cannot read {node.value[:40]!r} as !!{tag}")
        if tag in ("str", "merge", "value"):  # `<<` and `=` are plain text here
            return node.value
        return self.fail(node, path, f"unsupported YAML tag {_short_tag(node.tag)}")


def _syntax_issue(file: str, text: str, exc: yaml.YAMLError) -> PolicyIssue:
    """A parser error at the position of the problem."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        line, col = exc.problem_mark.line + 1, exc.problem_mark.column + 1
        message = exc.problem or "invalid YAML"
        if exc.context and message.startswith("but "):  # "expected X ..., but found Y"
            message = f"{exc.context}, {message}"
        elif exc.context and exc.context_mark is not None:
            message += f" ({exc.context} on line {exc.context_mark.line + 1})"
    elif isinstance(exc, yaml.reader.ReaderError):
        line = text.count("\n", 0, exc.position) + 1
        col = exc.position - (text.rfind("\n", 0, exc.position) + 1) + 1
        message = f"character U+{exc.character:04X} is not allowed in YAML"
    else:
        line, col, message = 1, 1, str(exc)
    return PolicyIssue(file, line, col, _SYNTAX_PATH, message)


def decode_policy_text(raw: bytes, file: str) -> str:
    """A policy file's text: UTF-8, a leading BOM dropped. A byte that is not UTF-8 is a
    PolicyError at its FILE:LINE:COL, like every other policy error."""
    body = raw[len(codecs.BOM_UTF8) :] if raw.startswith(codecs.BOM_UTF8) else raw
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as exc:
        before = body[: exc.start]  # valid UTF-8: decoding stopped at the first bad byte
        line = before.count(b"\n") + 1
        col = len(before[before.rfind(b"\n") + 1 :].decode("utf-8")) + 1
        message = (
            f"byte 0x{body[exc.start]:02X} is not UTF-8 text ({exc.reason}); save the file as UTF-8"
        )
        raise PolicyError([PolicyIssue(file, line, col, _SYNTAX_PATH, message)]) from None


def load_yaml(text: str, file: str) -> LoadedYaml:
    """Parse one YAML document into plain data with positions; raise PolicyError on any problem."""
    if _CParser is not None:
        try:
            return _load(text, file, _FastComposer, find_aliases="*" in text)
        except (yaml.YAMLError, _Alias):
            pass  # the pure-Python composer says what is wrong, with its own messages
    return _load(text, file, PolicyYamlLoader)


def _load(text: str, file: str, composer: type, *, find_aliases: bool = False) -> LoadedYaml:
    try:
        loader = composer(text)
        try:
            node = loader.get_single_node()
            if node is None:
                raise PolicyError([PolicyIssue(file, 1, 1, "<root>", "the file is empty")])
            builder = _Builder(file, loader, find_aliases=find_aliases)
            builder.result.data = builder.build(node, ())
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        if composer is not PolicyYamlLoader:
            raise
        raise PolicyError([_syntax_issue(file, text, exc)]) from None
    except RecursionError:
        raise PolicyError([PolicyIssue(file, 1, 1, _SYNTAX_PATH, "nested too deeply")]) from None
    if builder.issues:
        raise PolicyError(builder.issues)
    return builder.result
