"""CompiledPolicy: a policy as embedding matrices and thresholds, ready to score on any device.

A compiled policy is self-contained: a worker can load it from its safetensors artifact and moderate
with only a vision tower, no text tower and no YAML.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from policy.compiled_rules import problems
from policy.errors import PolicyError, PolicyIssue
from policy.limits import (
    BLUR_RADIUS_DEFAULT,
    PIXELATE_BLOCK_DEFAULT,
)
from policy.vocabulary import ACTION_RANK

__all__ = ["FORMAT_VERSION", "CompiledPolicy"]

# Bump when the meaning of a compiled artifact changes, so old digests stop matching.
# 2: blur_radius and pixelate_block are fractions of the image's shorter side, not pixels;
#    `views` (an artifact without it was judged on the centre crop).
FORMAT_VERSION = 2

_TENSORS = ("concept_matrix", "thresholds", "special_matrix", "special_thresholds")
_IDENTITY = ("model_path", "model_sha256")  # saved as metadata of their own, outside the digest
_SEQUENCES = (
    "concept_names",
    "categories",
    "severities",
    "actions",
    "special_names",
    "example_sha256",
)


@dataclass(frozen=True, eq=False)
class CompiledPolicy:
    """Matrices and per-concept data of one policy; `digest` identifies every decision made with it."""

    name: str
    version: str
    model: str
    concept_names: tuple[str, ...]
    categories: tuple[str | None, ...]
    severities: tuple[str, ...]
    actions: tuple[str, ...]
    concept_matrix: torch.Tensor  # [C, D] float32, rows L2-normalised
    thresholds: torch.Tensor  # [C] float32
    special_names: tuple[str, ...] = ()
    special_matrix: torch.Tensor | None = None  # [S, D] float32, rows L2-normalised
    special_thresholds: torch.Tensor | None = None  # [S] float32
    adjustment: float = 0.0
    escalate: str | None = None
    review_band: float = 0.0
    on_error: str = "blackout"
    compat: str | None = None
    # The square views an image is judged on: "cover", "center" or "tiles" (see
    # moderation.preprocess); None means the default: "center" under compat, else "cover".
    views: str | None = None
    blur_radius: float = BLUR_RADIUS_DEFAULT  # Gaussian sigma / the image's shorter side
    pixelate_block: float = PIXELATE_BLOCK_DEFAULT  # block side / the image's shorter side
    review_placeholder: str = "blur"
    # "CONCEPT:SHA256" of every example image an `examples:` concept was computed from.
    example_sha256: tuple[str, ...] = ()
    source: str = field(default="", repr=False)
    digest: str = ""
    # Where the model was when the policy was compiled (an absolute folder: a local checkpoint or
    # a snapshot of the Hugging Face cache) and the sha256 of its weights file: what `model`
    # (as written, maybe relative to the policy file) resolved to. Outside the digest, which
    # must not depend on the folder a policy was compiled in; `policy compile` records both.
    model_path: str = field(default="", compare=False)
    model_sha256: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        """Validate every field (policy.compiled_rules): a CompiledPolicy that exists is usable."""
        for name in _SEQUENCES:
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.views is None:
            object.__setattr__(self, "views", "center" if self.compat == "diffusers" else "cover")
        if self.special_matrix is None and isinstance(self.concept_matrix, torch.Tensor):
            dim = self.concept_matrix.shape[-1]
            object.__setattr__(self, "special_matrix", self.concept_matrix.new_zeros((0, dim)))
            object.__setattr__(self, "special_thresholds", self.concept_matrix.new_zeros((0,)))
        found = problems(self)
        if found:
            label = f"compiled policy {self.name!r}" if isinstance(self.name, str) else "policy"
            raise PolicyError(PolicyIssue(label, None, None, "", m) for m in found)
        if not self.digest:
            object.__setattr__(self, "digest", self._compute_digest())

    @property
    def embed_dim(self) -> int:
        return int(self.concept_matrix.shape[-1])

    @property
    def device(self) -> torch.device:
        return self.concept_matrix.device

    @functools.cached_property
    def action_ranks(self) -> torch.Tensor:
        """[C] int64 severity rank of each concept's action, on the policy's device.

        Cached: rebuilding it per batch cost 1.7 ms at 10,000 concepts (a host-to-device copy on
        a GPU); `to()` makes a new object, which builds its own on its device.
        """
        ranks = [ACTION_RANK[a] for a in self.actions]
        return torch.tensor(ranks, dtype=torch.int64, device=self.device)

    def _metadata(self) -> dict:
        """Everything but the tensors and the digest, as JSON-able data."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name in (*_TENSORS, *_IDENTITY, "digest"):
            data.pop(name)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}

    def _compute_digest(self) -> str:
        """sha256 over everything that can change a decision (the YAML text itself does not)."""
        meta = self._metadata()
        meta.pop("source")
        if not meta["example_sha256"]:  # digests of policies without example images stay as
            meta.pop("example_sha256")  # they were
        h = hashlib.sha256()
        h.update(json.dumps({"format": FORMAT_VERSION, **meta}, sort_keys=True).encode())
        for name in _TENSORS:
            t = getattr(self, name).detach().to("cpu", torch.float32).contiguous()
            h.update(name.encode())
            h.update(str(tuple(t.shape)).encode())
            h.update(t.numpy().tobytes())
        return h.hexdigest()

    @functools.cached_property
    def vector_digests(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """Per concept and per special-care concept, a short sha256 of its float32 vector.

        Logged with the policy, they let a backtest tell which of a candidate's concepts are
        the very vectors a decision was scored against, and reuse the logged cosines for them.
        """
        return vector_digests(self.concept_matrix), vector_digests(self.special_matrix)

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> CompiledPolicy:
        """A copy with its tensors on device (thresholds stay float32; the digest is kept)."""
        moved = {}
        for name in _TENSORS:
            t = getattr(self, name).to(device)
            if dtype is not None and name.endswith("matrix"):
                t = t.to(dtype)
            moved[name] = t
        return dataclasses.replace(self, **moved)

    def save(self, path: str | Path) -> Path:
        """Write the compiled policy as one safetensors file (tensors + JSON metadata)."""
        from safetensors.torch import save

        from policy.atomic import atomic_write

        path = Path(path)
        tensors = {
            n: getattr(self, n).detach().to("cpu", torch.float32).contiguous() for n in _TENSORS
        }
        meta = {
            "format": str(FORMAT_VERSION),
            "digest": self.digest,
            "policy": json.dumps(self._metadata()),
            **{name: getattr(self, name) for name in _IDENTITY if getattr(self, name)},
        }
        return atomic_write(path, save(tensors, metadata=meta))

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str | None = None) -> CompiledPolicy:
        """Read an artifact written by save(): every field is validated, then the digest checked.

        Any problem is one PolicyError naming the file; a valid digest is not enough (it only
        says the fields are the ones the digest was computed over, not that they are sound).
        """
        file = str(path)
        meta, tensors = _read_artifact(file)
        found = meta.get("format")
        if found == "1":
            raise PolicyError.about_file(
                file,
                "compiled by an older version (format 1, blur and pixelate in pixels):"
                " compile its policy again with `moderation policy compile`",
            )
        if found != str(FORMAT_VERSION) or "policy" not in meta:
            raise PolicyError.about_file(file, f"not a compiled policy of format {FORMAT_VERSION}")
        data = _policy_fields(file, meta["policy"])
        data.update({name: meta[name] for name in _IDENTITY if isinstance(meta.get(name), str)})
        try:
            compiled = cls(**data, **tensors)
        except PolicyError as exc:  # the same rules as in code, but naming the artifact
            raise PolicyError(issue._replace(file=file) for issue in exc.issues) from None
        if compiled.digest != meta.get("digest"):
            raise PolicyError.about_file(
                file, "digest mismatch: the artifact was modified or is corrupt"
            )
        return compiled.to(device) if device is not None else compiled


def _read_artifact(file: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, the four tensors) of a safetensors file; exactly those tensors, no others."""
    from safetensors import safe_open

    try:
        with safe_open(file, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            names = set(f.keys())
            # Fresh (aligned) copies: a matrix product over a view into the file's buffer can
            # round differently in the last bit from one over the compiled policy's own tensors.
            tensors = {n: f.get_tensor(n).clone() for n in _TENSORS if n in names}
    except Exception as exc:  # safetensors raises several types for unreadable files
        raise PolicyError.about_file(file, f"not a compiled policy: {exc}") from exc
    missing = [n for n in _TENSORS if n not in names]
    extra = sorted(names - set(_TENSORS))
    if missing or extra:
        parts = [f"missing tensor {n!r}" for n in missing] + [
            f"unknown tensor {n!r}" for n in extra
        ]
        raise PolicyError.about_file(file, f"not a compiled policy: {', '.join(parts)}")
    return meta, tensors


def _policy_fields(file: str, text: str) -> dict:
    """The JSON metadata as constructor arguments: an object with exactly the expected keys."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise PolicyError.about_file(file, f"metadata 'policy' is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise PolicyError.about_file(file, "metadata 'policy' must be a JSON object")
    expected = {f.name for f in dataclasses.fields(CompiledPolicy)} - {
        *_TENSORS,
        *_IDENTITY,
        "digest",
    }
    unknown, missing = sorted(set(data) - expected), sorted(expected - set(data))
    if unknown or missing:
        parts = [f"unknown key {k!r}" for k in unknown] + [f"missing key {k!r}" for k in missing]
        raise PolicyError.about_file(file, f"metadata 'policy': {', '.join(parts)}")
    return {k: tuple(v) if k in _SEQUENCES and isinstance(v, list) else v for k, v in data.items()}


def vector_digests(matrix: torch.Tensor) -> tuple[str, ...]:
    """`vector_digest` of each row of a matrix."""
    rows = matrix.detach().to("cpu", torch.float32).contiguous().numpy()
    return tuple(vector_digest(row) for row in rows)


def vector_digest(vector) -> str:
    """sha256 (first 16 hex digits) of one vector's float32 little-endian bytes."""
    import numpy as np

    return hashlib.sha256(np.ascontiguousarray(vector, dtype="<f4").tobytes()).hexdigest()[:16]
