"""`moderation check`: moderate image files with a policy, log the decisions, write the results."""

from __future__ import annotations

from pathlib import Path

import click

from moderation.cli.app import main
from moderation.cli.options import (
    clean,
    db_option,
    echo_json,
    echo_table,
    failures,
    fmt_float,
    model_options,
    output_errors,
    regular_target,
    writing,
)
from moderation.cli.recording import recording_failure, recording_summary
from moderation.errors import ModerationError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def collect_images(paths: list[Path]) -> list[tuple[Path, Path]]:
    """(file, name under --out) for files as given and the images under folders (sorted, recursive).

    The name mirrors the file's place under the folder it was found in, so two `a.png` in
    different folders do not overwrite each other's result.
    """
    found: list[tuple[Path, Path]] = []
    for p in paths:
        if p.is_dir():
            files = sorted(
                f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
            )
            found += [(f, f.relative_to(p)) for f in files]
        else:
            found.append((p, Path(p.name)))
    return found


@main.command("check")
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option(
    "--policy",
    "-p",
    "policy_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Policy YAML, or a compiled .safetensors artifact.",
)
@model_options
@db_option
@click.option("--no-log", is_flag=True, help="Do not log decisions to the database.")
@click.option(
    "--out",
    "-o",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write the moderated images (PNG) into this folder.",
)
@click.option("--batch-size", "-b", default=16, show_default=True, type=click.IntRange(1))
@click.option("--prompt", help="Caller metadata: the prompt that made the images.")
@click.option("--user", help="Caller metadata: user or app id.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per image, as a list.")
@output_errors
def check_command(
    images,
    policy_path,
    model,
    text_model,
    device,
    db_url,
    no_log,
    out_dir,
    batch_size,
    prompt,
    user,
    as_json,
):
    """Check image files (or folders of them) against a policy."""
    from tqdm import tqdm

    from moderation.engine import Moderator

    found = collect_images(list(images))
    files = [f for f, _ in found]
    out_names = dict(found)
    if not files:
        raise click.ClickException("no image files found in " + ", ".join(map(clean, images)))
    db = None
    if not no_log:
        from moderation.storage import resolve_db_url

        db = resolve_db_url(db_url)
    with failures():
        moderator = Moderator.from_policy(
            policy_path, model=model, device=device, text_model=text_model, db=db
        )
    if out_dir:
        with writing(out_dir):
            out_dir.mkdir(parents=True, exist_ok=True)
    caller = {k: v for k, v in {"prompt": prompt, "user": user}.items() if v is not None}
    results: list[tuple[Path, object]] = []
    batches = [files[i : i + batch_size] for i in range(0, len(files), batch_size)]
    with (
        failures(),
        moderator,
        tqdm(total=len(files), unit="img", disable=len(batches) < 2, leave=False) as bar,
    ):
        for chunk in batches:
            results += _check_chunk(
                moderator,
                chunk,
                caller,
                out_dir and {f: out_dir / out_names[f] for f in chunk},
            )
            bar.update(len(chunk))
    errors = sum(d.verdict == "error" for _, d in results)
    unrecorded = set(moderator.unrecorded)
    if as_json:
        echo_json(
            [
                {
                    "file": str(f),
                    **d.to_dict(),
                    "recorded": db is not None and d.decision_id not in unrecorded,
                }
                for f, d in results
            ]
        )
    else:
        _print_table(results)
        counts = {
            v: sum(d.verdict == v for _, d in results) for v in ("allow", "flag", "review", "error")
        }
        summary = ", ".join(f"{n} {v}" for v, n in counts.items() if n)
        click.echo(f"\n{len(results)} images: {summary}{recording_summary(moderator)}")
    if moderator.log_errors:
        raise click.ClickException(recording_failure(moderator, len(results)))
    if errors:
        raise click.ClickException(f"{errors} image(s) could not be checked (see the error column)")


def _check_chunk(moderator, chunk, caller, out_paths):
    """Moderate one chunk of files; unreadable files become error decisions (fail closed)."""
    from moderation.image_files import read_image, save_result

    good, decoded, bad, messages = [], [], [], []
    for f in chunk:
        try:
            decoded.append(read_image(f))  # every judged frame of an animation
            good.append(f)
        except ModerationError as exc:
            bad.append(f)
            messages.append(str(exc))
    decided = {}
    if good:
        result = moderator.moderate(decoded, metadata=[{**caller, "file": str(f)} for f in good])
        for f, file, image, d in zip(good, decoded, result.images, result.decisions, strict=True):
            decided[f] = d
            if out_paths:
                target = out_paths[f].with_suffix(".png")
                regular_target(target)  # never write through a link or into a device
                with writing(target):
                    target.parent.mkdir(parents=True, exist_ok=True)
                    save_result(target, image, file, allowed=d.action == "allow")
    if bad:
        failed = moderator.fail(messages, metadata=[{**caller, "file": str(f)} for f in bad])
        decided.update(zip(bad, failed, strict=True))
    return [(f, decided[f]) for f in chunk]


def _print_table(results) -> None:
    rows = []
    for f, d in results:
        top = d.explain(top=1)
        if d.verdict == "error" or not top:
            rows.append((f, d.verdict, d.action, "-", "-", d.error or ""))
            continue
        t = top[0]
        rows.append(
            (
                f,
                d.verdict,
                d.action,
                t["concept"],
                f"{fmt_float(t['cosine'])} / {fmt_float(t['threshold'])}",
                ", ".join(d.special_hits) and f"special care: {', '.join(d.special_hits)}",
            )
        )
    echo_table(["image", "verdict", "action", "top concept", "cosine / threshold", "note"], rows)
