"""`moderation bench-serve`: the HTTP service against the in-process Moderator (issue 17)."""

from __future__ import annotations

import json

import click

from moderation.cli.app import main
from moderation.cli.options import command_errors, echo_json, json_option, out_option, writing
from policy.atomic import atomic_write


@main.command("bench-serve", short_help="Time `moderation serve` against in-process moderate().")
@click.option("--size", type=click.Choice(["tiny", "vit-l"]), default="tiny", show_default=True)
@click.option("--concurrency", "concurrencies", default="1,8,32", show_default=True)
@click.option(
    "--requests",
    "requests_",
    help="Requests per concurrency: one number, or one per --concurrency [4 x c, >= 64].",
)
@click.option(
    "--load", "load", type=click.IntRange(1), help="Instead: a load run of N requests on the tiny "
    "model, logging to a scratch database on --pg whose connections are cut in the middle.",
)  # fmt: skip
@click.option("--max-wait-ms", type=click.FloatRange(0), default=10.0, show_default=True)
@click.option("--no-in-process", is_flag=True, help="Time the service only.")
@click.option("--pg", "pg_server", metavar="URL", help="PostgreSQL server for --load.")
@out_option("Also write the results as JSON to this file.")
@json_option
@command_errors
def bench_serve_cmd(
    size, concurrencies, requests_, load, max_wait_ms, no_in_process, pg_server, out, as_json
):
    """Throughput and p50/p99 latency of `moderation serve` against in-process moderate()."""
    from moderation.bench import serve

    def progress(message: str) -> None:
        click.echo(message, err=True)

    if load:
        if not pg_server:
            raise click.UsageError("--load needs --pg URL (a scratch database is made there)")
        result = serve.run_load(pg_server, total=load, progress=progress)
        if not as_json:
            click.echo(json.dumps(result, indent=2))
    else:
        levels = tuple(int(c) for c in concurrencies.split(","))
        counts = None
        if requests_:
            numbers = [int(n) for n in requests_.split(",")]
            if len(numbers) == 1:
                numbers *= len(levels)
            if len(numbers) != len(levels) or min(numbers) < 1:
                raise click.BadParameter(
                    "one positive count, or one per concurrency", param_hint="--requests"
                )
            counts = dict(zip(levels, numbers, strict=True))
        result = serve.run_serve_bench(
            size,
            levels,
            counts,
            progress=progress,
            max_wait_ms=max_wait_ms,
            in_process=not no_in_process,
        )
        click.echo(serve.report(result), err=as_json)
        for line in serve.summary(result):
            click.echo(line, err=as_json)
    if out is not None:
        with writing(out):
            atomic_write(out, json.dumps(result, indent=2, default=str) + "\n")
    if as_json:
        echo_json(result)
