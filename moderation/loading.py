"""A policy and the model it runs with, from a YAML file, a compiled artifact or an object."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from moderation.errors import ModerationError

if TYPE_CHECKING:
    from moderation.encoder import ClipEncoder
    from policy import CompiledPolicy, Policy


def load_any_policy(path: str | Path) -> Policy | CompiledPolicy:
    """A YAML policy, or a compiled artifact (.safetensors) written by `moderation policy compile`;
    `builtin:NAME` is a shipped policy, as in `extends:`."""
    from policy import CompiledPolicy, load_policy

    path = builtin_path(path)
    if path.suffix == ".safetensors":
        return CompiledPolicy.load(path)
    return load_policy(path)


def load_compiled(
    policy: str | Path | Policy | CompiledPolicy,
    *,
    model: str | Path | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    text_model: str | Path | None = None,
    expect_digest: str | None = None,
) -> tuple[CompiledPolicy, ClipEncoder]:
    """A compiled policy and the encoder it runs with, from a YAML or artifact path or an object.

    The model is `model`, else the policy's own: a relative folder is relative to the policy's
    file (or the artifact's), as the loader reads it. A YAML policy is compiled for that model,
    which checks every embedding's width against it. `expect_digest` pins the compiled policy's
    digest: anything else is refused (an artifact before its model is even loaded).
    """
    from moderation.encoder import ClipEncoder
    from moderation.errors import EncoderError
    from policy import CompiledPolicy, compile_policy
    from policy.checks import is_relative_folder

    default, looked = None, []
    if isinstance(policy, (str, Path)):
        path = Path(policy)
        policy = load_any_policy(path)
        if isinstance(policy, CompiledPolicy):
            default, looked = artifact_model(policy, path)
    if isinstance(policy, CompiledPolicy):
        check_digest(policy.digest, expect_digest, f"policy {policy.name!r}")
        default = default or policy.model
    else:
        default = policy.resolved_model
        if is_relative_folder(policy.model) and policy.source_path is not None:
            looked = [str((policy.folder_of(("model",)) / policy.model).resolve())]
    try:
        encoder = ClipEncoder.from_pretrained(
            model or default, device=device, dtype=dtype, text_model=text_model
        )
    except EncoderError as exc:
        if model or not looked:
            raise
        where = " and ".join(looked)
        raise EncoderError(
            f"{exc} (a relative `model:` folder is read from the policy file's folder: looked"
            f" for {where})"
        ) from exc
    warn_model_override(policy, model)
    compiled = policy if isinstance(policy, CompiledPolicy) else compile_policy(policy, encoder)
    check_digest(compiled.digest, expect_digest, f"policy {compiled.name!r}")
    return compiled, encoder


def check_digest(actual: str, expected: str | None, what: str) -> None:
    """Refuse `actual` unless it is the `expected` sha256 digest (no pin: anything goes)."""
    if expected is None:
        return
    if not isinstance(expected, str) or len(expected) != 64:
        raise ModerationError(
            f"expected digest {str(expected)[:70]!r} is not a full sha256 digest (64 hex digits)"
        )
    if actual != expected.lower():
        raise ModerationError(
            f"{what}: digest {actual[:12]} is not the expected {expected.lower()[:12]}: refusing"
            " to judge images with it"
        )


def artifact_model(compiled: CompiledPolicy, path: Path) -> tuple[str | None, list[str]]:
    """(the model folder an artifact at `path` runs with, or None for its hub id; where it looked).

    A relative `model` is read beside the artifact; when the artifact was moved away from it,
    the folder recorded at compile time (`model_path`) is used if it still exists.
    """
    from policy.checks import is_relative_folder

    model = Path(compiled.model).expanduser()
    if model.is_absolute():
        return None, []
    if not is_relative_folder(compiled.model):
        beside = path.parent / model  # `org/name` is a hub id unless such a folder is there
        return (str(beside.resolve()), []) if beside.is_dir() else (None, [])
    beside = path.parent / model
    if beside.is_dir():
        return str(beside.resolve()), []
    looked = [str(beside.resolve())]
    recorded = compiled.model_path
    if recorded:
        if Path(recorded).is_dir():
            return recorded, []
        looked.append(f"{recorded} (where it was compiled)")
    return None, looked


_HUB_CACHE_MARK = "\0"  # never a path: hub snapshots are found by their id, not their folder


def warn_model_override(policy: Policy | CompiledPolicy, model: str | Path | None) -> None:
    """Warn when `model` replaces the model a policy's thresholds were set for."""
    import logging
    import os

    from policy import CompiledPolicy

    if model is None:
        return
    own = policy.model if isinstance(policy, CompiledPolicy) else policy.resolved_model
    candidates = {str(own), str(getattr(policy, "model_path", "") or "")} - {""}
    given = Path(model).expanduser()
    same = str(model) in candidates or (
        given.exists() and any(Path(c).exists() and os.path.samefile(given, c) for c in candidates)
    )
    if not same:
        name = getattr(policy, "name", None) or getattr(policy, "policy", "?")
        logging.getLogger("moderation").warning(
            "policy %r is tuned for model %r but runs with %r (--model): its thresholds were"
            " set for the other model's cosines and may mean nothing for this one",
            name,
            policy.model,
            str(model),
        )


def builtin_path(path: str | Path) -> Path:
    """`builtin:NAME` as the shipped policy's file (PolicyError for an unknown NAME); else path."""
    from policy import PolicyError
    from policy.extends import BUILTIN, builtin_folder, builtin_names

    text = str(path)
    if not text.startswith(BUILTIN):
        return Path(path)
    name = text[len(BUILTIN) :]
    if name not in builtin_names():
        shipped = ", ".join(f"{BUILTIN}{n}" for n in builtin_names())
        raise PolicyError.about_file(text, f"no shipped policy {name!r}; there are: {shipped}")
    return builtin_folder() / f"{name}.yaml"
