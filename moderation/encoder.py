"""ClipEncoder: image (and text) embeddings from a CLIP or a Stable Diffusion safety-checker checkpoint.

Models load with `from_pretrained` only, from a local folder or the Hugging Face cache, so
`HF_HUB_OFFLINE=1` works. Image embeddings are exactly diffusers' checker's:
`visual_projection(vision_model(pixel_values)[1])`, not normalised.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from moderation.checkpoint import Checkpoint, read_json
from moderation.encoder_identity import preprocessing_settings, tower_digest
from moderation.errors import EncoderError
from moderation.preprocess import CLIP_MEAN, CLIP_STD  # used without a preprocessor_config.json

SAFETY_CHECKER_TENSORS = (
    "concept_embeds",
    "concept_embeds_weights",
    "special_care_embeds",
    "special_care_embeds_weights",
)
_KINDS = {
    "StableDiffusionSafetyChecker": "sd-safety-checker",
    "CLIPModel": "clip",
    "CLIPVisionModelWithProjection": "clip",
}
_TEXT_ARCHITECTURES = ("CLIPModel", "CLIPTextModelWithProjection")
# Knob: images per forward when embedding example images (bounds memory, not results).
IMAGE_CHUNK = 32


def resolve_device(
    device: torch.device | str | None, dtype: torch.dtype | None
) -> tuple[torch.device, torch.dtype]:
    """Defaults: cuda when available, else cpu; float16 on cuda, float32 elsewhere."""
    device = check_device(device)
    return device, dtype if dtype is not None else default_dtype(device)


def default_dtype(device: torch.device) -> torch.dtype:
    """float16 on cuda (half the memory, tensor cores), float32 elsewhere."""
    return torch.float16 if device.type == "cuda" else torch.float32


def check_device(device: torch.device | str | None) -> torch.device:
    """The torch device asked for (default: cuda when available, else cpu), checked to be usable.

    An unknown name or a device this machine lacks is an EncoderError naming it: one line for the
    user, not a traceback from deep inside the first tensor moved there.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise EncoderError(
            f"device {str(device)!r}: not a torch device (expected e.g. cpu, cuda, cuda:1 or mps)"
        ) from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            why = (
                f"this torch build ({torch.__version__}) has no CUDA support"
                if torch.version.cuda is None
                else "no CUDA GPU is visible"
            )
            raise EncoderError(f"device {resolved}: CUDA is not available ({why}); use cpu")
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise EncoderError(
                f"device {resolved}: this machine has {count} CUDA device(s) (cuda:0 to "
                f"cuda:{count - 1})"
            )
    elif resolved.type == "meta":
        raise EncoderError(f"device {resolved}: holds no data, so it cannot run a model")
    elif resolved.type == "mps" and not torch.backends.mps.is_available():
        raise EncoderError(f"device {resolved}: MPS (Apple GPU) is not available here; use cpu")
    elif resolved.type != "cpu":
        try:
            torch.empty(1, device=resolved)
        except (RuntimeError, AssertionError) as exc:
            # torch's own text can run to a page: keep its first sentence.
            reason = str(exc).strip().split(". ")[0].splitlines()[0][:160] or type(exc).__name__
            raise EncoderError(f"device {resolved}: not usable here ({reason}); use cpu") from None
    return resolved


@functools.cache
def _safety_checker_class() -> type:
    """diffusers' checker, sized to the checkpoint's concept rows (diffusers fixes 17 and 3)."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    class SizedSafetyChecker(StableDiffusionSafetyChecker):
        def __init__(self, config: Any) -> None:
            super().__init__(config)
            for name, shape in getattr(config, "moderation_tensor_shapes", {}).items():
                setattr(self, name, nn.Parameter(torch.ones(shape), requires_grad=False))

    return SizedSafetyChecker


def _from_pretrained(cls: Any, ckpt: Checkpoint, **kwargs: Any) -> nn.Module:
    """`cls.from_pretrained` with errors that name the model; missing weights are an error."""
    try:
        model, info = cls.from_pretrained(ckpt.source, output_loading_info=True, **kwargs)
    except (OSError, ValueError, RuntimeError) as exc:
        raise EncoderError(
            f"model {ckpt.model_id}: cannot load {ckpt.architecture}: {exc}"
        ) from exc
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise EncoderError(
            f"model {ckpt.model_id}: the checkpoint lacks {len(missing)} weights of "
            f"{ckpt.architecture}, e.g. {', '.join(missing[:3])}"
        )
    return model.eval().requires_grad_(False)


def _image_settings(ckpt: Checkpoint, default_size: int) -> tuple[int, tuple, tuple]:
    """(crop size, mean, std) from preprocessor_config.json, else CLIP's; values outside sane
    bounds (encoder_identity.IMAGE_STD_RANGE...) are an EncoderError naming the file and the key."""
    path = ckpt.file("preprocessor_config.json")
    if path is None and ckpt.local and ckpt.folder.name == "safety_checker":
        sibling = ckpt.folder.parent / "feature_extractor" / "preprocessor_config.json"
        path = sibling if sibling.is_file() else None  # a pipeline keeps it beside the checker
    if path is None:
        return default_size, CLIP_MEAN, CLIP_STD
    data = read_json(ckpt.model_id, path)
    if not isinstance(data, dict):
        raise EncoderError(f"{path}: not a preprocessing config (expected a JSON object)")
    return preprocessing_settings(data, default_size, str(path))


class ClipEncoder:
    """A CLIP vision tower with its projection, and a text tower when the checkpoint has one."""

    model_id: str
    kind: Literal["clip", "sd-safety-checker"]
    embed_dim: int
    device: torch.device
    dtype: torch.dtype
    has_text_tower: bool
    image_size: int
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    vision_model: nn.Module
    visual_projection: nn.Module
    text_fingerprint: str | None  # identifies the text tower's embeddings (prompt cache key)
    digest: str  # tower_digest: the vision weights and preprocessing that embed images

    @classmethod
    def from_pretrained(
        cls,
        model: str | Path,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        text_model: str | Path | None = None,
    ) -> ClipEncoder:
        """Load a CLIP or safety-checker checkpoint (hub id or folder); text_model adds a text tower."""
        device, dtype = resolve_device(device, dtype)
        ckpt = Checkpoint.resolve(model)
        architectures = ckpt.config.get("architectures") or []
        kind = next((_KINDS[a] for a in architectures if a in _KINDS), None)
        if kind is None:
            raise EncoderError(
                f"model {ckpt.model_id}: unsupported architecture ({ckpt.architecture}); "
                f"expected one of {', '.join(_KINDS)}"
            )
        self = cls.__new__(cls)
        self.model_id, self.kind, self.device, self.dtype = ckpt.model_id, kind, device, dtype
        self._ckpt = ckpt
        self._stored: dict[str, Tensor] = {}
        self.text_model = self.text_projection = self.tokenizer = None
        self.text_fingerprint = self.max_text_tokens = None
        if kind == "sd-safety-checker":
            vision = self._load_safety_checker(ckpt)
        elif "CLIPModel" in architectures:
            from transformers import CLIPModel

            vision = _from_pretrained(CLIPModel, ckpt, dtype=torch.float32)
            self._take_text_tower(vision, ckpt)
        else:
            from transformers import CLIPVisionModelWithProjection

            vision = _from_pretrained(CLIPVisionModelWithProjection, ckpt, dtype=torch.float32)
        vision_size = int(getattr(vision.config, "vision_config", vision.config).image_size)
        self.image_size, self.image_mean, self.image_std = _image_settings(ckpt, vision_size)
        # Of the float32 weights as loaded, before they move: one digest per tower.
        self.digest = tower_digest(
            vision.vision_model,
            vision.visual_projection,
            self.image_size,
            self.image_mean,
            self.image_std,
        )
        self.vision_model = vision.vision_model.to(device, dtype)
        self.visual_projection = vision.visual_projection.to(device, dtype)
        self.embed_dim = int(self.visual_projection.weight.shape[0])
        if text_model is not None:
            self._load_text_model(text_model)
        return self

    def _load_safety_checker(self, ckpt: Checkpoint) -> nn.Module:
        from transformers import CLIPConfig

        # The concept tensors are read as stored (float32, any number of rows) before loading,
        # so that the module is built with the checkpoint's row counts.
        names = set(ckpt.tensor_names())
        self._stored = {
            n: ckpt.read_tensor(n).float() for n in SAFETY_CHECKER_TENSORS if n in names
        }
        config = CLIPConfig.from_dict(ckpt.config)
        config.moderation_tensor_shapes = {n: tuple(t.shape) for n, t in self._stored.items()}
        # Same attention as diffusers' own from_pretrained (SDPA today), so embeddings match a
        # pipeline's checker bit for bit.
        return _from_pretrained(_safety_checker_class(), ckpt, config=config, dtype=torch.float32)

    def _take_text_tower(self, model: nn.Module, ckpt: Checkpoint) -> None:
        """Keep a CLIP text tower in float32 on the device, with the checkpoint's tokenizer."""
        from transformers import CLIPTokenizer

        try:
            self.tokenizer = CLIPTokenizer.from_pretrained(ckpt.source)
        except (OSError, ValueError, TypeError) as exc:
            raise EncoderError(f"model {ckpt.model_id}: cannot load its tokenizer: {exc}") from exc
        # Prompts are encoded once, at compile time: float32 keeps compiled policies the same
        # whether they were compiled by a float16 or a float32 worker.
        self.text_model = model.text_model.to(self.device, torch.float32)
        self.text_projection = model.text_projection.to(self.device, torch.float32)
        # A CLIPModel nests its text settings; a CLIPTextModelWithProjection's config is them.
        text_config = getattr(model.config, "text_config", model.config)
        max_positions = int(text_config.max_position_embeddings)
        self._max_tokens = min(max_positions, int(self.tokenizer.model_max_length))
        self.max_text_tokens = self._max_tokens
        self.text_fingerprint = hashlib.sha256(
            f"{ckpt.fingerprint()}\0float32\0{self.device.type}".encode()
        ).hexdigest()

    def _load_text_model(self, text_model: str | Path) -> None:
        ckpt = Checkpoint.resolve(text_model)
        architectures = ckpt.config.get("architectures") or []
        arch = next((a for a in architectures if a in _TEXT_ARCHITECTURES), None)
        if arch is None:
            raise EncoderError(
                f"text model {ckpt.model_id}: {ckpt.architecture} has no CLIP text tower; "
                f"expected one of {', '.join(_TEXT_ARCHITECTURES)}"
            )
        import transformers

        model = _from_pretrained(getattr(transformers, arch), ckpt, dtype=torch.float32)
        width = int(model.text_projection.weight.shape[0])
        if width != self.embed_dim:
            raise EncoderError(
                f"text model {ckpt.model_id} projects text to {width} dimensions but model "
                f"{self.model_id} projects images to {self.embed_dim}: use the text tower of "
                f"the same CLIP as the vision tower"
            )
        self._take_text_tower(model, ckpt)

    def __repr__(self) -> str:
        return (
            f"ClipEncoder({self.model_id!r}, kind={self.kind!r}, embed_dim={self.embed_dim}, "
            f"device={self.device}, dtype={self.dtype}, text={self.has_text_tower})"
        )

    @property
    def has_text_tower(self) -> bool:
        return self.text_model is not None

    def _no_text_tower(self) -> EncoderError:
        return EncoderError(
            f"model {self.model_id} ({self.kind}) has no text tower, so it cannot embed "
            "prompts: pass text_model= a CLIP checkpoint with a text tower (for the Stable "
            "Diffusion checker, openai/clip-vit-large-patch14), or give the concepts "
            "`embedding:` vectors instead of `prompts:`"
        )

    def encode_text(self, prompts: Sequence[str]) -> Tensor:
        """[N, D] projected text embeddings (not normalised), float32 on the CPU."""
        if not self.has_text_tower:
            raise self._no_text_tower()
        rows = [torch.zeros((0, self.embed_dim))]
        with torch.inference_mode():
            for prompt in prompts:
                # One prompt per forward, unpadded: its embedding then does not depend on which
                # other prompts are encoded with it, so cached and fresh embeddings agree bit for
                # bit (batching changes the float reductions), and short prompts stay cheap.
                tokens = self.tokenizer(
                    [prompt], truncation=True, max_length=self._max_tokens, return_tensors="pt"
                ).to(self.device)
                pooled = self.text_model(
                    input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
                )[1]
                rows.append(self.text_projection(pooled).float().cpu())
        return torch.cat(rows)

    def count_tokens(self, prompts: Sequence[str]) -> list[int]:
        """Tokens each prompt takes untruncated (start and end included): the compiler refuses
        prompts longer than `max_text_tokens`, which `encode_text` would cut off silently."""
        if not self.has_text_tower:
            raise self._no_text_tower()
        ids = self.tokenizer(list(prompts), truncation=False, verbose=False)["input_ids"]
        return [len(row) for row in ids]

    def encode_image(self, pixel_values: Tensor) -> Tensor:
        """[B, 3, S, S] preprocessed pixels -> [B, D] projected embeddings (not normalised)."""
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise EncoderError(
                f"encode_image needs preprocessed pixels [B, 3, {self.image_size}, "
                f"{self.image_size}], not {list(pixel_values.shape)}"
            )
        with torch.inference_mode():
            pixel_values = pixel_values.to(self.device, self.dtype)
            pooled = self.vision_model(pixel_values)[1]  # [B, hidden]
            return self.visual_projection(pooled)  # [B, D]

    def embed_images(self, images: Any, *, value_range: str = "auto") -> Tensor:
        """[B, D] embeddings of images (tensors, arrays, PIL, files or an ImageBatch).

        Conversion and CLIP preprocessing run on the images' own device (a GPU batch never goes
        through the host); only the pixel values move to the encoder's device. Images holding
        NaN/inf come out as NaN rows, so that they fail closed downstream.
        """
        from moderation.image_checks import check_items
        from moderation.images import ImageBatch, clip_preprocess, to_image_batch

        if not isinstance(images, ImageBatch):
            check_items(images, value_range)  # one clear error for what cannot be judged
            images = to_image_batch(images, value_range=value_range)
        pixel_values = clip_preprocess(
            images, size=self.image_size, mean=self.image_mean, std=self.image_std
        )  # [B, 3, S, S]
        return self.encode_image(pixel_values)

    def encode_image_bytes(self, images: Sequence[bytes]) -> Tensor:
        """[N, D] embeddings (float32, CPU) of encoded image files, read as the engine reads an
        image file and preprocessed as one view (CLIP's resize and centre crop).

        An image that cannot be read raises EncoderError with `index` naming it.
        """
        from moderation.image_files import ImageInputError
        from moderation.images import load_image_file

        rows = [torch.zeros((0, self.embed_dim))]
        for start in range(0, len(images), IMAGE_CHUNK):
            pixels = []
            for index in range(start, min(start + IMAGE_CHUNK, len(images))):
                try:
                    pixels.append(load_image_file(io.BytesIO(images[index])))  # [3, H, W]
                except ImageInputError as exc:
                    # The engine's message starts with the file it was given; here the caller
                    # knows the file, so keep only the reason.
                    reason = str(exc).partition(": ")[2] or str(exc)
                    raise EncoderError(reason, index=index) from None
            rows.append(self.embed_images(pixels, value_range="0,1").float().cpu())
        return torch.cat(rows)

    @property
    def model_path(self) -> str:
        """The checkpoint's absolute folder (a local one, or its snapshot in the hub's cache)."""
        return str(self._ckpt.folder.resolve())

    def weights_sha256(self) -> str:
        """sha256 of the checkpoint's weights file (its index for a sharded one)."""
        path, _ = self._ckpt.weights()
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()

    @functools.cached_property
    def image_fingerprint(self) -> str:
        """Identifies this tower's image embeddings: checkpoint, preprocessing, dtype, device type."""
        settings = [self._ckpt.fingerprint(), self.image_size, self.image_mean, self.image_std]
        return hashlib.sha256(
            json.dumps([*settings, str(self.dtype), self.device.type]).encode()
        ).hexdigest()

    def checkpoint_tensor(self, name: str) -> Tensor:
        """A tensor of the checkpoint as stored, in float32 (e.g. a checker's "concept_embeds")."""
        if name not in self._stored:
            names = self._ckpt.tensor_names()
            if name not in names:
                top = [n for n in names if "." not in n]
                listed = ", ".join(top) if top else f"{len(names)} layer weights only"
                raise EncoderError(
                    f"model {self.model_id} has no tensor {name!r}; it has: {listed}"
                )
            self._stored[name] = self._ckpt.read_tensor(name).float()
        return self._stored[name]
