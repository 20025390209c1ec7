"""Section h of `moderation bench`: what `moderate_pipeline` adds to a pipeline's wall time.

A tiny SDXL-shaped pipeline (2 images, 64x64) and a tiny text-to-video pipeline (1 video of
8 frames, 64x64), random weights, 2 steps, `output_type="pil"`: the bare pipeline and the same
pipeline wrapped, timed in interleaved rounds. The wrapped call's extra time is split into the
encoder (the policy's CLIP tower, timed inside the call), the output conversion (tensor to PIL,
which the wrapper does instead of the pipeline, so most of it is not extra) and the rest (extra
minus encoder: views, scoring, decisions, actions, the pipeline's "pt" path). On a busy machine
a difference of two medians is noisy, so the wrapper's own judging time is also timed directly
inside each call ("own": moderation minus encoder); the target (own under 5% of the bare
pipeline) is judged on it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from moderation.bench.config import measure_interleaved, synchronize
from moderation.bench.tables import ms, table

if TYPE_CHECKING:
    from moderation.bench.config import BenchConfig
    from moderation.bench.models import BenchModels

OVERHEAD_MAX_PCT = 5.0  # the wrapper's own time, encoder excluded, vs the bare pipeline


class _TimedEncoder:
    """The bench model's encoder, with the time of every encode_image call added up."""

    def __init__(self, encoder: Any, device: torch.device) -> None:
        self._encoder, self._device, self.seconds = encoder, device, 0.0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._encoder, name)

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        synchronize(self._device)
        start = time.perf_counter()
        out = self._encoder.encode_image(pixel_values)
        synchronize(self._device)
        self.seconds += time.perf_counter() - start
        return out


def run_pipelines(
    models: BenchModels,
    config: BenchConfig,
    device: torch.device,
    say: Callable[[str], None],
) -> list[dict[str, Any]]:
    """Rows of section h, one per pipeline."""
    from moderation.bench.tiny_pipelines import sdxl_pipeline, text_to_video_pipeline

    cases = [
        ("tiny SDXL-shaped", "2 images 64x64", sdxl_pipeline(size=64, images=2)),
        ("tiny text-to-video", "1 video, 8 frames 64x64", text_to_video_pipeline(64, 8, 1)),
    ]
    return [
        _row(name, shape, pipe, inputs, models, config, device, say)
        for name, shape, (pipe, inputs) in cases
    ]


def _row(name, shape, pipe, inputs, models, config, device, say) -> dict[str, Any]:
    from moderation.engine import Moderator
    from moderation.integrations.diffusers import moderate_pipeline

    say(f"pipelines: {name}, {shape}")
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    encoder = _TimedEncoder(models.encoder, device)
    moderated = moderate_pipeline(pipe, Moderator(models.policy, encoder))
    parts: dict[str, list[float]] = {"encoder": [], "conversion": [], "moderation": [], "own": []}

    def call(target: Any) -> Callable[[Any], Any]:
        def run(_: Any) -> Any:
            generator = torch.Generator().manual_seed(config.seed)
            return target(**inputs, generator=generator, output_type="pil")

        return run

    def wrapped(arg: Any) -> Any:
        encoder.seconds = 0.0
        out = call(moderated)(arg)
        parts["encoder"].append(encoder.seconds * 1000)
        parts["conversion"].append(moderated.last_timings["conversion"] * 1000)
        parts["moderation"].append(moderated.last_timings["moderation"] * 1000)
        parts["own"].append(parts["moderation"][-1] - parts["encoder"][-1])
        return out

    timings, _ = measure_interleaved(
        {"bare": (call(pipe), None), "wrapped": (wrapped, None)},
        device=device,
        repeats=config.repeats,
        warmup=max(config.warmup, 1),  # the first call of each builds kernels and caches
        min_seconds=config.fast_seconds,
    )
    timed = len(timings["wrapped"].samples_ms)
    median = {k: statistics.median(v[-timed:]) for k, v in parts.items()}
    bare, ours = timings["bare"].median_ms, timings["wrapped"].median_ms
    extra = ours - bare
    return {
        "pipeline": name,
        "shape": shape,
        "device": str(device),
        "bare_ms": bare,
        "wrapped_ms": ours,
        "extra_ms": extra,
        "encoder_ms": median["encoder"],
        "conversion_ms": median["conversion"],
        "rest_ms": extra - median["encoder"],
        "moderation_ms": median["moderation"],
        "own_ms": median["own"],  # the median of each call's own time
        "rest_pct": 100 * (extra - median["encoder"]) / bare,
        "overhead_pct": 100 * median["own"] / bare,
        "rounds": timed,
        "timing": {name: t.to_dict() for name, t in timings.items()},
    }


def pipelines_table(rows: list[dict[str, Any]]) -> str:
    """Section h as printed."""
    title = (
        f"h. moderate_pipeline: extra wall time over the bare pipeline (output_type='pil', "
        f"2 steps, random weights, on {rows[0]['device']}); medians of "
        f"{rows[0]['rounds']} interleaved rounds. 'conversion': tensor to PIL, done by the "
        "wrapper instead of the pipeline; 'rest': extra minus the encoder; 'own': the wrapper's "
        "judging minus the encoder, timed inside each call"
    )
    body = [
        (
            r["pipeline"],
            r["shape"],
            ms(r["bare_ms"]),
            ms(r["wrapped_ms"]),
            ms(r["extra_ms"]),
            ms(r["encoder_ms"]),
            ms(r["conversion_ms"]),
            ms(r["rest_ms"]),
            f"{r['rest_pct']:+.1f}%",
            ms(r["own_ms"]),
            f"{r['overhead_pct']:+.2f}%",
        )
        for r in rows
    ]
    headers = (
        "pipeline",
        "outputs",
        "bare",
        "wrapped",
        "extra",
        "encoder",
        "conversion",
        "rest",
        "rest / bare",
        "own",
        "own / bare",
    )
    return title + "\n" + table(headers, body)


def pipelines_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "target": f"moderate_pipeline, {r['pipeline']}: its own judging, encoder excluded, "
            f"<= {OVERHEAD_MAX_PCT:.0f}% of the bare pipeline",
            "measured": f"{r['overhead_pct']:.2f}%",
            "met": r["overhead_pct"] <= OVERHEAD_MAX_PCT,
        }
        for r in rows
    ]
