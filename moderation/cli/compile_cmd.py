"""`moderation policy compile`: a policy's YAML to a safetensors artifact a worker can load."""

from __future__ import annotations

from pathlib import Path

import click

from moderation.cli import policy
from moderation.cli.output import echo_json, model_options
from moderation.errors import ModerationError


@policy.command("compile")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@model_options
@click.option(
    "-o",
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Artifact to write (default: PATH with suffix .compiled.safetensors).",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
def compile_command(path, model, text_model, device, out, as_json):
    """Compile a policy into embedding matrices for its model."""
    from moderation.encoder import ClipEncoder
    from policy import PolicyError, compile_policy, load_policy

    try:
        loaded = load_policy(path)
        encoder = ClipEncoder.from_pretrained(
            model or loaded.resolved_model, device=device, text_model=text_model
        )
        compiled = compile_policy(loaded, encoder)
    except (PolicyError, ModerationError) as exc:
        raise click.ClickException(str(exc)) from exc
    out = out or path.with_suffix(".compiled.safetensors")
    compiled.save(out)
    summary = {
        "policy": compiled.name,
        "version": compiled.version,
        "digest": compiled.digest,
        "model": compiled.model,
        "concepts": len(compiled.concept_names),
        "special_care": len(compiled.special_names),
        "embed_dim": compiled.embed_dim,
        "out": str(out),
    }
    if as_json:
        echo_json(summary)
    else:
        click.echo(
            f"compiled {compiled.name} v{compiled.version}: {summary['concepts']} concepts, "
            f"{summary['special_care']} special-care, width {compiled.embed_dim}, "
            f"model {compiled.model}\ndigest {compiled.digest}\nwrote {out}"
        )
