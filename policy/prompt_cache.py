"""PromptCache: text-tower embeddings of prompts on disk, one safetensors file per model and prompt.

Encoding thousands of prompts with a ViT-L text tower takes minutes on a CPU; recompiling a policy
after a threshold edit should not. Entries are keyed by the encoder's text fingerprint (model id,
config, weights identity, dtype, device type) and the prompt text, and are checked on every read:
a file that does not hold exactly what its name promises is ignored and written again.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from policy.tensor_files import EntryFiles, cache_folder

if TYPE_CHECKING:
    from policy.encoding import PolicyEncoder

CACHE_ENV = "MODERATION_CACHE_DIR"
_FORMAT = "1"


def default_cache_dir() -> Path:
    """$MODERATION_CACHE_DIR, else ~/.cache/moderation/prompts ($XDG_CACHE_HOME honoured)."""
    return cache_folder(CACHE_ENV, "prompts")


class PromptCache:
    """Projected prompt embeddings ([D] float32) stored per (text fingerprint, prompt)."""

    def __init__(self, folder: str | Path | None = None) -> None:
        self.folder = Path(folder).expanduser() if folder is not None else default_cache_dir()
        self._files = EntryFiles(self.folder, "prompt cache")

    def path(self, fingerprint: str, prompt: str) -> Path:
        name = hashlib.sha256(prompt.encode("utf-8")).hexdigest()
        return self.folder / fingerprint / f"{name}.safetensors"

    def get(self, fingerprint: str, prompt: str, dim: int) -> Tensor | None:
        """The stored [dim] float32 embedding, or None when missing or not trustworthy."""
        expected = {"format": _FORMAT, "fingerprint": fingerprint, "prompt": prompt}
        array = self._files.read(
            self.path(fingerprint, prompt), expected, lambda a: a.shape == (dim,)
        )
        return None if array is None else torch.from_numpy(array)

    def put(self, fingerprint: str, prompt: str, embedding: Tensor) -> None:
        """Store one [D] embedding atomically; a cache that cannot be written is only a warning."""
        meta = {"format": _FORMAT, "fingerprint": fingerprint, "prompt": prompt}
        array = embedding.detach().to("cpu", torch.float32).contiguous().numpy()
        self._files.write(self.path(fingerprint, prompt), meta, array)

    def encode(self, encoder: PolicyEncoder, prompts: Sequence[str]) -> Tensor:
        """[N, D] float32 embeddings of prompts: stored ones read back, the others encoded and stored."""
        fingerprint = encoder.text_fingerprint
        if fingerprint is None:  # no text tower: let the encoder say so
            return encoder.encode_text(prompts)
        found = [self.get(fingerprint, p, encoder.embed_dim) for p in prompts]
        missing = [i for i, e in enumerate(found) if e is None]
        if missing:
            fresh = encoder.encode_text([prompts[i] for i in missing])  # [M, D]
            for i, embedding in zip(missing, fresh, strict=True):
                self.put(fingerprint, prompts[i], embedding)
                found[i] = embedding
        rows = [e for e in found if e is not None]
        return torch.stack(rows) if rows else torch.zeros((0, encoder.embed_dim))
