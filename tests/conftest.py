"""Shared fixtures: tiny checkpoints built in-process (never downloaded)."""

from __future__ import annotations

import os

import pytest

# Tests never reach a model hub; loading code must work from local folders alone.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The CLI turns the libraries' progress bars off before they are imported; in-process CLI tests
# run after other tests imported transformers, so set it here too, before any test imports it
# (test_check_cli checks the real command without it, in a subprocess).
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


@pytest.fixture(autouse=True, scope="session")
def _prompt_cache_in_tmp(tmp_path_factory):
    """Keep the prompt-embedding cache out of the user's ~/.cache during tests."""
    previous = os.environ.get("MODERATION_CACHE_DIR")
    os.environ["MODERATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("prompt-cache"))
    yield
    if previous is None:
        os.environ.pop("MODERATION_CACHE_DIR", None)
    else:
        os.environ["MODERATION_CACHE_DIR"] = previous


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    """A tiny CLIP checkpoint (both towers, tokenizer, image processor) saved with save_pretrained."""
    from moderation.synthetic import make_tiny_clip

    return make_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="session")
def tiny_checker_dir(tmp_path_factory):
    """A tiny StableDiffusionSafetyChecker checkpoint (17 + 3 concepts) in the current key layout."""
    from moderation.synthetic import make_safety_checker

    return make_safety_checker(tmp_path_factory.mktemp("tiny-checker"))


@pytest.fixture(autouse=True, scope="session")
def _embedding_cache_in_tmp(tmp_path_factory):
    """Keep calibrate's image-embedding cache out of the user's ~/.cache during tests."""
    previous = os.environ.get("MODERATION_EMBEDDING_CACHE_DIR")
    os.environ["MODERATION_EMBEDDING_CACHE_DIR"] = str(tmp_path_factory.mktemp("image-cache"))
    yield
    if previous is None:
        os.environ.pop("MODERATION_EMBEDDING_CACHE_DIR", None)
    else:
        os.environ["MODERATION_EMBEDDING_CACHE_DIR"] = previous


@pytest.fixture(autouse=True, scope="session")
def _user_data_in_tmp(tmp_path_factory):
    """Keep held originals' per-user default folder (platformdirs) out of the user's home."""
    previous = os.environ.get("XDG_DATA_HOME")
    os.environ["XDG_DATA_HOME"] = str(tmp_path_factory.mktemp("user-data"))
    yield
    if previous is None:
        os.environ.pop("XDG_DATA_HOME", None)
    else:
        os.environ["XDG_DATA_HOME"] = previous
