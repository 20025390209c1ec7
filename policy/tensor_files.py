"""One checked, atomically written safetensors file per cache entry (prompt and image caches).

An entry holds one float32 array and metadata naming what it is; a read hands back the array
only when the metadata says exactly that, so a damaged or misplaced file is ignored (and then
written again), and a cache folder that cannot be written costs one warning, never a failure.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

TENSOR = "embedding"

log = logging.getLogger(__name__)


class EntryFiles:
    """Reads and writes the entries of one cache folder; `what` names the cache in warnings."""

    def __init__(self, folder: Path, what: str) -> None:
        self.folder = folder
        self.what = what
        self._warned = False

    def read(
        self, path: Path, expected: dict[str, str], fits: Callable[[np.ndarray], bool]
    ) -> np.ndarray | None:
        """The entry's float32 array, or None when it is missing, unreadable, carries other
        metadata than `expected`, or does not `fit` (shape) or holds a non-finite value."""
        from safetensors import safe_open

        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="numpy") as f:
                meta = f.metadata() or {}
                array = f.get_tensor(TENSOR)
        except Exception as exc:  # safetensors raises several types for damaged files
            log.warning("%s: ignoring unreadable %s (%s)", self.what, path, exc)
            return None
        if (
            any(meta.get(k) != v for k, v in expected.items())
            or array.dtype != np.float32
            or not fits(array)
            or not np.isfinite(array).all()
        ):
            log.warning("%s: ignoring %s (it is not the entry its name says)", self.what, path)
            return None
        return array

    def write(self, path: Path, meta: dict[str, str], array: np.ndarray) -> None:
        """Store one entry atomically (write, then rename: a concurrent reader never sees half an
        entry); an unwritable folder is one warning per cache, and the work goes on."""
        from safetensors.numpy import save

        from policy.atomic import atomic_write

        array = np.ascontiguousarray(array, dtype=np.float32)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, save({TENSOR: array}, metadata=meta))
        except OSError as exc:
            if not self._warned:
                log.warning("%s %s is not writable (%s); continuing", self.what, self.folder, exc)
                self._warned = True
