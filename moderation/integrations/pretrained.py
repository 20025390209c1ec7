"""A PolicySafetyChecker's folder in a saved diffusers pipeline: write it, read it back.

`pipe.save_pretrained(DIR)` calls the checker's `save_pretrained(DIR/safety_checker)`, which
writes:

    moderation_checker.json    what the folder is: format, class, policy digest, attention,
                               the sha256 of every other file and the encoder's digest
    policy.safetensors         the compiled policy (`CompiledPolicy.save`; its digest is checked)
    shadow-N.safetensors       its shadow candidates, when it has any (digests checked too)
    config.json                the vision tower and its projection, as a transformers
    model.safetensors            `CLIPVisionModelWithProjection` checkpoint
    preprocessor_config.json   the tower's image size, mean and std (used to view `images`)

Loading needs none of the original files (policy YAML, model folder) and no network. No database
URL, folder or caller metadata is written: a URL may hold a password, and where a loaded
pipeline logs is its caller's choice (`checker.log_to(URL)`).

Integrity: loading checks every file against the manifest's sha256 before reading it, refuses
preprocessing outside sane bounds (`moderation.encoder_identity.preprocessing_settings`), and
checks the loaded tower's digest. Whoever can rewrite the folder can rewrite the manifest too,
so a caller who must know what judges its images pins the policy (`expect_digest=`) and the
encoder (`expect_encoder_digest=`); every logged decision records both digests.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from moderation.errors import ModerationError
from moderation.loading import check_digest
from policy.compiled import CompiledPolicy

if TYPE_CHECKING:
    from moderation.encoder import ClipEncoder

MANIFEST = "moderation_checker.json"
POLICY_FILE = "policy.safetensors"
# Bump when the folder's layout or meaning changes. 2: file digests and the encoder digest;
# a format-1 folder is refused (it has nothing to check its tower against): save it again.
FORMAT = 2
TOWER_FILES = ("config.json", "model.safetensors", "preprocessor_config.json")
HASH_CHUNK = 1 << 20


def save_checker(
    folder: str | Path,
    policy: CompiledPolicy,
    tower: nn.Module,
    *,
    class_name: str,
    logged: bool,
    shadow: tuple[CompiledPolicy, ...] = (),
) -> Path:
    """Write a checker's compiled policy and vision tower into `folder`; return the folder.

    tower: holds `vision_model` (a transformers CLIP vision model), `visual_projection`,
    `image_size`, `image_mean` and `image_std`.
    """
    vision_model = getattr(tower, "vision_model", None)
    projection = getattr(tower, "visual_projection", None)
    config = getattr(vision_model, "config", None)
    if getattr(config, "model_type", None) != "clip_vision_model" or projection is None:
        raise ModerationError(
            f"cannot save this checker: its encoder ({type(tower).__name__}) is not a CLIP vision "
            "tower with a projection; build it with from_policy or from_checker"
        )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _save_tower(folder, vision_model, projection, tower)
    policy.save(folder / POLICY_FILE)
    shadow_files = []
    for i, candidate in enumerate(shadow):
        candidate.save(folder / f"shadow-{i}.safetensors")
        shadow_files.append({"file": f"shadow-{i}.safetensors", "digest": candidate.digest})
    for stale in folder.glob("shadow-*.safetensors"):  # a folder saved over keeps no old ones
        if stale.name not in {f["file"] for f in shadow_files}:
            stale.unlink()
    from moderation.encoder_identity import tower_digest

    names = [POLICY_FILE, *TOWER_FILES, *(f["file"] for f in shadow_files)]
    manifest = {
        "format": FORMAT,
        "class": class_name,
        "policy": POLICY_FILE,
        "policy_name": policy.name,
        "policy_digest": policy.digest,
        "attn_implementation": getattr(config, "_attn_implementation", None),
        # Whether the saved checker logged its decisions (where to is not saved): a loaded one
        # that does not says so, rather than dropping the log silently.
        "logged": logged,
        "shadow": shadow_files,  # candidates in order; older folders have none
        # sha256 of every file the checker is made of, checked before any is read.
        "files": {name: file_sha256(folder / name) for name in names},
        "encoder_digest": tower_digest(
            vision_model, projection, tower.image_size, tower.image_mean, tower.image_std
        ),
    }
    _write_text(folder / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return folder


def _save_tower(folder: Path, vision_model: nn.Module, projection: nn.Module, tower: Any) -> None:
    """The tower as a CLIPVisionModelWithProjection checkpoint, its tensors shared, not copied."""
    import copy

    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    config = copy.deepcopy(vision_model.config)
    config.projection_dim = int(projection.weight.shape[0])
    config.architectures = ["CLIPVisionModelWithProjection"]
    with torch.device("meta"):  # a skeleton; the real tensors are assigned below
        model = CLIPVisionModelWithProjection(config)
    source = vision_model
    wanted = set(model.vision_model.state_dict())
    # transformers 4 nests the transformer inside CLIPVisionModel; 5 does not.
    if set(source.state_dict()) != wanted and hasattr(source, "vision_model"):
        source = source.vision_model
    model.vision_model.load_state_dict(source.state_dict(), strict=True, assign=True)
    model.visual_projection.load_state_dict(projection.state_dict(), strict=True, assign=True)
    model.save_pretrained(folder, safe_serialization=True)
    size = int(tower.image_size)
    CLIPImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=list(tower.image_mean),
        image_std=list(tower.image_std),
    ).save_pretrained(folder)


def load_checker(
    folder: str | Path,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    expect_digest: str | None = None,
    expect_encoder_digest: str | None = None,
) -> tuple[CompiledPolicy, ClipEncoder, dict[str, Any]]:
    """The compiled policy, the vision tower (a ClipEncoder) and the manifest saved in `folder`.

    Loads on the CPU in float32 unless told otherwise, like every diffusers component. Every
    file is checked against the manifest's digests first; `expect_digest` /
    `expect_encoder_digest` pin the policy's and the encoder's digests (a mismatch is refused).
    """
    from moderation.encoder import ClipEncoder

    folder = Path(folder)
    manifest = read_manifest(folder)
    check_files(folder, manifest)
    policy_path = folder / str(manifest.get("policy") or POLICY_FILE)
    if policy_path.parent != folder:
        raise ModerationError(f"{folder / MANIFEST}: the policy must be a file in this folder")
    policy = CompiledPolicy.load(policy_path)  # checks its fields and its digest
    if policy.digest != manifest.get("policy_digest"):
        raise ModerationError(
            f"{policy_path}: policy digest {policy.digest[:12]} is not the one the checker was "
            f"saved with ({str(manifest.get('policy_digest'))[:12]}): the folder was modified"
        )
    check_digest(policy.digest, expect_digest, f"{policy_path}: policy")
    encoder = ClipEncoder.from_pretrained(
        folder, device=device or "cpu", dtype=dtype or torch.float32
    )
    if encoder.digest != manifest.get("encoder_digest"):
        raise ModerationError(
            f"{folder / 'model.safetensors'}: encoder digest {encoder.digest[:12]} is not the one "
            f"the checker was saved with: the folder was modified"
        )
    check_digest(encoder.digest, expect_encoder_digest, f"{folder / 'model.safetensors'}: encoder")
    attention = manifest.get("attn_implementation")
    if attention:  # the saved tower's attention, so embeddings match it bit for bit
        encoder.vision_model.set_attn_implementation(attention)
    return policy, encoder, manifest


def load_shadow(folder: str | Path, manifest: dict[str, Any]) -> list[CompiledPolicy]:
    """The shadow candidates saved with a checker, in order (none for older folders)."""
    folder = Path(folder)
    out = []
    for entry in manifest.get("shadow") or []:
        name = str(entry.get("file", "")) if isinstance(entry, dict) else ""
        path = folder / name
        if not name or path.parent != folder:
            raise ModerationError(f"{folder / MANIFEST}: a shadow candidate must be a file here")
        candidate = CompiledPolicy.load(path)
        if candidate.digest != entry.get("digest"):
            raise ModerationError(
                f"{path}: shadow candidate digest {candidate.digest[:12]} is not the one the "
                "checker was saved with: the folder was modified"
            )
        out.append(candidate)
    return out


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def check_files(folder: Path, manifest: dict[str, Any]) -> None:
    """Every file the checker is made of holds the bytes it was saved with (manifest `files`)."""
    files = manifest.get("files")
    required = {str(manifest.get("policy") or POLICY_FILE), *TOWER_FILES}
    if not isinstance(files, dict) or not required <= set(files):
        raise ModerationError(
            f"{folder / MANIFEST}: lists no digests of {', '.join(sorted(required))}: "
            "the folder was modified"
        )
    for name, digest in files.items():
        path = folder / str(name)
        if path.parent != folder:
            raise ModerationError(f"{folder / MANIFEST}: {name!r} must be a file in this folder")
        try:
            actual = file_sha256(path)
        except OSError as exc:
            raise ModerationError(f"{path}: cannot read it: {exc.strerror or exc}") from None
        if actual != digest:
            raise ModerationError(
                f"{path}: sha256 {actual[:12]} is not the one the checker was saved with "
                f"({str(digest)[:12]}): the folder was modified"
            )


def read_manifest(folder: Path) -> dict[str, Any]:
    """The checker's manifest; errors name the file."""
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModerationError(
            f"{folder}: not a saved PolicySafetyChecker ({MANIFEST} not found)"
        ) from None
    except (OSError, ValueError) as exc:
        raise ModerationError(f"{path}: cannot read it: {exc}") from exc
    found = manifest.get("format") if isinstance(manifest, dict) else None
    if found == 1:
        raise ModerationError(
            f"{path}: saved in format 1, which records no digests of the vision tower: load the "
            "checker from its policy and model and save it again"
        )
    if found != FORMAT:
        raise ModerationError(f"{path}: not a checker folder of format {FORMAT} (found {found!r})")
    return manifest


def _write_text(path: Path, text: str) -> None:
    """Write a small file whole (policy.atomic: a unique temporary name, never a link)."""
    from policy.atomic import atomic_write

    atomic_write(path, text)
