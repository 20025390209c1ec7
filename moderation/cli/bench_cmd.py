"""`moderation bench`: our moderation path against diffusers' safety checker, on one device."""

from __future__ import annotations

import json

import click

from moderation.cli.app import main
from moderation.cli.options import HiddenAliases, command_errors, echo_json, out_option, writing
from policy.atomic import atomic_write


def _int_list(_ctx: click.Context, param: click.Parameter, value: str | None):
    """'1,8,32' -> (1, 8, 32); None stays None (the default of --quick or of the bench)."""
    if value is None:
        return None
    try:
        numbers = tuple(int(v.replace("_", "")) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None
    if not numbers or any(n < 1 for n in numbers):
        raise click.BadParameter(f"expected positive integers, got {value!r}")
    return numbers


@main.command("bench", short_help="Time our moderation path against diffusers' checker.")
@click.option(
    "--model",
    "-m",
    metavar="MODEL",
    help="CLIP or safety-checker checkpoint (folder or hub id); default: random ViT-L/14 weights.",
)
@click.option("--device", help="torch device (default: cuda when available, else cpu).")
@click.option(
    "--dtype",
    type=click.Choice(["float32", "float16", "bfloat16"]),
    help="Model dtype for both paths (default: float16 on cuda, float32 on cpu).",
)
@click.option("--batch-sizes", callback=_int_list, help="End-to-end batch sizes [1,8,32].")
@click.option(
    "--concepts",
    callback=_int_list,
    help="Concept counts after the encoder [17,1000,10000,100000].",
)
@click.option("--concept-batch", type=click.IntRange(min=1), help="Batch of section c [8].")
@click.option("--repeats", type=click.IntRange(min=1), help="Timed repeats per row [5].")
@click.option(
    "--e2e-repeats",
    type=click.IntRange(min=1),
    help="Repeats of the forward/end-to-end rows (seconds each on a CPU) [--repeats].",
)
@click.option(
    "--e2e-seconds",
    type=click.FloatRange(min=0),
    help="More forward/end-to-end rounds while a batch size took less than this [0].",
)
@click.option("--warmup", type=click.IntRange(min=0), help="Warm-up calls per row [1].")
@click.option(
    "--db",
    "--db-url",  # its name before --db was every command's
    "db_urls",
    cls=HiddenAliases,
    hidden_names=("--db-url",),
    metavar="URL",
    multiple=True,
    help="Database to log to, repeatable: 'sqlite' (a temp file, default), a sqlite:/// URL, or "
    "a PostgreSQL server URL (a scratch database is created there and dropped).",
)
@click.option("--decisions", type=click.IntRange(min=1), help="Decisions to log [20000].")
@click.option("--write-size", type=click.IntRange(min=1), help="Decisions per write() [8].")
@click.option(
    "--attention",
    type=click.Choice(["sdpa", "eager"]),
    help="Attention of our CLIP tower [sdpa]; diffusers' checker keeps what from_pretrained picks.",
)
@click.option(
    "--compile/--no-compile", "compile_", default=None, help="torch.compile our vision tower."
)
@click.option(
    "--sections",
    help="Comma-separated sections among e2e,concepts,logging,views,shadow,backtest,pipelines "
    "[all but backtest and pipelines].",
)
@click.option(
    "--backtest-sizes",
    callback=_int_list,
    help="Logged decisions of the backtest section [100000,1000000]; --quick: 20000.",
)
@out_option("Also write the results as JSON to this file.")
@click.option(
    "--json", "as_json", is_flag=True, help="Print the results as JSON (the tables go to stderr)."
)
@click.option(
    "--quick",
    is_flag=True,
    help="Batch 1 only, 2 repeats, 17 to 10,000 concepts, 2,000 logged decisions: about "
    "3 minutes on 2 CPU cores (without it: batches up to 32, meant for a GPU).",
)
@click.option("--size", type=click.Choice(["vit-l", "tiny"]), hidden=True)
@command_errors
def bench_cmd(
    model,
    device,
    dtype,
    batch_sizes,
    concepts,
    concept_batch,
    repeats,
    e2e_repeats,
    e2e_seconds,
    warmup,
    db_urls,
    decisions,
    write_size,
    attention,
    compile_,
    sections,
    out,
    as_json,
    quick,
    size,
    backtest_sizes,
):
    """Time our moderation path against diffusers' safety checker (see BENCHMARKS.md)."""
    from moderation.bench.config import BenchConfig
    from moderation.bench.report import format_report
    from moderation.bench.run import run_bench

    options = {
        "model": model,
        "device": device,
        "dtype": dtype,
        "batch_sizes": batch_sizes,
        "concepts": concepts,
        "concept_batch": concept_batch,
        "repeats": repeats,
        "e2e_repeats": e2e_repeats,
        "e2e_seconds": e2e_seconds,
        "warmup": warmup,
        "db_urls": tuple(db_urls) or None,
        "decisions": decisions,
        "write_size": write_size,
        "attention": attention,
        "compile": compile_,
        "sections": tuple(s.strip() for s in sections.split(",") if s.strip())
        if sections
        else None,
        "size": size,
        "backtest_sizes": backtest_sizes,
    }
    given = {k: v for k, v in options.items() if v is not None}
    config = BenchConfig.quick(**given) if quick else BenchConfig(**given)

    def progress(message: str) -> None:
        click.echo(f"... {message}", err=True)

    result = run_bench(config, progress=progress)
    result["config"]["quick"] = bool(quick)  # the report explains targets a quick run misses
    click.echo(format_report(result), err=as_json)
    if out is not None:
        with writing(out):
            atomic_write(out, json.dumps(result, indent=2, default=str) + "\n")
    if as_json:
        echo_json(result)
