"""`moderation policy validate | compile | import-sd-checker`: check, compile and import policies."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import click

from moderation.cli.app import policy
from moderation.cli.options import (
    clean,
    command_errors,
    echo_json,
    json_option,
    model_option,
    model_options,
    out_option,
    regular_target,
)
from moderation.tables import plural
from policy import Policy, PolicyError, check_embed_dim, load_policy, model_embed_dim


def _policy_files(given: str) -> list[str]:
    """The file itself, or every *.yaml / *.yml directly inside a folder (sorted)."""
    if not os.path.isdir(given):
        return [given]
    names = sorted(os.listdir(given))
    return [
        os.path.join(given, name)
        for name in names
        if name.endswith((".yaml", ".yml")) and os.path.isfile(os.path.join(given, name))
    ]


def _validate_one(file: str, embed_dim: int | None, encoder=None) -> Policy:
    """Load one policy; without --model, check widths against its own model when found locally;
    then what compiling would check without a model (example images, model folder, prompt
    lengths), and with an encoder (--deep, --model) compile it."""
    from policy import compile_policy
    from policy.checks import offline_issues

    loaded = load_policy(file, embed_dim=embed_dim)
    if embed_dim is None:
        own_dim = model_embed_dim(loaded.resolved_model)
        if own_dim is not None:
            check_embed_dim(loaded, own_dim)
    issues = offline_issues(loaded) if encoder is None else []
    if issues:
        raise PolicyError(issues)
    if encoder is not None:
        if encoder == "own":
            from moderation.encoder import ClipEncoder
            from moderation.errors import EncoderError

            try:
                own = ClipEncoder.from_pretrained(loaded.resolved_model, device="cpu")
            except EncoderError as exc:
                raise PolicyError([loaded.issue(("model",), str(exc))]) from None
            compile_policy(loaded, own, cache=False)
        else:
            compile_policy(loaded, encoder, cache=False)
    return loaded


@policy.command("validate", short_help="Validate policy files (folders: every *.yaml inside).")
@click.argument("paths", nargs=-1, required=True)
@model_option
@click.option(
    "--deep", is_flag=True, help="Compile each policy with its own model (loads the model)."
)
@json_option
@command_errors
def validate(paths: tuple[str, ...], model: str | None, deep: bool, as_json: bool) -> None:
    """Validate policy files (folders: every *.yaml / *.yml inside).

    Without a model: the schema, files, example images (each must decode), the model folder
    and, when the model's tokenizer is on this machine, prompt lengths. --deep or --model
    compiles as well (what `policy compile` and `check` would find).
    """
    embed_dim = encoder = None
    if deep:
        encoder = "own"
    if model is not None:
        embed_dim = model_embed_dim(model)
        if embed_dim is None:
            raise click.BadParameter(
                f"cannot find the projection width of '{model}'"
                " (no config.json with projection_dim in that folder or in the Hugging Face cache)",
                param_hint="'--model'",
            )
        from moderation.encoder import ClipEncoder

        encoder = ClipEncoder.from_pretrained(model, device="cpu")
    results = []
    # Warnings are printed with their file below (and listed in --json), not logged as well.
    loader_log = logging.getLogger("policy.loader")
    level, loader_log.level = loader_log.level, logging.ERROR
    try:
        _validate_all(paths, embed_dim, results, encoder)
    finally:
        loader_log.setLevel(level)
    invalid = sum("error" in result for result in results)
    if as_json:
        echo_json({"ok": not invalid, "files": [_as_json(r) for r in results]})
    else:
        for result in results:
            click.echo(_as_text(result))
            for warning in result["policy"].warnings if "policy" in result else ():
                click.echo(f"warning: {clean(str(warning))}", err=True)
    if invalid:
        verb = "is" if invalid == 1 else "are"
        raise click.ClickException(
            f"{invalid} of {plural(len(results), 'policy file')} {verb} invalid"
        )


def _validate_all(
    paths: tuple[str, ...], embed_dim: int | None, results: list[dict], encoder=None
) -> None:
    for given in paths:
        files = _policy_files(given)
        if not files:
            error = PolicyError.about_file(given, "no .yaml or .yml files in this folder")
            results.append({"path": given, "error": error})
        for file in files:
            try:
                loaded = _validate_one(file, embed_dim, encoder)
                results.append({"path": file, "policy": loaded})
            except PolicyError as error:
                results.append({"path": file, "error": error})


def _as_text(result: dict) -> str:
    if "error" in result:
        return str(result["error"])
    loaded: Policy = result["policy"]
    counts = (
        f"{plural(len(loaded.concepts), 'concept')}, {len(loaded.special_concepts)} special-care"
    )
    return f"{clean(result['path'])}: ok ({counts})"


def _as_json(result: dict) -> dict:
    loaded: Policy | None = result.get("policy")
    error: PolicyError | None = result.get("error")
    return {
        "path": result["path"],
        "ok": error is None,
        "concepts": len(loaded.concepts) if loaded else None,
        "special_care": len(loaded.special_concepts) if loaded else None,
        "issues": [issue._asdict() for issue in error.issues] if error else [],
        "warnings": [w._asdict() for w in loaded.warnings] if loaded else [],
    }


@policy.command("compile")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@model_options
@out_option("Artifact to write (default: PATH with suffix .compiled.safetensors).")
@json_option
@command_errors
def compile_command(path, model, text_model, device, out, as_json):
    """Compile a policy into embedding matrices for its model."""
    from moderation.encoder import ClipEncoder
    from policy import compile_policy

    out = out or path.with_suffix(".compiled.safetensors")
    regular_target(out)  # the artifact is written by rename, which would replace a device
    loaded = load_policy(path)
    encoder = ClipEncoder.from_pretrained(
        model or loaded.resolved_model, device=device, text_model=text_model
    )
    compiled = compile_policy(loaded, encoder)
    # What `model` resolved to, so that a moved artifact still finds (and names) its model.
    compiled = dataclasses.replace(
        compiled, model_path=encoder.model_path, model_sha256=encoder.weights_sha256()
    )
    _save(lambda: compiled.save(out), out)
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
            f"compiled {clean(compiled.name)} v{clean(compiled.version)}: "
            f"{summary['concepts']} concepts, "
            f"{summary['special_care']} special-care, width {compiled.embed_dim}, "
            f"model {clean(compiled.model)}\ndigest {compiled.digest}\nwrote {clean(out)}"
        )


@policy.command(
    "import-sd-checker", short_help="Write a policy naming a safety checker's concepts."
)
@click.argument("checkpoint")
@out_option(
    "Policy YAML to write; its embeddings go beside it as <name>.safetensors.", required=True
)
@click.option("--force", is_flag=True, help="Overwrite the policy and embeddings files.")
@json_option
@command_errors
def import_sd_checker_command(checkpoint: str, out: Path, force: bool, as_json: bool) -> None:
    """Write a compat: diffusers policy naming every concept of a safety checker CHECKPOINT."""
    from moderation.integrations.sd_checker import import_sd_checker

    for target in (out, out.with_suffix(".safetensors")):
        regular_target(target)
    result = _save(lambda: import_sd_checker(checkpoint, out, overwrite=force), out)
    if as_json:
        data = {
            "policy": str(result.policy_path),
            "embeddings": str(result.embeddings_path),
            "model": result.model,
            "concepts": result.n_concepts,
            "special_care": result.n_special,
        }
        echo_json(data)
        return
    click.echo(
        f"Wrote {clean(result.policy_path)}: {result.n_concepts} concepts, "
        f"{result.n_special} special-care concepts (embeddings in {clean(result.embeddings_path)})"
    )


def _save(write, out: Path):
    """Run a write; a full disk or an unwritable folder becomes one line (safetensors raises
    its own error type for them)."""
    from safetensors import SafetensorError

    try:
        return write()
    except (OSError, SafetensorError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise click.ClickException(f"cannot write {clean(out)}: {clean(reason)}") from err
