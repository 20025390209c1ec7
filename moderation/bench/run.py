"""`moderation bench`: run the requested sections and collect one JSON-able result."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import torch

from moderation.bench.config import SCHEMA_VERSION, BenchConfig, environment, load_average
from moderation.bench.models import resolve_device, resolve_dtype


def run_bench(config: BenchConfig, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run every requested section and return the JSON-able result (see BENCHMARKS.md)."""
    from moderation.bench.models import attention_of, load_models
    from moderation.bench.report import evaluate_targets

    config.check()
    say = progress or (lambda _message: None)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    torch.manual_seed(config.seed)
    result: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "environment": environment(device, dtype),
        "config": {**dataclasses.asdict(config), "device": str(device)},
        "model": None,
        "forward": [],
        "end_to_end": [],
        "concepts": [],
        "logging": [],
        "views": [],
        "shadow": [],
        "backtest": [],
        "pipelines": [],
    }
    started = time.perf_counter()
    needs_model = config.model is not None or {"e2e", "logging", "views", "pipelines"} & set(
        config.sections
    )
    models = None
    if needs_model:
        say(f"loading models ({config.model or config.size}) on {device} in {dtype}")
        models = load_models(
            model=config.model,
            size=config.size,
            device=device,
            dtype=dtype,
            attention=config.attention,
            compile=config.compile,
            seed=config.seed,
        )
        result["model"] = {
            "id": models.model_id,
            "description": models.description,
            "embed_dim": models.encoder.embed_dim,
            "image_size": models.encoder.image_size,
            "ours_attention": attention_of(models.encoder.vision_model),
            "diffusers_attention": attention_of(models.checker.vision_model),
            "compiled": models.compiled,
            "feature_extractor": type(models.feature_extractor).__name__,
        }
    with torch.inference_mode():
        if "e2e" in config.sections:
            from moderation.bench.sections import run_end_to_end

            result["forward"], result["end_to_end"] = run_end_to_end(
                models, config, device, dtype, say
            )
        if "concepts" in config.sections:
            from moderation.bench.sections import run_concepts

            dim = models.encoder.embed_dim if models else _default_dim(config)
            result["concepts"] = run_concepts(config, device, dtype, dim, result["forward"], say)
        if "views" in config.sections:
            from moderation.bench.views import run_views

            result["views"] = run_views(models, config, device, dtype, say)
        if "shadow" in config.sections:
            from moderation.bench.shadow import run_shadow

            dim = models.encoder.embed_dim if models else _default_dim(config)
            result["shadow"] = run_shadow(config, device, dtype, dim, say)
        if "pipelines" in config.sections:
            from moderation.bench.pipelines import run_pipelines

            result["pipelines"] = run_pipelines(models, config, device, say)
    if "logging" in config.sections:
        from moderation.bench.log_throughput import run_logging

        result["logging"] = run_logging(models.policy, config, say)
    if "backtest" in config.sections:
        from moderation.bench.backtest import run_backtest

        result["backtest"] = run_backtest(config, say)
    result["environment"]["load_average_end"] = load_average()
    result["targets"] = evaluate_targets(result)
    result["seconds"] = time.perf_counter() - started
    return result


def _default_dim(config: BenchConfig) -> int:
    """Embedding width when no model was loaded: the random model's projection."""
    from moderation.synthetic import TINY_PROJECTION, VIT_L14_PROJECTION

    return VIT_L14_PROJECTION if config.size == "vit-l" else TINY_PROJECTION
