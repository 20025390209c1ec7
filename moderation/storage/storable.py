"""What every backend can store: checks of caller metadata and policies, before anything is acted on.

PostgreSQL refuses NUL in text and in jsonb, and strings longer than their column; SQLite takes
both. Such values are refused up front (metadata, policies), so that a decision is never refused
by one backend and kept by the other; our own message text is escaped instead (`storable_text`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from moderation.errors import ModerationError
from moderation.storage.db import json_dumps
from moderation.storage.errors import StorageError
from moderation.storage.models import DecisionRow, PolicyRow

if TYPE_CHECKING:
    from moderation.storage.records import PolicyRecord


def _column_length(table: Any, column: str) -> int:
    return table.__table__.c[column].type.length


_POLICY_LENGTHS = {
    name: _column_length(PolicyRow, name)
    for name in ("digest", "name", "version", "model_id", "compat", "escalate")
}
CONCEPT_NAME_LENGTH = _column_length(DecisionRow, "top_concept")  # any concept can be the top one


def _short(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def text_problem(text: str) -> str | None:
    """Why a string cannot be stored on every backend (None when it can)."""
    if "\0" in text:
        return "holds a NUL character (\\x00), which PostgreSQL cannot store"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "holds a lone surrogate (not valid Unicode text)"
    return None


def storable_text(text: str | None) -> str | None:
    """Our own message text, with what a backend cannot store escaped (NUL, lone surrogates)."""
    if text is None or text_problem(text) is None:
        return text
    return text.replace("\0", "\\x00").encode("utf-8", "backslashreplace").decode("utf-8")


def _walk_strings(value: Any, path: str) -> Iterator[tuple[str, str]]:
    """(key path, string) of every string in a JSON-like value, dict keys included."""
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}[{key!r}]"
            if isinstance(key, str):
                yield f"{where} (the key)", key
            yield from _walk_strings(item, where)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _walk_strings(item, f"{path}[{i}]")


class MetadataError(StorageError):
    """Caller metadata that the decision log could not store on every backend."""


def check_metadata(meta: Mapping[str, Any], what: str = "metadata") -> None:
    """Refuse caller metadata that the decision log could not store on every backend, naming
    the key at fault.

    It must be JSON (numbers, strings, lists, dicts; numpy values become numbers), finite, and
    free of NUL characters and lone surrogates (what Python makes of undecodable bytes in a
    command line or a file name): such metadata is refused, never altered.
    """
    try:
        json_dumps(meta)
    except (TypeError, ValueError):
        _name_the_json_problem(meta, what)
    for path, text in _walk_strings(meta, what):
        problem = text_problem(text)
        if problem is not None:
            raise MetadataError(f"{path} {problem}; remove it")


def _name_the_json_problem(meta: Mapping[str, Any], what: str) -> None:
    for key, value in meta.items():
        label = f"{what}[{key!r}]"
        try:
            json_dumps({key: None})
        except (TypeError, ValueError) as err:
            raise MetadataError(f"{label}: the key cannot be stored as JSON: {err}") from None
        try:
            json_dumps(value)
        except (TypeError, ValueError) as err:
            reason = str(err)
            if reason.startswith("Out of range float"):  # the json module's words for NaN/inf
                reason = "NaN and infinity are not JSON numbers"
            raise MetadataError(f"{label} cannot be stored as JSON: {reason}") from None
    raise MetadataError(f"{what} cannot be stored as JSON")  # keys and values alone were fine


def check_policy_record(record: PolicyRecord) -> None:
    """Refuse a policy whose names do not fit the decision log's columns on every backend."""
    label = f"policy {_short(record.name)}"
    for name, limit in _POLICY_LENGTHS.items():
        value = getattr(record, name)
        if value is not None and len(value) > limit:
            raise StorageError(
                f"{label}: {name} is {len(value)} characters long; the decision log stores "
                f"at most {limit}"
            )
    for concept in [*record.concepts, *record.special_concepts]:
        name = str(concept.get("name", ""))
        if len(name) > CONCEPT_NAME_LENGTH:
            raise StorageError(
                f"{label}: concept name {_short(name)} is {len(name)} characters long; the "
                f"decision log stores at most {CONCEPT_NAME_LENGTH}"
            )
    row = asdict(record)
    try:
        json_dumps(row["concepts"])
        json_dumps(row["special_concepts"])
    except (TypeError, ValueError) as err:
        raise StorageError(f"{label}: its concept table cannot be stored as JSON: {err}") from err
    for path, text in _walk_strings(row, "policy"):
        problem = text_problem(text)
        if problem is not None:
            raise StorageError(f"{label}: {path} {problem}")


# What a caller gives as metadata: one dict for every image, one per image, or none.
Metadata = dict[str, Any] | Sequence[dict[str, Any]] | None


def per_image(metadata: Metadata, n: int) -> list[dict[str, Any]]:
    """One dict per image, each checked to be storable before any image is touched."""
    if metadata is None:
        return [{} for _ in range(n)]
    if isinstance(metadata, dict):
        # Refused before anything is acted on: metadata the log could not store (see README).
        check_metadata(metadata)
        return [dict(metadata) for _ in range(n)]
    metas = [dict(m) for m in metadata]
    if len(metas) != n:
        raise ModerationError(f"metadata has {len(metas)} entries for {n} images")
    for i, meta in enumerate(metas):
        check_metadata(meta, f"metadata[{i}]")
    return metas
