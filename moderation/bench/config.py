"""`moderation bench` settings and measuring tools: what to run, medians of synchronised repeats,
host-sync counts and the environment a result came from.

The benchmark itself: our GPU-resident moderation path measured against diffusers' safety checker.

One run, one device, one set of weights:
  a. the bare vision forward on ready pixel values (the floor);
  b. end to end from the VAE's decoded [B,3,512,512] tensor in [-1,1]: diffusers' path as its
     pipeline runs it (tensor -> PIL -> CLIPImageProcessor -> checker) against our Moderator;
  c. the work after the encoder for N concepts: diffusers' loops against score + decide;
  d. decision logging throughput through BackgroundDecisionLog to SQLite and PostgreSQL;
  e. what full coverage costs: views and ms per image of `views: center|cover|tiles` at 1:1,
     2:3 and 9:16;
  f. what shadow candidates add to the post-encoder work of a batch (moderation.bench.shadow).
  g. `policy backtest` throughput and peak memory over large logs in SQLite and PostgreSQL.
  h. what `moderate_pipeline` adds to tiny pipelines' wall time (moderation.bench.pipelines).
Times are medians of repeats after warm-up, with the device synchronised around each one.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from moderation.bench.models import BenchError
from policy.vocabulary import VIEWS

SCHEMA_VERSION = 1
SECTIONS = ("e2e", "concepts", "logging", "views", "shadow", "backtest", "pipelines")
# What a bare `moderation bench` runs: section g (backtest) fills a million-row log per
# database (minutes), so it runs when asked for (`--sections backtest`).
DEFAULT_SECTIONS = ("e2e", "concepts", "logging", "views", "shadow")
# Knob: a fast call (section c, our steps) is repeated until `fast_seconds` were timed, at most
# this many times; slow calls just `repeats` times.
MAX_REPEATS = 200


@dataclass
class BenchConfig:
    """What to measure; `quick()` gives small sizes for tests and CPUs."""

    model: str | None = None  # None: random weights built in-process
    device: str | None = None  # default: cuda when available, else cpu
    dtype: str | None = None  # default: float16 on cuda, float32 on cpu
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    concepts: tuple[int, ...] = (17, 1_000, 10_000, 100_000)
    concept_batch: int = 8
    repeats: int = 5
    e2e_repeats: int | None = None  # repeats of the forward/end-to-end rows (default: repeats)
    e2e_seconds: float = 0.0  # ...and more rounds while a batch size has taken less than this
    warmup: int = 1  # warm-up iterations per path and batch size
    db_urls: tuple[str, ...] = ("sqlite",)  # "sqlite": a temporary file
    decisions: int = 20_000
    write_size: int = 8  # decisions per write(): one moderated batch
    attention: str = "sdpa"  # our tower's; diffusers' checker keeps what from_pretrained picks
    compile: bool = False
    sections: tuple[str, ...] = DEFAULT_SECTIONS
    size: str = "vit-l"  # widths of the random model: "vit-l" or "tiny" (tests)
    loop_budget: int = 200_000  # images x concepts of diffusers' loops timed before scaling
    fast_seconds: float = 1.0  # fast calls repeat until this much was timed (noise on busy CPUs)
    views_batch: int = 2  # images per call of section e
    view_modes: tuple[str, ...] = ("center", "cover", "tiles")  # timed in section e
    shadow_batch: int = 8  # images per batch of section f
    shadow_candidates: tuple[int, ...] = (3,)  # candidate counts timed in section f
    shadow_image_side: int = 512  # Stable Diffusion's output
    shadow_seconds: float = 5.0  # section f rows repeat until this much was timed (or 200 rounds)
    backtest_sizes: tuple[int, ...] = (100_000, 1_000_000)  # logged decisions (section g)
    backtest_dim: int = 768  # width of section g's float16 embeddings (ViT-L/14)
    backtest_chunk: int | None = None  # decisions per query (default: the backtest's own)
    seed: int = 0

    @classmethod
    def quick(cls, **overrides: Any) -> BenchConfig:
        """Batch 1, two repeats, small counts: about 3 minutes on 2 CPU cores (ViT-L/14 widths).

        On a CPU one ViT-L/14 image takes seconds through a tower and every end-to-end round
        runs four tower paths, so the rows are what costs: with the earlier quick sizes, batch 4
        (a warm-up round and two repeats) took about 7 of the 13 minutes measured on a shared
        2-core machine. No warm-up: the first call of every path, at batch 1, happens before any
        row is timed.
        """
        base = {
            "batch_sizes": (1,),
            "concepts": (17, 1_000, 10_000),
            "concept_batch": 4,
            "repeats": 2,
            "warmup": 0,
            "decisions": 2_000,
            "loop_budget": 20_000,
            "fast_seconds": 0.1,
            "views_batch": 1,
            "view_modes": ("center", "cover"),  # tiles: 10-23 views an image, counted only
            "shadow_seconds": 1.0,
            "backtest_sizes": (20_000,),
        }
        return cls(**{**base, **overrides})

    def check(self) -> None:
        """Reject settings the bench cannot run, with a message naming the option."""
        for name, values in (
            ("--batch-sizes", self.batch_sizes),
            ("--concepts", self.concepts),
            ("--backtest-sizes", self.backtest_sizes),
        ):
            if not values or any(v < 1 for v in values):
                raise BenchError(f"{name}: expected positive integers, got {list(values)}")
        if self.repeats < 1 or (self.e2e_repeats is not None and self.e2e_repeats < 1):
            raise BenchError("--repeats: expected at least 1")
        if self.e2e_seconds < 0 or self.fast_seconds < 0:
            raise BenchError("--e2e-seconds: expected a non-negative number of seconds")
        if self.views_batch < 1 or not set(self.view_modes) <= set(VIEWS):
            raise BenchError(
                "views: expected a positive batch and modes among center, cover, tiles"
            )
        if (
            self.shadow_batch < 1
            or self.shadow_image_side < 1
            or not self.shadow_candidates
            or any(c < 1 for c in self.shadow_candidates)
        ):
            raise BenchError("shadow: expected a positive batch, image side and candidate counts")
        if self.warmup < 0 or self.decisions < 1 or self.write_size < 1 or self.concept_batch < 1:
            raise BenchError("--warmup, --decisions and batch sizes must be positive")
        unknown = set(self.sections) - set(SECTIONS)
        if unknown:
            raise BenchError(
                f"--sections: unknown {', '.join(sorted(unknown))} (choose from {', '.join(SECTIONS)})"
            )


@dataclass
class Timing:
    """Milliseconds of the repeats of one measurement."""

    samples_ms: list[float] = field(default_factory=list)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples_ms)

    def to_dict(self) -> dict[str, Any]:
        return {
            "median_ms": self.median_ms,
            "min_ms": min(self.samples_ms),
            "max_ms": max(self.samples_ms),
            "repeats": len(self.samples_ms),
        }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    fn: Callable[[Any], Any],
    *,
    device: torch.device,
    repeats: int,
    warmup: int,
    setup: Callable[[], Any] | None = None,
    min_seconds: float = 0.0,
) -> tuple[Timing, Any]:
    """Time fn(setup()) `repeats` times after `warmup` calls; setup is not timed.

    With min_seconds, a fast call is repeated until that much time was spent timing it (up to
    MAX_REPEATS), so a median of milliseconds is not at the mercy of a busy machine.
    """
    timings, results = measure_interleaved(
        {"fn": (fn, setup)},
        device=device,
        repeats=repeats,
        warmup=warmup,
        min_seconds=min_seconds,
    )
    return timings["fn"], results.get("fn")


def measure_interleaved(
    calls: dict[str, tuple[Callable[[Any], Any], Callable[[], Any] | None]],
    *,
    device: torch.device,
    repeats: int,
    warmup: int,
    min_seconds: float = 0.0,
) -> tuple[dict[str, Timing], dict[str, Any]]:
    """Time several calls round-robin, so that a busy machine slows each of them alike.

    calls maps a name to (fn, setup): fn(setup()) is timed, setup() is not. Rounds go on past
    `repeats` while less than min_seconds was timed. Returns the timings and each fn's last result.
    """
    results: dict[str, Any] = {}
    for _ in range(warmup):
        for name, (fn, setup) in calls.items():
            results[name] = fn(setup() if setup else None)
    synchronize(device)
    timings = {name: Timing() for name in calls}
    spent, rounds = 0.0, 0
    while rounds < repeats or (spent < min_seconds and rounds < MAX_REPEATS):
        for name, (fn, setup) in calls.items():
            arg = setup() if setup else None
            synchronize(device)
            start = time.perf_counter()
            results[name] = fn(arg)
            synchronize(device)
            seconds = time.perf_counter() - start
            timings[name].samples_ms.append(seconds * 1000)
            spent += seconds
        rounds += 1
    return timings, results


def count_host_syncs(fn: Callable[[], Any], device: torch.device) -> int | None:
    """How many times fn makes the host wait for the GPU (CUDA's sync debug mode); None on CPU."""
    if device.type != "cuda":
        return None
    import warnings

    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Device name and library versions, as printed above the tables."""
    import diffusers
    import numpy
    import sqlalchemy
    import transformers

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU: {cpu_name()}"
    return {
        "device": str(device),
        "device_name": name,
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "dtype": str(dtype).removeprefix("torch."),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "diffusers": diffusers.__version__,
        "numpy": numpy.__version__,
        "sqlalchemy": sqlalchemy.__version__,
        "platform": platform.platform(),
        "load_average_start": load_average(),
    }


def load_average() -> list[float] | None:
    """1/5/15-minute load averages: other processes on a shared machine skew CPU timings."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None
