"""Import a Stable Diffusion safety checker as a policy: its hidden concepts become named data.

The checker's four tensors (`concept_embeds` [C, D], `concept_embeds_weights` [C],
`special_care_embeds` [S, D], `special_care_embeds_weights` [S]) are copied, unnormalised, into an
embeddings file beside the written YAML, which names every row (`sd-0`...) with its float32
threshold and `compat: diffusers`, so the policy flags exactly what diffusers flags.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from moderation.checkpoint import Checkpoint
from moderation.errors import EncoderError
from policy.limits import DIFFUSERS_ADJUSTMENT  # the checker's hard-coded `adjustment = 0.01`

CONCEPTS = "concept_embeds"
THRESHOLDS = "concept_embeds_weights"
SPECIAL = "special_care_embeds"
SPECIAL_THRESHOLDS = "special_care_embeds_weights"
TENSOR_NAMES = (CONCEPTS, THRESHOLDS, SPECIAL, SPECIAL_THRESHOLDS)


class CheckpointError(EncoderError):
    """A checkpoint could not be read as a StableDiffusionSafetyChecker."""


@dataclass(frozen=True, eq=False)
class CheckerTensors:
    """The concept data of a safety checker, as stored (float32, rows not normalised)."""

    concept_embeds: torch.Tensor  # [C, D]
    concept_thresholds: torch.Tensor  # [C]
    special_embeds: torch.Tensor  # [S, D]
    special_thresholds: torch.Tensor  # [S]
    source: str  # the weight file they were read from

    def as_dict(self) -> dict[str, torch.Tensor]:
        """The tensors under the checker's own names."""
        return {
            CONCEPTS: self.concept_embeds,
            THRESHOLDS: self.concept_thresholds,
            SPECIAL: self.special_embeds,
            SPECIAL_THRESHOLDS: self.special_thresholds,
        }


@dataclass(frozen=True)
class ImportResult:
    """What `import_sd_checker` wrote."""

    policy_path: Path
    embeddings_path: Path
    n_concepts: int
    n_special: int
    model: str


def read_checker_tensors(checkpoint: str | Path) -> CheckerTensors:
    """Read and check the four concept tensors of a safety checker checkpoint (any row counts).

    `checkpoint` is a weight file, a checker folder, a pipeline folder (its `safety_checker/`) or
    a hub id. Only the concept tensors are read: the 1.2 GB vision tower stays on disk.
    """
    try:
        ckpt = Checkpoint.resolve(checkpoint, weights_only=True)
        try:
            weights, _ = ckpt.weights()
        except EncoderError:
            if not ckpt.local:
                raise
            raise CheckpointError(
                f"{checkpoint}: no model.safetensors or pytorch_model.bin here or in "
                "safety_checker/; is this a StableDiffusionSafetyChecker checkpoint?"
            ) from None
        keys = ckpt.tensor_names()
        found = {}
        for name in TENSOR_NAMES:
            key = ckpt.find_tensor(name)
            if key is not None:
                found[name] = ckpt.read_tensor(key)
    except CheckpointError:
        raise
    except EncoderError as exc:
        raise CheckpointError(str(exc)) from exc
    return _validate(found, keys, str(weights))


def _validate(tensors: dict[str, torch.Tensor], keys: list[str], source: str) -> CheckerTensors:
    """Shapes, counts and finiteness, each problem named; values become float32."""
    missing = [n for n in TENSOR_NAMES if n not in tensors]
    if len(missing) == len(TENSOR_NAMES):
        sample = ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
        raise CheckpointError(
            f"{source}: not a StableDiffusionSafetyChecker checkpoint: none of "
            f"{', '.join(TENSOR_NAMES)} among its {len(keys)} tensors ({sample or 'none'})"
        )
    if missing:
        raise CheckpointError(f"{source}: missing tensors: {', '.join(missing)}")
    t = {n: tensors[n].detach().to(torch.float32).contiguous() for n in TENSOR_NAMES}
    for embeds, weights in ((CONCEPTS, THRESHOLDS), (SPECIAL, SPECIAL_THRESHOLDS)):
        if t[embeds].ndim != 2:
            raise CheckpointError(
                f"{source}: {embeds} must be [rows, width], not {tuple(t[embeds].shape)}"
            )
        if t[weights].shape != (t[embeds].shape[0],):
            raise CheckpointError(
                f"{source}: {weights} has shape {tuple(t[weights].shape)}, "
                f"expected one threshold per row of {embeds} ({t[embeds].shape[0]})"
            )
    if t[CONCEPTS].shape[0] == 0:
        raise CheckpointError(f"{source}: {CONCEPTS} has no rows: nothing to import")
    if t[SPECIAL].shape[1] != t[CONCEPTS].shape[1]:
        raise CheckpointError(
            f"{source}: {SPECIAL} rows are {t[SPECIAL].shape[1]} wide, "
            f"{CONCEPTS} rows {t[CONCEPTS].shape[1]}"
        )
    for name, tensor in t.items():
        if not torch.isfinite(tensor).all():
            raise CheckpointError(f"{source}: {name} holds NaN or infinite values")
    return CheckerTensors(t[CONCEPTS], t[THRESHOLDS], t[SPECIAL], t[SPECIAL_THRESHOLDS], source)


def float32_text(value: float) -> str:
    """The shortest decimal that reads back as the same float32 (`0.1865`, not 0.18649999797)."""
    text = np.format_float_positional(np.float32(value), unique=True, trim="0")
    if np.float32(float(text)).tobytes() != np.float32(value).tobytes():
        raise AssertionError(f"{text} does not read back as float32 {value!r}")
    return text


_PLAIN = re.compile(r"[A-Za-z0-9_./][A-Za-z0-9_./@+-]*\Z")


def _yaml_str(text: str) -> str:
    """A YAML scalar that reads back as this string (quoted when YAML would read another type)."""
    import yaml

    if _PLAIN.match(text) and yaml.safe_load(text) == text:
        return text
    return json.dumps(text, ensure_ascii=False)  # JSON strings are YAML double-quoted scalars


def render_policy(tensors: CheckerTensors, *, name: str, model: str, embeddings_file: str) -> str:
    """The policy YAML for these tensors (compat: diffusers, every row named `sd-<i>`)."""
    file = _yaml_str(embeddings_file)
    lines = [
        "# Imported from a Stable Diffusion safety checker by `moderation policy import-sd-checker`.",
        "# compat: diffusers flags exactly what StableDiffusionSafetyChecker flags (3-decimal",
        "# rounding, special-care adjustment); thresholds are the checkpoint's float32 values.",
        f"policy: {_yaml_str(name)}",
        "version: 1",
        f"model: {_yaml_str(model)}",
        "compat: diffusers",
        "review_band: 0",
        "on_error: blackout",
        "special_care:",
        f"  adjustment: {DIFFUSERS_ADJUSTMENT}",
        "  escalate: allow",
    ]
    special = tensors.special_thresholds.tolist()
    lines.append("  concepts:" if special else "  concepts: []")
    for i, threshold in enumerate(special):
        lines += [
            f"    - name: sd-special-{i}",
            f"      embedding: {{file: {file}, tensor: {SPECIAL}, row: {i}}}",
            f"      threshold: {float32_text(threshold)}",
        ]
    lines.append("concepts:")
    for i, threshold in enumerate(tensors.concept_thresholds.tolist()):
        lines += [
            f"  - name: sd-{i}",
            f"    embedding: {{file: {file}, tensor: {CONCEPTS}, row: {i}}}",
            f"    threshold: {float32_text(threshold)}",
            "    action: blackout",
        ]
    return "\n".join(lines) + "\n"


def _check_round_trip(text: str, tensors: CheckerTensors, model: str) -> None:
    """The written YAML must read back to the very same float32 thresholds and model."""
    import yaml

    doc = yaml.safe_load(text)
    got = np.array([c["threshold"] for c in doc["concepts"]], dtype=np.float32)
    got_special = np.array(
        [c["threshold"] for c in doc["special_care"]["concepts"]], dtype=np.float32
    )
    same = np.array_equal(got.view(np.uint32), tensors.concept_thresholds.numpy().view(np.uint32))
    same_special = np.array_equal(
        got_special.view(np.uint32), tensors.special_thresholds.numpy().view(np.uint32)
    )
    if not (same and same_special and doc["model"] == model):
        raise AssertionError("the policy YAML does not read back to the checkpoint's values")


def model_reference(checkpoint: str | Path, out: Path) -> str:
    """`model:` for the policy: the checkpoint as given, but a relative local path is rewritten
    relative to the policy's folder (how the loader resolves it) and a weight file becomes its
    folder (what the encoder loads)."""
    path = Path(checkpoint)
    if not path.exists():
        return str(checkpoint)  # a hub id
    if path.is_file():
        path = path.parent
    if path.is_absolute():
        return str(path)
    return os.path.relpath(path.resolve(), out.parent.resolve())


def import_sd_checker(
    checkpoint: str | Path, out: str | Path, *, overwrite: bool = False
) -> ImportResult:
    """Write `out` (policy YAML) and `<out stem>.safetensors` (raw tensors) from a checker."""
    from safetensors.torch import save

    from policy.atomic import atomic_write

    out = Path(out)
    embeddings_path = out.with_suffix(".safetensors")
    if embeddings_path == out:
        raise CheckpointError(f"{out}: the policy file needs a .yaml name")
    if not overwrite:
        for path in (out, embeddings_path):
            if path.exists():
                raise CheckpointError(f"{path} exists; pass --force to overwrite it")
    if not out.parent.is_dir():
        raise CheckpointError(f"{out.parent}: no such folder")
    tensors = read_checker_tensors(checkpoint)
    model = model_reference(checkpoint, out)
    text = render_policy(tensors, name=out.stem, model=model, embeddings_file=embeddings_path.name)
    _check_round_trip(text, tensors, model)
    metadata = {"source": tensors.source, "imported_by": "moderation policy import-sd-checker"}
    atomic_write(embeddings_path, save(tensors.as_dict(), metadata=metadata))
    atomic_write(out, text)
    return ImportResult(
        policy_path=out,
        embeddings_path=embeddings_path,
        n_concepts=int(tensors.concept_embeds.shape[0]),
        n_special=int(tensors.special_embeds.shape[0]),
        model=model,
    )


def checker_policy(tensors: CheckerTensors, *, name: str, model: str):
    """The CompiledPolicy an imported checker compiles to, built straight from its tensors.

    Rows are normalised with `F.normalize`, as diffusers does on every call, so scores match it
    bit for bit. Useful where no text tower or YAML is at hand (e.g. wrapping a loaded checker).
    """
    import torch.nn.functional as F

    from policy.compiled import CompiledPolicy

    n_concepts = tensors.concept_embeds.shape[0]
    return CompiledPolicy(
        name=name,
        version="1",
        model=model,
        concept_names=tuple(f"sd-{i}" for i in range(n_concepts)),
        categories=(None,) * n_concepts,
        severities=("medium",) * n_concepts,
        actions=("blackout",) * n_concepts,
        concept_matrix=F.normalize(tensors.concept_embeds),
        thresholds=tensors.concept_thresholds.clone(),
        special_names=tuple(f"sd-special-{i}" for i in range(tensors.special_embeds.shape[0])),
        special_matrix=F.normalize(tensors.special_embeds),
        special_thresholds=tensors.special_thresholds.clone(),
        adjustment=DIFFUSERS_ADJUSTMENT,
        escalate="allow",
        review_band=0.0,
        on_error="blackout",
        compat="diffusers",
    )
