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
    """A YAML policy, or a compiled artifact (.safetensors) written by `moderation policy compile`."""
    from policy import CompiledPolicy, load_policy

    path = Path(path)
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
    from policy import CompiledPolicy, compile_policy

    default = None
    if isinstance(policy, (str, Path)):
        path = Path(policy)
        policy = load_any_policy(path)
        if isinstance(policy, CompiledPolicy):
            beside = path.parent / policy.model
            default = str(beside.resolve()) if beside.is_dir() else None
    if isinstance(policy, CompiledPolicy):
        check_digest(policy.digest, expect_digest, f"policy {policy.name!r}")
        default = default or policy.model
    else:
        default = policy.resolved_model
    encoder = ClipEncoder.from_pretrained(
        model or default, device=device, dtype=dtype, text_model=text_model
    )
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
