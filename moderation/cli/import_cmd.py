"""`moderation policy import-sd-checker`: a Stable Diffusion safety checker as a policy file."""

from __future__ import annotations

import json
from pathlib import Path

import click

from moderation.cli import policy
from moderation.errors import ModerationError


@policy.command("import-sd-checker")
@click.argument("checkpoint")
@click.option(
    "--out",
    "-o",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Policy YAML to write; its embeddings go beside it as <name>.safetensors.",
)
@click.option("--force", is_flag=True, help="Overwrite the policy and embeddings files.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def import_sd_checker_command(checkpoint: str, out: Path, force: bool, as_json: bool) -> None:
    """Write a compat: diffusers policy naming every concept of a safety checker CHECKPOINT."""
    from moderation.sd_import import import_sd_checker

    try:
        result = import_sd_checker(checkpoint, out, overwrite=force)
    except ModerationError as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        data = {
            "policy": str(result.policy_path),
            "embeddings": str(result.embeddings_path),
            "model": result.model,
            "concepts": result.n_concepts,
            "special_care": result.n_special,
        }
        click.echo(json.dumps(data))
        return
    click.echo(
        f"Wrote {result.policy_path}: {result.n_concepts} concepts, "
        f"{result.n_special} special-care concepts (embeddings in {result.embeddings_path})"
    )
