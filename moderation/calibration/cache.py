"""Image embeddings of labelled folders on disk, keyed by model and image hash.

Calibrating again after labelling ten more images should not encode the thousand already seen.
Each entry is one safetensors file holding the [V, D] float32 view embeddings the engine made of
one image, under a key that changes whenever they could differ: the encoder's image fingerprint
(checkpoint, preprocessing, dtype, device type), the policy's `compat` (which decides the views),
and the engine code that makes views. Entries are checked on every read; a file that does not
hold what its name promises is ignored and written again.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from policy.tensor_files import EntryFiles, cache_folder

CACHE_ENV = "MODERATION_EMBEDDING_CACHE_DIR"
_FORMAT = "1"


def default_cache_dir() -> Path:
    """$MODERATION_EMBEDDING_CACHE_DIR, else ~/.cache/moderation/images ($XDG_CACHE_HOME honoured)."""
    return cache_folder(CACHE_ENV, "images")


def _engine_code() -> str:
    """sha256 of the modules that turn an image into views: a change there empties the cache."""
    import moderation.engine
    import moderation.image_files
    import moderation.images
    import moderation.preprocess

    h = hashlib.sha256()
    for module in (
        moderation.image_files,
        moderation.images,
        moderation.preprocess,
        moderation.engine,
    ):
        h.update(Path(module.__file__).read_bytes())
    return h.hexdigest()


def cache_key(image_fingerprint: str, compat: str | None) -> str:
    """The folder name of one model's entries."""
    text = f"{_FORMAT}\0{image_fingerprint}\0{compat}\0{_engine_code()}"
    return hashlib.sha256(text.encode()).hexdigest()


class ImageEmbeddingCache:
    """[V, D] float32 view embeddings stored per (cache key, image sha256)."""

    def __init__(self, folder: str | Path | None = None) -> None:
        self.folder = Path(folder).expanduser() if folder is not None else default_cache_dir()
        self._files = EntryFiles(self.folder, "embedding cache")

    def path(self, key: str, image_sha256: str) -> Path:
        return self.folder / key / f"{image_sha256}.safetensors"

    def get(self, key: str, image_sha256: str, dim: int) -> np.ndarray | None:
        """The stored embeddings, or None when missing or not trustworthy."""
        expected = {"format": _FORMAT, "key": key, "image_sha256": image_sha256}
        return self._files.read(
            self.path(key, image_sha256),
            expected,
            lambda a: a.ndim == 2 and a.shape[0] >= 1 and a.shape[1] == dim,
        )

    def put(self, key: str, image_sha256: str, embedding: np.ndarray) -> None:
        """Store one image's [V, D] embeddings atomically; an unwritable cache is only a warning."""
        meta = {"format": _FORMAT, "key": key, "image_sha256": image_sha256}
        self._files.write(self.path(key, image_sha256), meta, embedding)
