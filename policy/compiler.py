"""compile_policy: a loaded Policy and an encoder -> CompiledPolicy (matrices and thresholds).

The encoder is anything that satisfies `policy.encoding.PolicyEncoder` (the engine's PolicyEncoder does).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from policy.compiled import CompiledPolicy
from policy.encoding import EncodingError, PolicyEncoder
from policy.errors import KeyPath, PolicyError, PolicyIssue
from policy.examples import encode_examples
from policy.extends import DEFINITION_KEYS
from policy.schema import Concept, Policy

if TYPE_CHECKING:
    from policy.prompt_cache import PromptCache


class _Problem(Exception):
    """Why one concept cannot be compiled; `subpath` is the key under the concept at fault."""

    def __init__(self, message: str, *subpath: str) -> None:
        super().__init__(message)
        self.message, self.subpath = message, subpath


def _from_checkpoint(encoder: PolicyEncoder, ref: Any, key: str) -> Tensor:
    """Row `ref.row` of the checkpoint tensor `ref.checkpoint`, as stored (float32)."""
    try:
        tensor = encoder.checkpoint_tensor(ref.checkpoint)
    except EncodingError as exc:
        raise _Problem(str(exc), key, "checkpoint") from exc
    what = f"checkpoint tensor '{ref.checkpoint}' of {encoder.model_id}"
    rows = tensor.shape[0] if tensor.ndim else 0
    row = 0 if ref.row is None and rows == 1 else ref.row
    if row is None:
        raise _Problem(f"{what} has {rows} rows; say which with 'row'", key)
    if row >= rows:
        raise _Problem(f"row {row} is out of range: {what} has {rows} rows", key, "row")
    return tensor[row]


def resolve_concept(
    policy: Policy,
    concept: Concept,
    encoder: PolicyEncoder,
    prompt_vectors: dict[str, Tensor],
    example_vectors: dict[str, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """(raw vector [D] float32, threshold [] float32) of one concept.

    The one place that knows how the schema spells a concept's source: `prompts` (an ensemble:
    each prompt's unit vector averaged, then normalised), an `embedding` the loader resolved into
    `concept.vector`, `examples` (example images, see policy/examples.py; embedded here unless
    `example_vectors` has them), or an embedding/threshold `{checkpoint: NAME, row: I}` read from
    the model.
    """
    if concept.examples is not None:
        if example_vectors is None or concept.name not in example_vectors:
            example_vectors = encode_examples(policy, encoder, only=concept.name)[0]
        vector = example_vectors[concept.name]
    elif concept.prompts is not None:
        units = torch.nn.functional.normalize(
            torch.stack([prompt_vectors[p] for p in concept.prompts]), dim=-1
        )  # [P, D]
        vector = torch.nn.functional.normalize(units.mean(0), dim=0)
    elif getattr(concept.embedding, "checkpoint", None):
        vector = _from_checkpoint(encoder, concept.embedding, "embedding")
    elif concept.vector is not None:
        vector = torch.from_numpy(concept.vector)
    else:
        raise _Problem("the embedding was not resolved (load the policy with load_policy)")
    threshold = policy.effective_threshold(concept)
    if getattr(threshold, "checkpoint", None):
        threshold = _from_checkpoint(encoder, threshold, "threshold")
    else:
        # The YAML number is a float64; scoring compares float32 cosines with float32 thresholds.
        threshold = torch.tensor(threshold, dtype=torch.float32)
    return vector.to(torch.float32), threshold.to(torch.float32)


def _check(vector: Tensor, threshold: Tensor, encoder: PolicyEncoder) -> None:
    """Raise _Problem unless vector is [D] finite and non-zero and threshold one finite number."""
    if vector.ndim != 1 or vector.shape[0] != encoder.embed_dim:
        raise _Problem(
            f"embedding has shape {list(vector.shape)}, the model {encoder.model_id} "
            f"projects to {encoder.embed_dim} values"
        )
    if not bool(torch.isfinite(vector).all()):
        raise _Problem("embedding has non-finite values (NaN or inf)")
    if not bool(vector.any()):
        raise _Problem("embedding is all zeros")
    if threshold.ndim != 0 or not bool(torch.isfinite(threshold)):
        raise _Problem(
            f"threshold must be one finite number, got {threshold.tolist()}", "threshold"
        )


def _matrix(vectors: list[Tensor], dim: int) -> Tensor:
    """[C, D] float32: raw vectors stacked, then the whole matrix normalised at once.

    Exactly how diffusers' `cosine_distance` normalises its concept parameter, so that
    `compat: diffusers` gives bit-identical cosines.
    """
    if not vectors:
        return torch.zeros((0, dim))
    return torch.nn.functional.normalize(torch.stack(vectors))


def _vector(values: list[Tensor]) -> Tensor:
    """[C] float32 from 0-d tensors."""
    return torch.stack(values) if values else torch.zeros((0,))


def _prompt_cache(cache: bool | str | Path | PromptCache | None) -> PromptCache | None:
    from policy.prompt_cache import PromptCache

    if cache is None or cache is False:
        return None
    if isinstance(cache, PromptCache):
        return cache
    return PromptCache(None if cache is True else cache)


def _encode_prompts(
    policy: Policy, encoder: PolicyEncoder, cache: PromptCache | None
) -> dict[str, Tensor]:
    """Every distinct prompt of the policy -> its projected embedding [D] float32."""
    users = [(path, c) for path, c in policy.iter_concepts() if c.prompts is not None]
    prompts = list(dict.fromkeys(p for _, c in users for p in c.prompts or ()))
    if not prompts:
        return {}
    try:
        embeddings = cache.encode(encoder, prompts) if cache else encoder.encode_text(prompts)
    except EncodingError as exc:  # e.g. no text tower: point at the first concept that needs one
        path, concept = users[0]
        others = f" (and {len(users) - 1} more with prompts)" if len(users) > 1 else ""
        message = f"concept '{concept.name}'{others}: {exc}"
        raise PolicyError([policy.issue((*path, "prompts"), message)]) from exc
    return dict(zip(prompts, embeddings, strict=True))


def _recorded_model(policy: Policy, encoder: PolicyEncoder) -> str:
    """The policy's model as written when the encoder is that model, else the encoder's (override)."""

    def key(model: str) -> str:
        path = Path(model).expanduser()
        return str(path.resolve()) if path.exists() else model

    same = key(encoder.model_id) in (key(policy.model), key(policy.resolved_model))
    return policy.model if same else encoder.model_id


def compile_policy(
    policy: Policy,
    encoder: PolicyEncoder,
    *,
    cache: bool | str | Path | PromptCache | None = True,
) -> CompiledPolicy:
    """Embed every concept of a loaded policy with encoder; raise PolicyError naming each bad one.

    cache: True for the default prompt cache folder ($MODERATION_CACHE_DIR or
    ~/.cache/moderation/prompts), a folder or a PromptCache, or False for none.
    """
    prompt_vectors = _encode_prompts(policy, encoder, _prompt_cache(cache))
    example_vectors, example_sha256 = encode_examples(policy, encoder)
    vectors: list[Tensor] = []
    thresholds: list[Tensor] = []
    issues: list[PolicyIssue] = []
    for path, concept in policy.iter_concepts():
        try:
            vector, threshold = resolve_concept(
                policy, concept, encoder, prompt_vectors, example_vectors
            )
            _check(vector, threshold, encoder)
        except _Problem as problem:
            source = next(k for k in DEFINITION_KEYS if getattr(concept, k) is not None)
            where: KeyPath = (*path, *(problem.subpath or (source,)))
            issues.append(policy.issue(where, f"concept '{concept.name}': {problem.message}"))
            continue
        vectors.append(vector)
        thresholds.append(threshold)
    if issues:
        raise PolicyError(issues)

    n = len(policy.concepts)
    dim = encoder.embed_dim
    special = policy.special_care
    concepts = policy.concepts  # the special-care ones follow them in vectors and thresholds
    return CompiledPolicy(
        name=policy.policy,
        version=str(policy.version),
        model=_recorded_model(policy, encoder),
        concept_names=tuple(c.name for c in concepts),
        categories=tuple(c.category for c in concepts),
        severities=tuple(policy.effective_severity(c) for c in concepts),
        actions=tuple(policy.effective_action(c) for c in concepts),
        concept_matrix=_matrix(vectors[:n], dim),
        thresholds=_vector(thresholds[:n]),
        special_names=tuple(c.name for c in policy.special_concepts),
        special_matrix=_matrix(vectors[n:], dim),
        special_thresholds=_vector(thresholds[n:]),
        adjustment=float(special.adjustment) if special else 0.0,
        escalate=special.escalate if special else None,
        review_band=float(policy.review_band),
        on_error=policy.on_error,
        compat=policy.compat,
        blur_radius=float(policy.actions.blur.radius),
        pixelate_block=int(policy.actions.pixelate.block),
        review_placeholder=policy.actions.review.placeholder,
        example_sha256=example_sha256,
        source=policy.source_text or "",
    )
