"""load_policy: read, parse, validate a policy file and resolve its embeddings and model."""

from __future__ import annotations

import difflib
import json
import logging
import os
import typing
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ValidationError

from policy.embedding_files import EmbeddingFiles, EmbeddingProblem
from policy.errors import KeyPath, PolicyError, PolicyIssue, format_path, kind_of
from policy.examples import resolve_examples
from policy.extends import flatten_extends
from policy.schema import EMBEDDING_TAGS, THRESHOLD_TAGS, CheckpointRef, Policy
from policy.yaml_loader import LoadedYaml, decode_policy_text, load_yaml, paused_gc

log = logging.getLogger(__name__)

# Inline embedding numbers above which loading warns (YAML takes ~5 us of CPU per number, so
# about a second; 260 concepts of ViT-L/14's 768 values). Embedding files take microseconds a row.
INLINE_NUMBERS_WARNING = 200_000

_EXPECTED = {
    "float_type": "a number",
    "float_parsing": "a number",
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "string_type": "a string",
    "bool_type": "true or false",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
}
_BOUNDS = {
    "greater_than": ("gt", "must be greater than {}"),
    "greater_than_equal": ("ge", "must be at least {}"),
    "less_than": ("lt", "must be less than {}"),
    "less_than_equal": ("le", "must be at most {}"),
}


def load_policy(path: str | os.PathLike[str], *, embed_dim: int | None = None) -> Policy:
    """Load a policy file; raise PolicyError listing every problem at FILE:LINE:COL."""
    file = os.fspath(path)
    text = _read_text(file)
    with paused_gc():
        return _load(file, text, embed_dim)


def _load(file: str, text: str, embed_dim: int | None) -> Policy:
    # `extends`: the bases merged in first, each value remembering its file (policy/extends.py).
    loaded = flatten_extends(load_yaml(text, file), file, _read_text)
    policy = _validate(loaded, file)
    policy._source_file = file
    policy._source_path = Path(file)
    policy._source_text = text
    policy._yaml = loaded
    policy._resolved_model = _resolve_model(policy.model, policy.folder_of(("model",)))
    # Widths are compared among the embeddings that could be read, so both kinds show at once.
    issues = (
        _resolve_embeddings(policy) + resolve_examples(policy) + _width_issues(policy, embed_dim)
    )
    if issues:
        raise PolicyError(sorted(issues, key=_file_order))
    policy._warnings = _inline_warnings(policy)
    for warning in policy._warnings:
        log.warning("%s", warning)
    return policy


def _inline_warnings(policy: Policy) -> list[PolicyIssue]:
    """A warning when inline embeddings hold so many numbers that parsing them is slow."""
    inline = [(path, c) for path, c in policy.iter_concepts() if isinstance(c.embedding, list)]
    numbers = sum(len(c.embedding) for _, c in inline)  # type: ignore[arg-type]
    if numbers < INLINE_NUMBERS_WARNING:
        return []
    message = (
        f"{len(inline)} concepts give their embeddings inline ({numbers} numbers), which is slow"
        " to read (YAML parses each number on its own): put them in a .safetensors or .npy file"
        " beside the policy and name rows with `embedding: {file: F, tensor: T, row: I}`"
    )
    return [policy.issue((*inline[0][0], "embedding"), message)]


def check_embed_dim(policy: Policy, embed_dim: int) -> None:
    """Raise PolicyError unless every raw embedding of a loaded policy has `embed_dim` values."""
    issues = _width_issues(policy, embed_dim)
    if issues:
        raise PolicyError(issues)


def model_embed_dim(model: str | os.PathLike[str]) -> int | None:
    """The projection width in a model's config.json: a local folder or the HF cache; never downloads."""
    folder = Path(model)
    config = folder / "config.json" if folder.is_dir() else _cached_config(os.fspath(model))
    if config is None:
        return None
    try:
        data = json.loads(Path(config).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    dim = data.get("projection_dim") if isinstance(data, dict) else None
    return dim if type(dim) is int and dim > 0 else None


def _cached_config(repo_id: str) -> str | None:
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # not installed, or not a valid repo id
        return None
    return found if isinstance(found, str) else None


def _read_text(file: str) -> str:
    try:
        with open(file, "rb") as handle:
            raw = handle.read()
    except FileNotFoundError:
        raise PolicyError.about_file(file, "file not found") from None
    except IsADirectoryError:
        raise PolicyError.about_file(file, "is a folder, not a policy file") from None
    except OSError as exc:
        raise PolicyError.about_file(file, f"cannot read: {exc.strerror}") from None
    return decode_policy_text(raw, file)


def _file_order(issue: PolicyIssue) -> tuple[int, int]:
    return issue.line or 0, issue.col or 0


def _validate(loaded: LoadedYaml, file: str) -> Policy:
    try:
        return Policy.model_validate(loaded.data)
    except ValidationError as exc:
        issues: list[PolicyIssue] = []
        for error in exc.errors(include_url=False):
            for issue in _issues_from(error, loaded, file):
                if issue not in issues:
                    issues.append(issue)
        raise PolicyError(sorted(issues, key=_file_order)) from None


def _issues_from(error: Any, loaded: LoadedYaml, file: str) -> list[PolicyIssue]:
    """One pydantic error as PolicyIssues (a broken-rules error carries several)."""
    ctx, kind = error.get("ctx") or {}, error["type"]
    path = _data_path(error["loc"])
    if kind == "policy_rules":
        return [_issue(file, loaded, where, message) for where, message in ctx["violations"]]
    if "at" in ctx:  # a model-level rule about one of its keys
        return [_issue(file, loaded, (*path, ctx["at"]), error["msg"], key=True)]
    message = _message(error, path)
    if kind == "missing":  # point at the mapping that lacks the key
        return [_issue(file, loaded, path, message, at=path[:-1])]
    return [_issue(file, loaded, path, message, key=kind == "extra_forbidden")]


def _issue(
    file: str,
    loaded: LoadedYaml,
    path: KeyPath,
    message: str,
    *,
    key: bool = False,
    at: KeyPath | None = None,
) -> PolicyIssue:
    origin, line, col = loaded.where(path if at is None else at, key=key)
    return PolicyIssue(origin or file, line, col, format_path(loaded.source_path(path)), message)


def _data_path(loc: tuple[Any, ...]) -> KeyPath:
    """A pydantic loc without the labels of the embedding's and the threshold's shapes."""
    path: list[str | int] = []
    for part in loc:
        if part in EMBEDDING_TAGS and path and path[-1] == "embedding":
            continue
        if part in THRESHOLD_TAGS and path and path[-1] == "threshold":
            continue
        path.append(part)
    return tuple(path)


def _message(error: Any, path: KeyPath) -> str:
    """A short human message for one pydantic error."""
    kind, ctx, value = error["type"], error.get("ctx") or {}, error.get("input")
    if kind in _EXPECTED:
        return f"expected {_EXPECTED[kind]}, got {kind_of(value)}"
    if kind == "extra_forbidden":
        return "unknown key" + _suggestion(path)
    if kind == "missing":
        return "required key is missing"
    if kind == "literal_error":
        got = repr(value) if isinstance(value, (str, int, float)) else kind_of(value)
        return f"must be one of {ctx['expected']}, got {got}"
    if kind in _BOUNDS:
        name, text = _BOUNDS[kind]
        return text.format(ctx[name])
    if kind in ("too_short", "string_too_short"):
        if ctx.get("min_length", 1) <= 1:
            return "must not be empty"
        return f"must have at least {ctx['min_length']} items"
    if kind == "finite_number":
        return "must be a finite number"
    message = str(error["msg"])
    return message[:1].lower() + message[1:]


def _suggestion(path: KeyPath) -> str:
    model = _model_at(path[:-1])
    if model is None or not isinstance(path[-1], str):
        return ""
    close = difflib.get_close_matches(path[-1], list(model.model_fields), n=1, cutoff=0.7)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _model_at(path: KeyPath) -> type[BaseModel] | None:
    """The pydantic model that validates the mapping at `path`."""
    model: type[BaseModel] | None = Policy
    for part in path:
        if isinstance(part, int) or model is None:
            continue  # list items share their list's model
        field = model.model_fields.get(part)
        model = _first_model(field.annotation) if field else None
    return model


def _first_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _first_model(arg)
        if found is not None:
            return found
    return None


def _resolve_model(model: str, folder: Path) -> str:
    candidate = folder / model  # an absolute `model` stays absolute
    return str(candidate.resolve()) if candidate.is_dir() else model


def _resolve_embeddings(policy: Policy) -> list[PolicyIssue]:
    """Set `concept.vector` for every concept with an embedding; return what went wrong."""
    issues = []
    with ExitStack() as stack:
        readers: dict[Path, EmbeddingFiles] = {}  # one per folder (a base's, with extends)
        for path, concept in policy.iter_concepts():
            if concept.embedding is None or isinstance(concept.embedding, CheckpointRef):
                continue  # checkpoint rows are read by the compiler, from the model
            at = (*path, "embedding")
            # Relative to the file the embedding was written in (a base policy's, with extends).
            folder = policy.folder_of(at)
            files = readers.get(folder)
            if files is None:
                files = readers[folder] = stack.enter_context(EmbeddingFiles(folder))
            try:
                vector = files.read(concept.embedding)  # [D] float32
            except EmbeddingProblem as problem:
                issues.append(policy.issue((*at, *problem.subpath), problem.message))
                continue
            issue = _vector_issue(policy, at, vector)
            if issue is not None:
                issues.append(issue)
            else:
                concept._vector = vector
    return issues


def _vector_issue(policy: Policy, at: KeyPath, vector: np.ndarray) -> PolicyIssue | None:
    if not np.isfinite(vector).all():
        bad = int(np.flatnonzero(~np.isfinite(vector))[0])
        return policy.issue(at, f"embedding value {bad} is not finite ({vector[bad]})")
    if not vector.any():
        return policy.issue(at, "embedding is all zeros")
    return None


def _values(count: int) -> str:
    return "1 value" if count == 1 else f"{count} values"


def _width_issues(policy: Policy, embed_dim: int | None) -> list[PolicyIssue]:
    """Every raw embedding must have the model's width, or else all the same width."""
    issues = []
    first: tuple[KeyPath, int] | None = None
    for path, concept in policy.iter_concepts():
        if concept.vector is None:
            continue
        at, width = (*path, "embedding"), concept.vector.shape[0]
        if embed_dim is not None and width != embed_dim:
            message = f"embedding has {_values(width)}, the model's projection width is {embed_dim}"
            issues.append(policy.issue(at, message))
        elif embed_dim is None and first is not None and width != first[1]:
            message = f"embedding has {_values(width)}, but {format_path(first[0])} has {first[1]}"
            issues.append(policy.issue(at, message))
        first = first or (at, width)
    return issues
