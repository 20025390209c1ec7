"""Raw concept embeddings: inline lists, or rows of .safetensors / .npy files in the policy's folder.

One `EmbeddingFiles` reads every embedding of a policy: each file is checked, opened and indexed
once, however many concepts refer to it (a policy of 100,000 rows of one file would otherwise open
it 100,000 times). Files must stay inside the policy's folder (symlinks are followed first).
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from policy.paths import PathOutside, resolve_inside
from policy.schema import EmbeddingRef

# Rows of one safetensors tensor read one by one before the whole tensor is read at once: a few
# rows of a large file stay cheap, and 100,000 rows cost one read instead of 100,000 slices.
WHOLE_TENSOR_AFTER = 64


class EmbeddingProblem(Exception):
    """Why an embedding could not be read; `subpath` is the key under `embedding` at fault."""

    def __init__(self, message: str, *subpath: str) -> None:
        super().__init__(message)
        self.message, self.subpath = message, subpath


def float32(values: Any) -> np.ndarray:
    """A float32 copy; values too large for float32 become inf, reported as not finite."""
    if isinstance(values, np.ndarray) and values.dtype == np.float32:
        return values.copy()
    with np.errstate(over="ignore"):
        return np.array(values, dtype=np.float32)


def _pick_row(shape: tuple[int, ...], row: int | None, what: str) -> int | None:
    """Index of the wanted row of a 2-D array, None for a 1-D one."""
    if len(shape) == 1:
        if row is not None:
            raise EmbeddingProblem(f"{what} is 1-D, so it has no row {row}", "row")
        return None
    if len(shape) != 2:
        raise EmbeddingProblem(f"{what} has shape {tuple(shape)}; expected 1-D or 2-D")
    if row is None:
        if shape[0] == 1:
            return 0
        raise EmbeddingProblem(f"{what} has {shape[0]} rows; say which with 'row'")
    if row >= shape[0]:
        raise EmbeddingProblem(f"row {row} is out of range: {what} has {shape[0]} rows", "row")
    return row


class EmbeddingFiles:
    """Reads embeddings for one policy folder; use as a context manager (files stay open in it)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._root = folder.resolve()
        self._stack = ExitStack()
        # Every cache holds a result or the EmbeddingProblem to raise again: a bad file is
        # reported for each concept that names it, and looked at once.
        self._paths: dict[str, Path | EmbeddingProblem] = {}
        self._npy: dict[Path, np.ndarray | EmbeddingProblem] = {}
        self._safetensors: dict[Path, tuple[Any, list[str]] | EmbeddingProblem] = {}
        self._slices: dict[tuple[Path, str], Any] = {}

    def __enter__(self) -> EmbeddingFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def read(self, embedding: list[float] | EmbeddingRef) -> np.ndarray:
        """The raw embedding as float32 [D], from the policy or a file inside its folder."""
        if isinstance(embedding, list):
            return float32(embedding)
        path = _cached(self._paths, embedding.file, self._inside)
        suffix = path.suffix.lower()
        if suffix == ".npy":
            if embedding.tensor is not None:
                raise EmbeddingProblem("'tensor' applies only to .safetensors files", "tensor")
            array = _cached(self._npy, path, lambda p: self._open_npy(p, embedding.file))
            index = _pick_row(array.shape, embedding.row, f"'{embedding.file}'")
            vector = float32(array if index is None else array[index])
        elif suffix == ".safetensors":
            vector = self._read_safetensors(path, embedding)
        else:
            message = f"'{embedding.file}' is not a .safetensors or .npy file"
            raise EmbeddingProblem(message, "file")
        if vector.size == 0:
            raise EmbeddingProblem("embedding has no values")
        return vector

    def _inside(self, name: str) -> Path:
        """The file `name` relative to the policy's folder, refusing anything leading out of it."""
        try:
            found = resolve_inside(self.folder, name, root=self._root)
        except PathOutside as exc:
            raise EmbeddingProblem(str(exc), "file") from None
        if not found.is_file:
            raise EmbeddingProblem(f"file '{name}' not found", "file")
        return found.path

    @staticmethod
    def _open_npy(path: Path, name: str) -> np.ndarray:
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise EmbeddingProblem(f"cannot read '{name}': {exc}", "file") from None
        if not isinstance(array, np.ndarray):  # a .npz archive under a .npy name
            array.close()
            raise EmbeddingProblem(f"'{name}' is not a .npy array", "file")
        if array.dtype.kind not in "fiu":
            raise EmbeddingProblem(f"'{name}' holds {array.dtype} values, not numbers", "file")
        return array

    def _open_safetensors(self, path: Path, name: str) -> tuple[Any, list[str]]:
        from safetensors import safe_open

        try:
            handle = self._stack.enter_context(safe_open(path, framework="numpy"))
            return handle, list(handle.keys())
        except Exception as exc:  # safetensors reports bad headers with its own types
            raise EmbeddingProblem(f"cannot read '{name}': {exc}", "file") from None

    def _read_safetensors(self, path: Path, ref: EmbeddingRef) -> np.ndarray:
        handle, names = _cached(
            self._safetensors, path, lambda p: self._open_safetensors(p, ref.file)
        )
        tensor = ref.tensor
        if tensor is None and len(names) != 1:
            message = f"'{ref.file}' holds {len(names)} tensors ({', '.join(names)}); say which with 'tensor'"
            raise EmbeddingProblem(message)
        if tensor is not None and tensor not in names:
            message = f"tensor '{tensor}' not found in '{ref.file}' (it has: {', '.join(names)})"
            raise EmbeddingProblem(message, "tensor")
        tensor = tensor or names[0]
        try:
            key = (path, tensor)
            if key not in self._slices:
                view = handle.get_slice(tensor)  # reads only the rows asked for
                self._slices[key] = [view, tuple(view.get_shape()), 0]
            entry = self._slices[key]
            view, shape, reads = entry
            index = _pick_row(shape, ref.row, f"tensor '{tensor}'")
            if index is None:
                return float32(view[:])
            if reads == WHOLE_TENSOR_AFTER:  # many rows of one tensor: read it all, once
                entry[0] = view = float32(view[:])
            entry[2] = reads + 1
            vector = view[index]
        except EmbeddingProblem:
            raise
        except Exception as exc:  # safetensors reports bad dtypes with its own types
            raise EmbeddingProblem(f"cannot read '{ref.file}': {exc}", "file") from None
        return float32(vector)


def _cached(cache: dict, key: Any, make) -> Any:
    """cache[key], made once; a problem making it is cached and raised every time."""
    if key not in cache:
        try:
            cache[key] = make(key)
        except EmbeddingProblem as problem:
            cache[key] = problem
    found = cache[key]
    if isinstance(found, EmbeddingProblem):
        raise EmbeddingProblem(found.message, *found.subpath)
    return found
