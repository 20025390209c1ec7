"""The two sides of `policy diff`: a YAML policy or a compiled artifact as what can be compared.

`side_of_policy` and `side_of_compiled` turn a loaded policy (with its compiled form when there
is one) into a `PolicySide`; `load_side` compiles a loaded YAML policy with the model it is
given, or without one when the policy needs none (every concept an embedding), first.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from policy import CheckpointRef, PolicyError, check_embed_dim, model_embed_dim
from policy.compiled import vector_digest
from policy.encoding import EncodingError

if TYPE_CHECKING:
    from torch import Tensor

    from policy import CompiledPolicy, Concept, Policy
    from policy.encoding import PolicyEncoder


@dataclass(frozen=True, eq=False)
class ConceptSide:
    """One concept as a diff sees it: effective values and what defines its vector."""

    name: str
    special: bool
    threshold: float | dict  # float32 as scored (shortest repr), or an unread checkpoint row
    action: str | None  # None for special-care concepts (they escalate)
    category: str | None
    severity: str | None
    source: dict[str, Any]  # what defines it, as shown: {"prompts": [...]}, {"vector": "..."}
    key: tuple | None  # identity of the definition when there is no vector (None: unknown)
    vector: np.ndarray | None = field(default=None, repr=False)  # unit float32 row as compiled


@dataclass(frozen=True, eq=False)
class PolicySide:
    """One of the two policies: identity, settings and concepts (regular first, then special)."""

    path: str
    kind: str  # "yaml" or "compiled"
    name: str
    version: str
    digest: str | None  # None: a YAML policy that needs a model to compile and got none
    model: str  # as written
    model_key: str  # the model compared: a folder resolved from the policy's own folder
    settings: dict[str, Any]  # DECISIVE keys, then the DESCRIPTIVE ones this side has
    concepts: tuple[ConceptSide, ...]

    def identity(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "kind": self.kind,
            "name": self.name,
            "version": self.version,
            "digest": self.digest,
            "model": self.model,
        }


def float32(value: float) -> float:
    """A threshold as scoring compares it (float32), written as the shortest decimal."""
    return float(np.format_float_positional(np.float32(value), unique=True, trim="0"))


def _rows(matrix: Any) -> list[np.ndarray]:
    return list(matrix.detach().to("cpu").float().numpy()) if matrix is not None else []


def _compiled_settings(compiled: CompiledPolicy) -> dict[str, Any]:
    return {
        "model": compiled.model,
        "compat": compiled.compat,
        "views": compiled.views,
        "review_band": float(compiled.review_band),
        "on_error": compiled.on_error,
        "special_care.adjustment": float(compiled.adjustment),
        "special_care.escalate": compiled.escalate,
        "actions.blur.radius": float(compiled.blur_radius),
        "actions.pixelate.block": float(compiled.pixelate_block),
        "actions.review.placeholder": compiled.review_placeholder,
    }


def side_of_compiled(compiled: CompiledPolicy, path: str, model_key: str) -> PolicySide:
    """A compiled artifact: vectors and float32 thresholds, no definitions beyond them."""
    concepts = []
    thresholds = compiled.thresholds.tolist()
    for i, row in enumerate(_rows(compiled.concept_matrix)):
        concepts.append(
            ConceptSide(
                name=compiled.concept_names[i],
                special=False,
                threshold=float32(thresholds[i]),
                action=compiled.actions[i],
                category=compiled.categories[i],
                severity=compiled.severities[i],
                source={"vector": vector_digest(row)},
                key=None,
                vector=row,
            )
        )
    special_thresholds = compiled.special_thresholds.tolist()
    for i, row in enumerate(_rows(compiled.special_matrix)):
        concepts.append(
            ConceptSide(
                name=compiled.special_names[i],
                special=True,
                threshold=float32(special_thresholds[i]),
                action=None,
                category=None,
                severity=None,
                source={"vector": vector_digest(row)},
                key=None,
                vector=row,
            )
        )
    return PolicySide(
        path=path,
        kind="compiled",
        name=compiled.name,
        version=compiled.version,
        digest=compiled.digest,
        model=compiled.model,
        model_key=model_key,
        settings={
            **_compiled_settings(compiled),
            "name": compiled.name,
            "version": compiled.version,
        },
        concepts=tuple(concepts),
    )


def _source(concept: Concept, example_sha256: tuple[str, ...] | None) -> tuple[dict, tuple | None]:
    """(what defines a YAML concept, as shown; its identity without a model, None if unknown)."""
    if concept.prompts is not None:
        return {"prompts": list(concept.prompts)}, ("prompts", tuple(concept.prompts))
    if concept.examples is not None:
        shown = {"examples": concept.examples, "images": len(concept.example_files or ())}
        if example_sha256 is None:
            return shown, None
        combined = hashlib.sha256("\n".join(example_sha256).encode()).hexdigest()[:16]
        return {**shown, "content": combined}, ("examples", example_sha256)
    if isinstance(concept.embedding, CheckpointRef):
        ref = concept.embedding.model_dump(exclude_none=True)
        return {"embedding": ref}, ("checkpoint", ref["checkpoint"], ref.get("row"))
    if isinstance(concept.embedding, list):
        return {"embedding": "inline", "values": len(concept.embedding)}, None
    ref = concept.embedding.model_dump(exclude_none=True) if concept.embedding else {}
    return {"embedding": ref}, None


def _threshold(policy: Policy, concept: Concept) -> float | dict:
    value = policy.effective_threshold(concept)
    if isinstance(value, (int, float)):
        return float32(value)
    return value.model_dump(exclude_none=True)


def _unit(raw: np.ndarray | None) -> np.ndarray | None:
    """A raw embedding normalised in float32 as the compiler's `_matrix` does (per row)."""
    if raw is None:
        return None
    import torch

    row = torch.from_numpy(np.asarray(raw, dtype=np.float32))[None]
    return torch.nn.functional.normalize(row)[0].numpy()


def side_of_policy(
    policy: Policy,
    compiled: CompiledPolicy | None,
    model_key: str,
    example_sha256: dict[str, tuple[str, ...]],
) -> PolicySide:
    """A loaded YAML policy, with its compiled form when there is one (vectors, digest).

    `example_sha256`: per `examples:` concept, the sha256 of each image in listing order.
    Without `compiled`, embedding concepts still get their vectors (normalised here); prompt,
    example and checkpoint concepts are compared by what defines them.
    """
    vectors = (_rows(compiled.concept_matrix) + _rows(compiled.special_matrix)) if compiled else []
    thresholds = (
        compiled.thresholds.tolist() + compiled.special_thresholds.tolist() if compiled else []
    )
    concepts = []
    for i, (path, concept) in enumerate(policy.iter_concepts()):
        special = path[0] == "special_care"
        source, key = _source(concept, example_sha256.get(concept.name))
        vector = vectors[i] if compiled else None
        if vector is None and concept.embedding is not None and key is None:
            vector = _unit(concept.vector)
        if vector is not None:
            source = {**source, "vector": vector_digest(vector)}
        concepts.append(
            ConceptSide(
                name=concept.name,
                special=special,
                threshold=float32(thresholds[i]) if compiled else _threshold(policy, concept),
                action=None if special else policy.effective_action(concept),
                category=None if special else concept.category,
                severity=None if special else policy.effective_severity(concept),
                source=source,
                key=key,
                vector=vector,
            )
        )
    special_care = policy.special_care
    settings = {
        "model": policy.model,
        "compat": policy.compat,
        "views": policy.effective_views,
        "review_band": float(policy.review_band),
        "on_error": policy.on_error,
        "special_care.adjustment": float(special_care.adjustment) if special_care else 0.0,
        "special_care.escalate": special_care.escalate if special_care else None,
        "actions.blur.radius": float(policy.actions.blur.radius),
        "actions.pixelate.block": float(policy.actions.pixelate.block),
        "actions.review.placeholder": policy.actions.review.placeholder,
        "name": policy.policy,
        "version": str(policy.version),
        "description": policy.description,
        "defaults.threshold": float32(policy.defaults.threshold),
        "defaults.action": policy.defaults.action,
        "defaults.severity": policy.defaults.severity,
        "categories": policy.categories,
    }
    return PolicySide(
        path=str(policy.source_path or policy.policy),
        kind="yaml",
        name=policy.policy,
        version=str(policy.version),
        digest=compiled.digest if compiled else None,
        model=policy.model,
        model_key=model_key,
        settings=settings,
        concepts=tuple(concepts),
    )


# -- reading a file ---------------------------------------------------------------------------


def model_key(model: str, folder: Path) -> str:
    """A model as compared: a folder (relative to `folder`, where the policy is) resolved, else
    the hub id as written."""
    path = Path(model).expanduser()
    candidate = path if path.is_absolute() else folder / path
    try:
        if candidate.is_dir():
            return str(candidate.resolve())
    except (OSError, ValueError):
        pass
    return model


def needs_model(policy: Policy) -> bool:
    """Whether compiling the policy needs its model: prompts, example images, checkpoint rows."""
    for _, concept in policy.iter_concepts():
        if concept.prompts is not None or concept.examples is not None:
            return True
        if isinstance(concept.embedding, CheckpointRef):
            return True
        if isinstance(policy.effective_threshold(concept), CheckpointRef):
            return True
    return False


class EmbeddingsOnly:
    """The encoder a policy of raw embeddings compiles with: it embeds nothing.

    Its width is the policy's model's when that model is on this machine (checked against every
    embedding), else the embeddings' own; its model id is the policy's, so the digest is the one
    `policy compile` gives with the real model.
    """

    text_fingerprint = None
    max_text_tokens = None

    def __init__(self, policy: Policy) -> None:
        self.model_id = policy.model
        dim = model_embed_dim(policy.resolved_model)
        if dim is not None:
            check_embed_dim(policy, dim)
        else:
            dim = next(len(c.vector) for _, c in policy.iter_concepts() if c.vector is not None)
        self.embed_dim = dim

    def _refuse(self, *_: Any) -> Any:
        raise EncodingError("compiled without a model: only raw embeddings can be used")

    def encode_text(self, prompts: Sequence[str]) -> Tensor:
        return self._refuse(prompts)

    def count_tokens(self, prompts: Sequence[str]) -> list[int]:
        return self._refuse(prompts)

    def checkpoint_tensor(self, name: str) -> Tensor:
        return self._refuse(name)

    def encode_image_bytes(self, images: Sequence[bytes]) -> Tensor:
        return self._refuse(images)


def example_hashes(policy: Policy) -> dict[str, tuple[str, ...]]:
    """Per `examples:` concept, the sha256 of each example image in listing order."""
    hashes = {}
    for path, concept in policy.iter_concepts():
        digests = []
        for shown, file in concept.example_files or ():
            try:
                digests.append(hashlib.sha256(file.read_bytes()).hexdigest())
            except OSError as exc:
                message = f"concept '{concept.name}': cannot read example image '{shown}'"
                issue = policy.issue((*path, "examples"), f"{message}: {exc.strerror}", key=True)
                raise PolicyError([issue]) from None
        if concept.examples is not None:
            hashes[concept.name] = tuple(digests)
    return hashes


def load_side(
    path: str | Path, loaded: Policy | CompiledPolicy, encoder: PolicyEncoder | None = None
) -> PolicySide:
    """A policy read from `path` (`moderation.loading.load_any_policy`) as a diff side: an
    artifact as it is; a YAML policy compiled with `encoder`, or without a model when it needs
    none, else left uncompiled (no digest, no vectors for prompt and example concepts).
    Raise PolicyError when it cannot be compiled."""
    from policy import CompiledPolicy, compile_policy

    if isinstance(loaded, CompiledPolicy):
        return side_of_compiled(loaded, str(path), model_key(loaded.model, Path(path).parent))
    compiled = None
    if encoder is not None:
        compiled = compile_policy(loaded, encoder)
    elif not needs_model(loaded):
        compiled = compile_policy(loaded, EmbeddingsOnly(loaded), cache=False)
    key = model_key(loaded.model, loaded.folder_of(("model",)))
    hashes = example_hashes(loaded) if compiled is None else {}
    return side_of_policy(loaded, compiled, key, hashes)
