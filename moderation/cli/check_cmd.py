"""`moderation check`: moderate image files with a policy, log the decisions, write the results."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from moderation.cli.app import main
from moderation.cli.check_inputs import (
    ImageInput,
    NotChecked,
    assign_out_names,
    collect_inputs,
    display_path,
)
from moderation.cli.options import (
    clean,
    command_errors,
    db_option,
    echo_json,
    echo_table,
    json_option,
    model_options,
    out_option,
    policy_option,
    regular_target,
    shadow_option,
    top_option,
    writing,
)
from moderation.cli.recording import recording_failure, recording_summary
from moderation.errors import ModerationError
from moderation.tables import fixed
from policy.vocabulary import VERDICTS

# Fired concepts named in the table before "+N more" (--json lists them all).
TABLE_FIRED = 3


@main.command("check", short_help="Check image files or folders against a policy.")
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@policy_option
@shadow_option
@model_options
@db_option
@click.option("--no-log", is_flag=True, help="Do not log decisions to the database.")
@out_option(
    name="out_dir",
    file=False,
    help="Write the moderated images into this folder, as NAME.png (NAME: the input's name, "
    "kept when it ends in .png; ~2, ~3... when taken).",
)
@click.option("--batch-size", "-b", default=16, show_default=True, type=click.IntRange(1))
@click.option("--prompt", help="Caller metadata: the prompt that made the images.")
@click.option("--user", help="Caller metadata: user or app id.")
@top_option(default=5)
@json_option
@command_errors
def check_command(
    images,
    policy_path,
    shadow_paths,
    model,
    text_model,
    device,
    db_url,
    no_log,
    out_dir,
    batch_size,
    prompt,
    user,
    top,
    as_json,
):
    """Check image files (or folders of them, by content) against a policy."""
    from tqdm import tqdm

    from moderation.engine import Moderator
    from moderation.storage.storable import MetadataError, check_metadata

    caller = {k: v for k, v in {"prompt": prompt, "user": user}.items() if v is not None}
    for key, value in caller.items():  # checked before any model loads or image is touched
        try:
            check_metadata({key: value})
        except MetadataError:
            raise click.BadParameter(
                "not valid UTF-8 text (undecodable bytes?), so it cannot be logged",
                param_hint=f"'--{key}'",
            ) from None
    found = collect_inputs(list(images))
    inputs = [f for f in found if isinstance(f, ImageInput)]
    if not inputs:
        _report_not_checked(found, as_json)
        raise click.ClickException("no image files found in " + ", ".join(map(clean, images)))
    if out_dir:
        assign_out_names(inputs, out_dir)
    db = None
    if not no_log:
        from moderation.storage import resolve_db_url

        db = resolve_db_url(db_url)
    moderator = Moderator.from_policy(
        policy_path,
        model=model,
        device=device,
        text_model=text_model,
        db=db,
        shadow=list(shadow_paths),
    )
    moderator.hash_images = True  # the decision names the pixels it judged, logged or not
    if out_dir:
        with writing(out_dir):
            out_dir.mkdir(parents=True, exist_ok=True)
    decisions: dict[int, Any] = {}
    batches = [inputs[i : i + batch_size] for i in range(0, len(inputs), batch_size)]
    with (
        moderator,
        tqdm(total=len(inputs), unit="img", disable=len(batches) < 2, leave=False) as bar,
    ):
        for chunk in batches:
            decisions.update(_check_chunk(moderator, chunk, caller, out_dir))
            bar.update(len(chunk))
    results = [(i, decisions[id(i)]) for i in inputs]
    errors = sum(d.verdict == "error" for _, d in results)
    skipped = [f for f in found if isinstance(f, NotChecked)]
    recorded = _recorded(moderator, db)
    if as_json:
        echo_json([_json_row(f, decisions, top, out_dir, recorded) for f in found])
    else:
        _print_table(results, out_dir)
        _report_not_checked(found, as_json)
        counts = {v: sum(d.verdict == v for _, d in results) for v in VERDICTS}
        summary = ", ".join(f"{n} {v}" for v, n in counts.items() if n)
        extra = []
        if skipped:
            extra.append(f"{len(skipped)} file(s) not checked")
        repeats = sum(len(i.also_given_as) for i in inputs)
        if repeats:
            extra.append(f"{repeats} repeated input(s) checked once")
        more = "".join(f"; {e}" for e in extra)
        images = "1 image" if len(results) == 1 else f"{len(results)} images"
        click.echo(f"\n{images}: {summary}{more}{recording_summary(moderator)}")
        for line in _shadow_summary(moderator, [d for _, d in results], recorded):
            click.echo(line)
    problems = []
    if moderator.log_errors:
        total = sum(1 + len(d.shadows) for _, d in results)
        problems.append(recording_failure(moderator, total))
    if errors:
        problems.append(
            f"{errors} image(s) could not be judged (verdict error: see the note column)"
        )
    if skipped:
        problems.append(f"{len(skipped)} file(s) were not checked (see 'not checked')")
    if problems:
        raise click.ClickException("; ".join(problems))


def _check_chunk(moderator, chunk: list[ImageInput], caller, out_dir) -> dict[int, Any]:
    """Moderate one chunk of files; unreadable files become error decisions (fail closed)."""
    from moderation.image_files import read_image, save_result

    def meta(item: ImageInput) -> dict[str, Any]:
        return {**caller, "file": display_path(item.path)}

    good, decoded, bad, messages = [], [], [], []
    for item in chunk:
        try:
            decoded.append(read_image(item.path))  # every judged frame of an animation
            good.append(item)
        except ModerationError as exc:
            bad.append(item)
            messages.append(str(exc))
    decided = {}
    if good:
        result = moderator.moderate(decoded, metadata=[meta(i) for i in good])
        for item, file, image, d in zip(
            good, decoded, result.images, result.decisions, strict=True
        ):
            decided[id(item)] = d
            if out_dir:
                if d.action == "review":  # the placeholder, marked: not a final blur
                    image = mark_pending_review(item, image, {i.out_name for i in good})
                target = out_dir / item.out_name
                regular_target(target)  # never write through a link or into a device
                with writing(target):
                    target.parent.mkdir(parents=True, exist_ok=True)
                    save_result(target, image, file, allowed=d.action == "allow")
    if bad:
        for item in bad:
            item.out_name = None  # nothing was decoded, so nothing is written
        failed = moderator.fail(messages, metadata=[meta(i) for i in bad])
        decided.update((id(i), d) for i, d in zip(bad, failed, strict=True))
    return decided


def mark_pending_review(item, image, taken: set):
    """The review placeholder with its badge; its out name says so when that name is free."""
    from moderation.review_badge import pending_review_name, with_badge

    renamed = pending_review_name(item.out_name)
    if renamed not in taken:
        item.out_name = renamed
    return with_badge(image)


def _recorded(moderator, db: str | None):
    """Whether a decision is in the database or the spool (False for all with --no-log)."""
    unrecorded = set(moderator.unrecorded)
    return lambda d: db is not None and d.decision_id not in unrecorded


def _json_row(
    item: ImageInput | NotChecked,
    decisions: dict[int, Any],
    top: int,
    out_dir: Path | None,
    recorded=lambda _d: False,
) -> dict:
    """One entry of `check --json`: the file, then its decision document
    (moderation.decisions.document), or why it was not checked."""
    from moderation.decisions.document import decision_document

    if isinstance(item, NotChecked):
        return {"file": display_path(item.path), "checked": False, "reason": item.reason}
    d = decisions[id(item)]
    row = {
        "file": display_path(item.path),
        "checked": True,
        "out": display_path(out_dir / item.out_name) if out_dir and item.out_name else None,
    }
    if item.also_given_as:
        row["also_given_as"] = [display_path(p) for p in item.also_given_as]
    return {**row, **decision_document(d, recorded=recorded, top=top or None)}


def _shadow_summary(moderator, decisions, recorded) -> list[str]:
    """Per shadow candidate: how many of its decisions were logged, and how many differ."""
    lines = []
    for k, p in enumerate(moderator.shadow_policies):
        mine = [(d, d.shadows[k]) for d in decisions if len(d.shadows) > k]
        logged = sum(recorded(s) for _, s in mine)
        differ = sum(s.action != d.action for d, s in mine)
        where = f"{logged} shadow decisions logged" if logged else "shadow decisions not logged"
        lines.append(
            f"shadow {clean(p.name)} v{clean(p.version)} ({p.digest[:12]}): {where}; "
            f"{differ} of {len(mine)} with another action than the live policy's"
        )
    return lines


def _fired_text(fired: tuple[str, ...]) -> str:
    if not fired:
        return "-"
    shown = ", ".join(fired[:TABLE_FIRED])
    return shown if len(fired) <= TABLE_FIRED else f"{shown} +{len(fired) - TABLE_FIRED} more"


def _note(d) -> str:
    """Why an image went to review or was escalated, for the table's note column."""
    notes = []
    if d.action_reason == "review_band":
        notes.append(f"within the review band of {d.reason_concept}")
    if d.special_hits:
        notes.append(f"special care: {', '.join(d.special_hits)}")
    return "; ".join(notes)


def _print_table(results, out_dir) -> None:
    rows = []
    for item, d in results:
        written = display_path(out_dir / item.out_name) if out_dir and item.out_name else "-"
        if d.verdict == "error" or d.top_concept is None:
            cells = [d.verdict, d.action, "-", "-", "-", d.error or ""]
        else:
            i = d.policy.concept_names.index(d.top_concept)
            threshold = float(d.policy.thresholds[i])
            cells = [
                d.verdict,
                d.action,
                _fired_text(d.fired),
                d.top_concept,
                f"{fixed(float(d.cosines[i]))} / {fixed(threshold)}",
                _note(d),
            ]
        rows.append([display_path(item.path), *cells, *([written] if out_dir else [])])
    headers = ["image", "verdict", "action", "fired", "top concept", "cosine / threshold", "note"]
    echo_table(headers + (["written to"] if out_dir else []), rows)


def _report_not_checked(found, as_json: bool) -> None:
    skipped = [f for f in found if isinstance(f, NotChecked)]
    if not skipped:
        return
    if as_json:
        echo_json([_json_row(f, {}, 0, None) for f in skipped])
        return
    click.echo()
    echo_table(["not checked", "why"], [(display_path(f.path), f.reason) for f in skipped])
