"""compile_policy: a loaded Policy and an encoder -> CompiledPolicy (matrices and thresholds).

The encoder is anything that satisfies `policy.encoding.PolicyEncoder` (the engine's PolicyEncoder does).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from policy.compiled import CompiledPolicy
from policy.encoding import EncodingError, PolicyEncoder
from policy.errors import KeyPath, PolicyError, PolicyIssue
from policy.examples import encode_examples
from policy.extends import DEFINITION_KEYS
from policy.schema import CheckpointRef, Concept, Policy

if TYPE_CHECKING:
    from policy.prompt_cache import PromptCache


class _Problem(Exception):
    """Why one concept cannot be compiled; `subpath` is the key under the concept at fault."""

    def __init__(self, message: str, *subpath: str) -> None:
        super().__init__(message)
        self.message, self.subpath = message, subpath


def _from_checkpoint(encoder: PolicyEncoder, ref: CheckpointRef, key: str) -> Tensor:
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
) -> tuple[Tensor, float]:
    """(raw vector [D] float32, threshold as a float) of one concept.

    The one place that knows how the schema spells a concept's source: `prompts` (an ensemble:
    each prompt's unit vector averaged, then normalised), an `embedding` the loader resolved into
    `concept.vector`, `examples` (example images, see policy/examples.py; embedded here unless
    `example_vectors` has them), or an embedding/threshold `{checkpoint: NAME, row: I}` read from
    the model.
    """
    raw = concept.vector
    if concept.examples is not None:
        if example_vectors is None or concept.name not in example_vectors:
            example_vectors = encode_examples(policy, encoder, only=concept.name)[0]
        vector = example_vectors[concept.name]
    elif concept.prompts is not None:
        units = torch.nn.functional.normalize(
            torch.stack([prompt_vectors[p] for p in concept.prompts]), dim=-1
        )  # [P, D]
        vector = torch.nn.functional.normalize(units.mean(0), dim=0)
    elif isinstance(concept.embedding, CheckpointRef):
        vector = _from_checkpoint(encoder, concept.embedding, "embedding")
    elif raw is not None:
        vector = torch.from_numpy(raw)
    else:
        raise _Problem("the embedding was not resolved (load the policy with load_policy)")
    threshold = policy.effective_threshold(concept)
    if isinstance(threshold, CheckpointRef):
        ref = threshold
        value = _from_checkpoint(encoder, ref, "threshold")
        if value.ndim != 0 or not bool(torch.isfinite(value)):
            raise _Problem(
                f"threshold must be one finite number, got {value.tolist()}", "threshold"
            )
        threshold = float(value.to(torch.float32))
        # A checkpoint's number is not range-checked by the schema: 5.0 would switch it off.
        if not -1 <= threshold <= 1:
            raise _Problem(
                f"threshold {threshold:g} read from checkpoint tensor '{ref.checkpoint}' row"
                f" {ref.row if ref.row is not None else 0} must be between -1 and 1",
                "threshold",
            )
    # A YAML number is a float64: `_vector` rounds all thresholds to float32 at once, as scoring
    # compares float32 cosines with float32 thresholds.
    return vector.to(torch.float32), threshold


def _vector_problems(vectors: list[Tensor], encoder: PolicyEncoder) -> dict[int, str]:
    """Index -> why that [D] vector cannot be a concept: wrong width, non-finite, all zeros.

    Checked for all vectors at once (one stack, two reductions): per-vector checks cost tens of
    microseconds each, seconds at 100,000 concepts.
    """
    dim = encoder.embed_dim
    found: dict[int, str] = {}
    same = []
    for i, vector in enumerate(vectors):
        if vector.ndim != 1 or vector.shape[0] != dim:
            found[i] = (
                f"embedding has shape {list(vector.shape)}, the model {encoder.model_id} "
                f"projects to {dim} values"
            )
        else:
            same.append(i)
    if same:
        stacked = torch.stack([vectors[i] for i in same])  # [N, D]
        finite = torch.isfinite(stacked).all(dim=1).tolist()
        nonzero = (stacked != 0).any(dim=1).tolist()
        for i, ok, any_value in zip(same, finite, nonzero, strict=True):
            if not ok:
                found[i] = "embedding has non-finite values (NaN or inf)"
            elif not any_value:
                found[i] = "embedding is all zeros"
    return found


def _matrix(vectors: list[Tensor], dim: int) -> Tensor:
    """[C, D] float32: raw vectors stacked, then the whole matrix normalised at once.

    Exactly how diffusers' `cosine_distance` normalises its concept parameter, so that
    `compat: diffusers` gives bit-identical cosines.
    """
    if not vectors:
        return torch.zeros((0, dim))
    return torch.nn.functional.normalize(torch.stack(vectors))


def _vector(values: list[float]) -> Tensor:
    """[C] float32 from floats (each rounded to float32 as `torch.tensor(x, float32)` would)."""
    return torch.tensor(values, dtype=torch.float32) if values else torch.zeros((0,))


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
        _check_prompt_lengths(policy, encoder, users, prompts)
        embeddings = cache.encode(encoder, prompts) if cache else encoder.encode_text(prompts)
    except EncodingError as exc:  # e.g. no text tower: point at the first concept that needs one
        path, concept = users[0]
        others = f" (and {len(users) - 1} more with prompts)" if len(users) > 1 else ""
        message = f"concept '{concept.name}'{others}: {exc}"
        raise PolicyError([policy.issue((*path, "prompts"), message)]) from exc
    return dict(zip(prompts, embeddings, strict=True))


def _check_prompt_lengths(
    policy: Policy,
    encoder: PolicyEncoder,
    users: list[tuple[KeyPath, Concept]],
    prompts: list[str],
) -> None:
    """Refuse prompts the text tower would truncate: two prompts that differ only after its
    limit would compile to the same vector, and the concept would not mean what it says."""
    limit = encoder.max_text_tokens
    if limit is None:
        return
    tokens = dict(zip(prompts, encoder.count_tokens(prompts), strict=True))
    issues = []
    for path, concept in users:
        for i, prompt in enumerate(concept.prompts or ()):
            if tokens[prompt] > limit:
                message = (
                    f"concept '{concept.name}': prompt has {tokens[prompt]} tokens, but the text"
                    f" tower of {encoder.model_id} reads at most {limit} (start and end"
                    " included) and would cut the rest off: shorten it or split it into"
                    " several prompts"
                )
                issues.append(policy.issue((*path, "prompts", i), message))
    if issues:
        raise PolicyError(issues)


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
    entries: list[tuple[KeyPath, Concept]] = []
    vectors: list[Tensor] = []
    thresholds: list[float] = []
    issues: list[PolicyIssue] = []

    def problem_at(path: KeyPath, concept: Concept, problem: _Problem) -> None:
        source = next(k for k in DEFINITION_KEYS if getattr(concept, k) is not None)
        where: KeyPath = (*path, *(problem.subpath or (source,)))
        issues.append(policy.issue(where, f"concept '{concept.name}': {problem.message}"))

    for path, concept in policy.iter_concepts():
        try:
            vector, threshold = resolve_concept(
                policy, concept, encoder, prompt_vectors, example_vectors
            )
        except _Problem as problem:
            problem_at(path, concept, problem)
            continue
        entries.append((path, concept))
        vectors.append(vector)
        thresholds.append(threshold)
    for i, message in sorted(_vector_problems(vectors, encoder).items()):
        problem_at(*entries[i], _Problem(message))
    if issues:
        raise PolicyError(sorted(issues, key=lambda issue: (issue.line or 0, issue.col or 0)))

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
        views=policy.effective_views,
        blur_radius=float(policy.actions.blur.radius),
        pixelate_block=float(policy.actions.pixelate.block),
        review_placeholder=policy.actions.review.placeholder,
        example_sha256=example_sha256,
        source=policy.source_text or "",
        model_path=getattr(encoder, "model_path", ""),
    )
