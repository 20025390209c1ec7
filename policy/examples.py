"""Concepts defined by example images: `examples: FOLDER`, the normalised mean of their embeddings.

The loader lists the folder (`resolve_examples`): it must be inside the folder of the policy file
that names it (symlinks resolved, for the folder and for every file in it), and every file in it
and its subfolders is an example image, except names starting with "." (`.DS_Store`, `.git`).
The compiler embeds them (`encode_examples`) with the policy's model through
`PolicyEncoder.encode_image_bytes`, which decodes and preprocesses each image as the engine does:
each image's embedding is normalised, the mean of them normalised again (like a prompt ensemble).
Files are read once; the sha256 of the bytes that were embedded goes into the compiled policy, so
its digest changes whenever an example image does.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

from policy.encoding import EncodingError
from policy.errors import PolicyError, PolicyIssue
from policy.paths import PathOutside, resolve_inside

if TYPE_CHECKING:
    from torch import Tensor

    from policy.encoding import PolicyEncoder
    from policy.schema import Policy


class _Problem(Exception):
    """Why a concept's example folder cannot be used."""


def resolve_examples(policy: Policy) -> list[PolicyIssue]:
    """List the example images of every `examples:` concept; return what went wrong."""
    issues = []
    for path, concept in policy.iter_concepts():
        if concept.examples is None:
            continue
        at = (*path, "examples")
        try:
            concept._examples = example_files(policy.folder_of(at), concept.examples)
        except _Problem as problem:
            issues.append(policy.issue(at, f"concept '{concept.name}': {problem}", key=True))
    return issues


def example_files(folder: Path, name: str) -> tuple[tuple[str, Path], ...]:
    """(name as shown, resolved path) of each image under `folder / name`, sorted by name."""
    root = folder.resolve()
    try:
        found = resolve_inside(
            folder, name, kind="folder", relative="a folder relative to the policy's folder"
        )
    except PathOutside as exc:
        raise _Problem(str(exc)) from None
    start, exists, is_dir = found.path, found.exists, found.is_dir
    if not exists:
        raise _Problem(f"folder '{name}' not found")
    if not is_dir:
        raise _Problem(f"'{name}' is not a folder of images")
    found: list[tuple[str, Path]] = []
    _walk(start, name.rstrip("/\\") or name, root, found, {start})
    if not found:
        raise _Problem(f"folder '{name}' holds no example images")
    return tuple(sorted(found))


def _walk(folder: Path, shown: str, root: Path, found: list, seen: set[Path]) -> None:
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as exc:
        raise _Problem(f"cannot list '{shown}': {exc.strerror}") from None
    for entry in entries:
        if entry.name.startswith("."):
            continue
        label = f"{shown}/{entry.name}"
        try:
            path = Path(entry.path).resolve()
            inside, is_dir, is_file = path.is_relative_to(root), path.is_dir(), path.is_file()
        except (OSError, RuntimeError) as exc:
            raise _Problem(f"'{label}' is not usable ({exc})") from None
        if not inside:
            raise _Problem(f"'{label}' leads outside the policy's folder")
        if is_dir:
            if path not in seen:  # a link back to a parent would loop
                seen.add(path)
                _walk(path, label, root, found, seen)
        elif is_file:
            found.append((label, path))
        else:
            raise _Problem(f"'{label}' is not a regular file")


def encode_examples(
    policy: Policy, encoder: PolicyEncoder, *, only: str | None = None
) -> tuple[dict[str, Tensor], tuple[str, ...]]:
    """({concept name: raw vector [D] float32}, ("NAME:SHA256", ...) of every example image),
    for every `examples:` concept (or only the one named `only`).

    Raise PolicyError naming the concept's `examples` key and the image that could not be read.
    """
    import torch
    import torch.nn.functional as F

    vectors: dict[str, Tensor] = {}
    hashes: list[str] = []
    issues: list[PolicyIssue] = []
    for path, concept in policy.iter_concepts():
        if concept.examples is None or only not in (None, concept.name):
            continue
        at, name = (*path, "examples"), concept.name
        try:
            blobs, digests = _read(concept.example_files)
            embeddings = _encode(encoder, blobs, concept.example_files)  # [N, D]
        except _Problem as problem:
            issues.append(policy.issue(at, f"concept '{name}': {problem}", key=True))
            continue
        units = F.normalize(embeddings.to(torch.float32), dim=-1)  # [N, D]
        vectors[name] = F.normalize(units.mean(0), dim=0)
        hashes.extend(f"{name}:{digest}" for digest in digests)
    if issues:
        raise PolicyError(issues)
    return vectors, tuple(hashes)


def _read(files: tuple[tuple[str, Path], ...] | None) -> tuple[list[bytes], list[str]]:
    if files is None:
        raise _Problem("the example images were not listed (load the policy with load_policy)")
    blobs, digests = [], []
    for shown, path in files:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise _Problem(f"cannot read example image '{shown}': {exc.strerror}") from None
        blobs.append(data)
        digests.append(hashlib.sha256(data).hexdigest())
    return blobs, digests


def _encode(encoder: PolicyEncoder, blobs: list[bytes], files: tuple) -> Tensor:
    method = getattr(encoder, "encode_image_bytes", None)
    if method is None:
        raise _Problem(f"model {encoder.model_id} cannot embed images (no encode_image_bytes)")
    try:
        return method(blobs)
    except EncodingError as exc:
        if exc.index is None:
            raise _Problem(str(exc)) from exc
        raise _Problem(f"cannot read example image '{files[exc.index][0]}': {exc}") from exc
