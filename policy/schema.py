"""Pydantic models of the policy language v1: unknown keys and loosely typed values are errors."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PlainValidator,
    PrivateAttr,
    Tag,
    model_validator,
)
from pydantic_core import PydanticCustomError

from policy.errors import KeyPath, PolicyIssue, format_path, kind_of
from policy.limits import (
    BLUR_RADIUS_DEFAULT,
    DIFFUSERS_ADJUSTMENT,
    MODEL_MAX,
    NAME_MAX,
    PIXELATE_BLOCK_DEFAULT,
    VERSION_MAX,
    adjustment_problem,
    blur_problem,
    name_problem,
    pixelate_problem,
)
from policy.vocabulary import FAIL_CLOSED, Action, Placeholder, View
from policy.yaml_loader import LoadedYaml

Severity = Literal["low", "medium", "high", "critical"]
DEFAULT_MODEL = "openai/clip-vit-large-patch14"
# Loc labels pydantic adds after `embedding` for the two accepted shapes; the loader drops them.
EMBEDDING_TAGS = frozenset({"inline", "reference", "checkpoint"})
THRESHOLD_TAGS = frozenset({"number", "checkpoint"})


def _between(low: float, high: float, *, high_open: bool = False) -> AfterValidator:
    """Range check with one readable message (pydantic's own reports each bound separately)."""
    message = (
        f"must be at least {low} and less than {high}"
        if high_open
        else f"must be between {low} and {high}"
    )

    def check(value: float) -> float:
        if not (low <= value and (value < high if high_open else value <= high)):
            raise PydanticCustomError("out_of_range", message)
        return value

    return AfterValidator(check)


def _not_blank(value: str) -> str:
    if not value.strip():
        raise PydanticCustomError("blank", "must not be empty")
    return value


def _checked(problem_of: Callable[[Any], str | None]) -> AfterValidator:
    """A validator raising the message of one of policy.limits' checks."""

    def check(value: Any) -> Any:
        problem = problem_of(value)
        if problem:
            raise PydanticCustomError("limit", problem)
        return value

    return AfterValidator(check)


def _storable(limit: int) -> AfterValidator:
    return _checked(lambda value: name_problem(value, limit))


def _version(value: Any) -> int | str:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise PydanticCustomError(
            "version_type", "expected an integer or a string, got {kind}", {"kind": kind_of(value)}
        )
    problem = name_problem(str(value), VERSION_MAX)
    if problem:
        raise PydanticCustomError("name", problem)
    return value


def _fail_closed(value: str) -> str:
    if value not in FAIL_CLOSED:
        raise PydanticCustomError(
            "fail_open",
            "must not be 'allow': an image that could not be checked must not pass unchecked"
            f" (use {', '.join(FAIL_CLOSED[:-1])} or {FAIL_CLOSED[-1]})",
        )
    return value


def _embedding_shape(value: Any) -> str | None:
    if isinstance(value, list):
        return "inline"
    if isinstance(value, dict):
        return "checkpoint" if "checkpoint" in value else "reference"
    return None


def _threshold_shape(value: Any) -> str:
    return "checkpoint" if isinstance(value, dict) else "number"


@functools.lru_cache(maxsize=64)
def _folder(file: str) -> Path:
    return Path(file).absolute().parent


Text = Annotated[str, AfterValidator(_not_blank)]
Name = Annotated[str, AfterValidator(_not_blank), _storable(NAME_MAX)]
Cosine = Annotated[float, _between(-1, 1)]
InlineEmbedding = Annotated[list[Annotated[float, Field(allow_inf_nan=False)]], Field(min_length=1)]


class _Model(BaseModel):
    # strict: "0.2" is not a number, true is not 1, 1.0 is not an integer row.
    model_config = ConfigDict(extra="forbid", strict=True)


class EmbeddingRef(_Model):
    """A raw embedding in a .safetensors or .npy file inside the policy's folder."""

    file: Text
    tensor: Text | None = None
    row: Annotated[int, Field(ge=0)] | None = None


class CheckpointRef(_Model):
    """A row of a tensor stored in the policy's model checkpoint, read when the policy compiles.

    This is how a policy reuses a Stable Diffusion safety checker's own concept embeddings and
    thresholds (`concept_embeds`, `concept_embeds_weights`, ...) without copying them.
    """

    checkpoint: Text
    row: Annotated[int, Field(ge=0)] | None = None


Embedding = Annotated[
    Annotated[InlineEmbedding, Tag("inline")]
    | Annotated[EmbeddingRef, Tag("reference")]
    | Annotated[CheckpointRef, Tag("checkpoint")],
    Discriminator(
        _embedding_shape,
        custom_error_type="embedding_type",
        custom_error_message="expected a list of numbers or a mapping with 'file' or 'checkpoint'",
    ),
]
# A threshold is a number, or a checkpoint tensor's row (e.g. concept_embeds_weights).
Threshold = Annotated[
    Annotated[Cosine, Tag("number")] | Annotated[CheckpointRef, Tag("checkpoint")],
    Discriminator(_threshold_shape),
]


class Concept(_Model):
    """One named concept, matched by text prompts or by a raw embedding."""

    name: Name
    category: Name | None = None
    severity: Severity | None = None
    prompts: Annotated[list[Text], Field(min_length=1)] | None = None
    embedding: Embedding | None = None
    threshold: Threshold | None = None
    action: Action | None = None
    description: str | None = None
    examples: Text | None = None  # a folder of example images inside the policy's folder
    _vector: np.ndarray | None = PrivateAttr(default=None)
    # (name as shown, resolved file) of every example image, set by the loader (policy/examples.py)
    _examples: tuple[tuple[str, Path], ...] | None = PrivateAttr(default=None)

    @property
    def vector(self) -> np.ndarray | None:
        """The raw embedding, float32 [D], as resolved by the loader (None for prompt concepts)."""
        return self._vector

    @property
    def example_files(self) -> tuple[tuple[str, Path], ...] | None:
        """(name as shown, resolved path) of each example image, as listed by the loader."""
        return self._examples

    @model_validator(mode="after")
    def _prompts_or_embedding(self) -> Concept:
        given = [k for k in ("prompts", "embedding", "examples") if getattr(self, k) is not None]
        if given == ["prompts", "embedding"]:
            raise PydanticCustomError(
                "prompts_and_embedding",
                "give either 'prompts' or 'embedding', not both",
                {"at": "embedding"},
            )
        if len(given) > 1:
            raise PydanticCustomError(
                "two_definitions",
                "give one of 'prompts', 'embedding' or 'examples', not both '{a}' and '{b}'",
                {"at": given[1], "a": given[0], "b": given[1]},
            )
        if not given:
            raise PydanticCustomError("no_prompts", "needs 'prompts', 'embedding' or 'examples'")
        return self


class Defaults(_Model):
    """Values used by concepts that do not set their own."""

    threshold: Cosine = 0.2
    action: Action = "blackout"
    severity: Severity = "medium"


class BlurSettings(_Model):
    """Gaussian blur for the `blur` action: sigma as a fraction of the image's shorter side."""

    radius: Annotated[float, _checked(blur_problem)] = BLUR_RADIUS_DEFAULT


class PixelateSettings(_Model):
    """Block side for the `pixelate` action, as a fraction of the image's shorter side."""

    block: Annotated[float, _checked(pixelate_problem)] = PIXELATE_BLOCK_DEFAULT


class ReviewSettings(_Model):
    """What the caller gets for an image held for review."""

    placeholder: Placeholder = "blur"  # shown until a human decides


class ActionSettings(_Model):
    """Settings of the actions that change pixels."""

    blur: BlurSettings = Field(default_factory=BlurSettings)
    pixelate: PixelateSettings = Field(default_factory=PixelateSettings)
    review: ReviewSettings = Field(default_factory=ReviewSettings)


class SpecialCare(_Model):
    """Concepts that, once matched, make every other concept stricter and escalate the action."""

    adjustment: Annotated[float, _checked(adjustment_problem)] = DIFFUSERS_ADJUSTMENT
    escalate: Action | None = "review"
    concepts: Annotated[list[Concept], Field(min_length=1)]


class Policy(_Model):
    """A whole policy file; the loader also sets its source and resolved embeddings."""

    policy: Name
    version: Annotated[int | str, PlainValidator(_version)] = 1
    description: str | None = None
    model: Annotated[str, AfterValidator(_not_blank), _storable(MODEL_MAX)] = DEFAULT_MODEL
    compat: Literal["diffusers"] | None = None
    # What the model sees of an image: `cover` (default) every pixel, `center` CLIP's centre
    # crop (the default, and the only choice, under compat: diffusers), `tiles` cover + tiles.
    views: View | None = None
    defaults: Defaults = Field(default_factory=Defaults)
    review_band: Annotated[float, _between(0, 0.5, high_open=True)] = 0.0
    on_error: Annotated[Action, AfterValidator(_fail_closed)] = "blackout"
    actions: ActionSettings = Field(default_factory=ActionSettings)
    categories: list[Name] | None = None
    concepts: list[Concept] = Field(default_factory=list)
    special_care: SpecialCare | None = None

    _source_file: str | None = PrivateAttr(default=None)  # the path exactly as the caller gave it
    _source_path: Path | None = PrivateAttr(default=None)
    _source_text: str | None = PrivateAttr(default=None)
    _resolved_model: str | None = PrivateAttr(default=None)
    _yaml: LoadedYaml | None = PrivateAttr(default=None)
    _warnings: list[PolicyIssue] = PrivateAttr(default_factory=list)

    @property
    def source_path(self) -> Path | None:
        """The policy file as the caller named it (None when not loaded from a file)."""
        return self._source_path

    @property
    def warnings(self) -> list[PolicyIssue]:
        """What the loader found legal but worth changing (logged too), at FILE:LINE:COL."""
        return list(self._warnings)

    @property
    def source_text(self) -> str | None:
        """The YAML text the policy was loaded from."""
        return self._source_text

    @property
    def resolved_model(self) -> str:
        """`model` as an absolute folder when it names one next to the policy, else the hub id."""
        return self._resolved_model or self.model

    @property
    def special_concepts(self) -> list[Concept]:
        return self.special_care.concepts if self.special_care else []

    def iter_concepts(self) -> Iterator[tuple[KeyPath, Concept]]:
        """Every concept with its key path: `concepts` first, then special-care ones."""
        for i, concept in enumerate(self.concepts):
            yield ("concepts", i), concept
        for i, concept in enumerate(self.special_concepts):
            yield ("special_care", "concepts", i), concept

    def effective_threshold(self, concept: Concept) -> float | CheckpointRef:
        return self.defaults.threshold if concept.threshold is None else concept.threshold

    def effective_action(self, concept: Concept) -> Action:
        return concept.action or self.defaults.action

    @property
    def effective_views(self) -> str:
        """`views`, defaulting to `cover`, or to `center` under compat: diffusers."""
        return self.views or ("center" if self.compat == "diffusers" else "cover")

    def effective_severity(self, concept: Concept) -> Severity:
        return concept.severity or self.defaults.severity

    def issue(self, path: KeyPath, message: str, *, key: bool = False) -> PolicyIssue:
        """A PolicyIssue at `path` in the file the value came from (a base policy's own file for
        a value it inherited), so later stages report like the loader."""
        origin, line, col = self._yaml.where(path, key=key) if self._yaml else (None, None, None)
        file = origin or self._source_file or f"<policy {self.policy}>"
        shown = self._yaml.source_path(path) if self._yaml else path
        return PolicyIssue(file, line, col, format_path(shown), message)

    def folder_of(self, path: KeyPath) -> Path:
        """The folder that relative file names at `path` are read from: that of the file the
        value came from (the policy's own, or a base policy's)."""
        origin = self._yaml.where(path)[0] if self._yaml else None
        return _folder(origin or self._source_file or ".")

    def rule_violations(self) -> list[tuple[KeyPath, str]]:
        """Rules across fields: unique names, declared categories, diffusers compatibility."""
        found: list[tuple[KeyPath, str]] = []
        first_path: dict[str, KeyPath] = {}
        for path, concept in self.iter_concepts():
            if concept.name in first_path:
                other = format_path(first_path[concept.name])
                found.append(
                    ((*path, "name"), f"duplicate concept name '{concept.name}' (see {other})")
                )
            first_path.setdefault(concept.name, path)
            if self.categories is not None and concept.category is not None:
                if concept.category not in self.categories:
                    message = f"category '{concept.category}' is not declared in categories"
                    found.append(((*path, "category"), message))
            if path[0] == "special_care" and concept.action is not None:
                message = (
                    "special-care concepts take no action of their own; set special_care.escalate"
                )
                found.append(((*path, "action"), message))
        for i, category in enumerate(self.categories or []):
            if category in (self.categories or [])[:i]:
                found.append((("categories", i), f"category '{category}' is declared twice"))
        if self.compat == "diffusers" and self.review_band != 0:
            found.append((("review_band",), "must be 0 when compat is 'diffusers'"))
        special = self.special_care
        if self.compat == "diffusers" and special and special.adjustment != DIFFUSERS_ADJUSTMENT:
            message = (
                f"must be {DIFFUSERS_ADJUSTMENT} when compat is 'diffusers' (the safety"
                " checker's own adjustment, which its arithmetic hard-codes)"
            )
            found.append((("special_care", "adjustment"), message))
        if self.compat == "diffusers" and self.views not in (None, "center"):
            found.append(
                (
                    ("views",),
                    "must be 'center' when compat is 'diffusers': diffusers' checker judges "
                    "CLIP's single centre crop (drop compat to judge every pixel)",
                )
            )
        if not self.concepts and not self.special_concepts:
            found.append((("concepts",), "the policy needs at least one concept"))
        return found

    @model_validator(mode="after")
    def _check_rules(self) -> Policy:
        violations = self.rule_violations()
        if violations:
            summary = "; ".join(f"{format_path(path)}: {message}" for path, message in violations)
            raise PydanticCustomError(
                "policy_rules", "{summary}", {"summary": summary, "violations": tuple(violations)}
            )
        return self
