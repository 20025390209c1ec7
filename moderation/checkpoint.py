"""Checkpoint: where a model's files are (a folder, a pipeline folder, a weight file or a hub id)
and its tensors, read as stored without loading the model.

The one reader of weight files: the encoder loads models through it, and the safety-checker
import reads the checker's concept tensors with it. Weights are data, never code: safetensors, or
PyTorch files with `weights_only=True`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from moderation.errors import EncoderError

# Weight files a transformers/diffusers checkpoint folder may hold, in order of preference.
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def looks_like_path(model: str) -> bool:
    """True for strings that can only be a folder, never a hub id like `org/name`."""
    return model.startswith((".", "/", "~", "\\")) or model.count("/") > 1 or "\\" in model


class Checkpoint:
    """One checkpoint's files: a local folder or a snapshot of the Hugging Face cache."""

    def __init__(
        self,
        model_id: str,
        folder: Path,
        local: bool,
        config: dict,
        weights_file: Path | None = None,
        *,
        cache_only: bool = False,
    ) -> None:
        self.model_id = model_id
        self.folder = folder  # holds config.json (a cache snapshot for hub ids)
        self.local = local
        self.config = config  # {} for a bare weight file
        # A hub id read from the cache without the hub (offline, or the hub cannot be reached):
        # its files are read from the snapshot folder, so nothing tries the network again.
        self.cache_only = cache_only
        self._weights_file = weights_file  # set when the caller named the file itself
        self._bin: dict[Path, dict[str, Tensor]] = {}

    @property
    def source(self) -> str:
        """What to hand to `from_pretrained`: the folder, or the hub id (so the cache is used)."""
        return str(self.folder) if self.local or self.cache_only else self.model_id

    @property
    def architecture(self) -> str:
        return ",".join(self.config.get("architectures") or []) or "no architectures"

    @classmethod
    def resolve(cls, model: str | Path, *, weights_only: bool = False) -> Checkpoint:
        """Find a checkpoint: a folder with config.json (or a pipeline folder: its safety_checker),
        or a hub id (from the cache, or the hub when online). With `weights_only`, a weight file
        or a folder without config.json is accepted too (its tensors can be read, not loaded)."""
        model_id = str(model)
        path = Path(model_id).expanduser()
        if weights_only and path.is_file():
            return cls(model_id, path.parent, True, {}, weights_file=path)
        if path.is_dir():
            if not (path / "config.json").exists() and (path / "model_index.json").exists():
                path = path / "safety_checker"  # a diffusers pipeline folder: use its checker
            config_file = path / "config.json"
            if not config_file.is_file():
                if weights_only:
                    # A checker folder without its config, or a pipeline folder without an index.
                    nested = path / "safety_checker"
                    found = any((path / n).is_file() for n in WEIGHT_FILES)
                    return cls(model_id, path if found or not nested.is_dir() else nested, True, {})
                raise EncoderError(f"model {model_id}: {config_file} not found (not a checkpoint)")
            return cls(model_id, path, True, _read_config(model_id, config_file))
        if isinstance(model, Path) or looks_like_path(model_id):
            what = "file or folder" if weights_only else "folder"
            raise EncoderError(f"model {model_id}: no such {what}")
        return cls._from_hub(model_id)

    @classmethod
    def _from_hub(cls, model_id: str) -> Checkpoint:
        """A hub id: the offline state is known up front, so no lookup waits on retries.

        Offline (HF_HUB_OFFLINE) or with the hub unreachable, only the cache is read, and a model
        that is not there fails at once; otherwise transformers looks it up on the hub as usual.
        """
        from huggingface_hub import constants, try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(model_id, "config.json")
        except ValueError as exc:  # HFValidationError: not of the form name or org/name
            raise EncoderError(
                f"model {model_id}: not a local folder, and not a Hugging Face hub id ({exc})"
            ) from None
        cached_config = Path(cached) if isinstance(cached, str) else None
        where = f"not a local folder, and not in the Hugging Face cache ({constants.HF_HUB_CACHE})"
        local_copy = "or pass --model FOLDER with a local copy of the checkpoint"
        if _offline_mode():
            if cached_config is None:
                raise EncoderError(
                    f"model {model_id}: {where}; HF_HUB_OFFLINE is set, so it cannot be "
                    f"downloaded: download it once with HF_HUB_OFFLINE unset, {local_copy}"
                )
            return cls._from_cache(model_id, cached_config)
        unreachable = hub_unreachable()
        if unreachable is not None:
            if cached_config is None:
                raise EncoderError(
                    f"model {model_id}: {where}, and the hub ({constants.ENDPOINT}) cannot be "
                    f"reached ({unreachable}): connect to the network, {local_copy} "
                    "(HF_HUB_OFFLINE=1 uses the cache without trying the network)"
                )
            return cls._from_cache(model_id, cached_config)
        from transformers.utils import cached_file

        try:
            config_file = Path(cached_file(model_id, "config.json"))
        except (OSError, ValueError) as exc:
            raise EncoderError(
                f"model {model_id}: not a local folder, and not found on the Hugging Face hub "
                f"or in its cache: {exc}"
            ) from exc
        return cls(model_id, config_file.parent, False, _read_config(model_id, config_file))

    @classmethod
    def _from_cache(cls, model_id: str, config_file: Path) -> Checkpoint:
        config = _read_config(model_id, config_file)
        return cls(model_id, config_file.parent, False, config, cache_only=True)

    def file(self, name: str) -> Path | None:
        """A file of the checkpoint, or None when it has none by that name."""
        if self.local or self.cache_only:
            path = self.folder / name
            return path if path.is_file() else None
        from transformers.utils import cached_file

        found = cached_file(
            self.model_id,
            name,
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
        )
        return Path(found) if found else None

    def fingerprint(self) -> str:
        """sha256 of the model id, config and weights identity: changes when the checkpoint does."""
        h = hashlib.sha256()
        h.update(json.dumps([self.model_id, self.config], sort_keys=True).encode())
        if self.local:
            # Size, mtime and name: rewriting any file (weights, tokenizer) gives a new fingerprint
            # without hashing gigabytes.
            for path in sorted(p for p in self.folder.iterdir() if p.is_file()):
                stat = path.stat()
                h.update(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        else:
            h.update(str(self.folder).encode())  # .../snapshots/<commit>: one revision
        return h.hexdigest()

    # -- tensors as stored -------------------------------------------------------------------

    def weights(self) -> tuple[Path, dict[str, str] | None]:
        """The weights file, and for a sharded checkpoint its index (tensor name -> shard file)."""
        if self._weights_file is not None:
            candidates = [(self._weights_file.name, self._weights_file)]
        else:
            candidates = [(name, self.file(name)) for name in WEIGHT_FILES]
        for name, path in candidates:
            if path is None:
                continue
            if name.endswith(".index.json"):
                try:
                    return path, dict(json.loads(path.read_text(encoding="utf-8"))["weight_map"])
                except (OSError, ValueError, KeyError, TypeError) as exc:
                    raise EncoderError(f"{path}: not a readable weight index: {exc}") from exc
            return path, None
        raise EncoderError(
            f"model {self.model_id}: no weights file ({', '.join(WEIGHT_FILES)}) in {self.folder}"
        )

    def tensor_names(self) -> list[str]:
        """Every tensor name of the checkpoint (from the index of a sharded one)."""
        path, index = self.weights()
        if index is not None:
            return list(index)
        if path.suffix == ".safetensors":
            return list(self._safetensors_keys(path))
        return [k for k in self._load_bin(path) if isinstance(k, str)]

    def find_tensor(self, name: str) -> str | None:
        """The stored key of tensor `name`: the name itself, else a unique `<prefix>.<name>`."""
        keys = self.tensor_names()
        if name in keys:
            return name
        matches = [k for k in keys if k.endswith("." + name)]
        return matches[0] if len(matches) == 1 else None

    def read_tensor(self, name: str) -> Tensor:
        """One tensor exactly as stored (dtype and shape of the file)."""
        path, index = self.weights()
        if index is not None:
            shard = self.file(index[name])
            if shard is None or not shard.is_file():
                raise EncoderError(f"model {self.model_id}: shard {index[name]} is missing")
            path = shard
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            try:
                with safe_open(str(path), framework="pt", device="cpu") as f:
                    return f.get_tensor(name)
            except Exception as exc:  # safetensors raises several types for unreadable files
                raise EncoderError(f"{path}: cannot read safetensors: {exc}") from exc
        return self._load_bin(path)[name]

    def _safetensors_keys(self, path: Path) -> list[str]:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                return list(f.keys())
        except Exception as exc:  # safetensors raises several types for unreadable files
            raise EncoderError(f"{path}: cannot read safetensors: {exc}") from exc

    def _load_bin(self, path: Path) -> dict[str, Tensor]:
        if path not in self._bin:
            self._bin[path] = _load_torch(path)
        return self._bin[path]


# Knob: how long the one reachability check of the hub may take. A missing DNS entry or a
# refused connection fail at once; this bounds a network that silently drops packets.
HUB_PROBE_TIMEOUT_S = 2.0


def _offline_mode() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it (is_offline_mode() where it has one)."""
    import huggingface_hub
    from huggingface_hub import constants

    is_offline = getattr(huggingface_hub, "is_offline_mode", None)
    return bool(is_offline() if is_offline is not None else constants.HF_HUB_OFFLINE)


def hub_unreachable() -> str | None:
    """None when the Hugging Face hub answers (any HTTP status), else why it cannot be reached.

    One request, no retries, through huggingface_hub's own session (its proxies and HF_ENDPOINT).
    """
    from huggingface_hub import constants, get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=HUB_PROBE_TIMEOUT_S)
    except Exception as exc:  # httpx/requests transport errors of several types
        return str(exc).strip() or type(exc).__name__
    return None


def read_json(model_id: str, path: Path) -> Any:
    """A JSON file of a model's folder (config, preprocessor config); EncoderError naming the
    model and the file when it cannot be read or parsed."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise EncoderError(f"model {model_id}: cannot read {path}: {exc}") from exc


def _read_config(model_id: str, config_file: Path) -> dict:
    config = read_json(model_id, config_file)
    if not isinstance(config, dict):
        raise EncoderError(f"model {model_id}: {config_file} does not hold a JSON object")
    return config


def _load_torch(path: Path) -> dict[str, Tensor]:
    """A PyTorch weight file, loaded with weights_only (no arbitrary pickles); mmap when it can."""
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # old (non-zip) serialisation cannot be memory-mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types
        raise EncoderError(f"{path}: cannot read PyTorch weights safely: {exc}") from exc
    if not isinstance(state, dict):
        raise EncoderError(f"{path}: holds a {type(state).__name__}, not a state dict")
    return state
