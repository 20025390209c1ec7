"""Arrays in binary columns: the log stores per-concept numbers, embeddings and view indexes as
little-endian bytes of one dtype; this is the one place that writes and reads them."""

from __future__ import annotations

import numpy as np

from moderation.storage.errors import StorageError

F32 = np.dtype("<f4")  # cosines, scores
F16 = np.dtype("<f2")  # embeddings
I16 = np.dtype("<i2")  # view indexes


def encode_array(
    values: np.ndarray | None, dtype: np.dtype, what: str, *, ndim: int = 1
) -> bytes | None:
    """A 1-D (or, with ndim=2, [rows, width]) array as little-endian bytes of `dtype`."""
    if values is None:
        return None
    array = np.asarray(values)
    if array.ndim not in range(1, ndim + 1):
        shape = "a 1-D array" if ndim == 1 else "a 1-D or 2-D array"
        raise StorageError(f"{what} must be {shape}, got shape {tuple(array.shape)}")
    return array.astype(dtype, copy=False).tobytes()


def decode_array(data: bytes | None, dtype: np.dtype = F32) -> np.ndarray | None:
    """Bytes from a binary column back to a (writable) 1-D array."""
    if data is None:
        return None
    return np.frombuffer(data, dtype=dtype).copy()


def decode_rows(blobs: list[bytes], dtype: np.dtype, width: int, what: str) -> np.ndarray:
    """[n, width] (read-only) from n blobs of `width` values each: one join, one frombuffer,
    for a chunk of logged rows. StorageError when they do not hold `width` values each."""
    data = b"".join(blobs)
    if len(data) != len(blobs) * width * dtype.itemsize:
        raise StorageError(f"logged {what} do not fit their policy ({width} values each)")
    return np.frombuffer(data, dtype=dtype).reshape(len(blobs), width)
