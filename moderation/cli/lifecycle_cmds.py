"""`moderation policy diff`: what changed between two policies, and whether they decide alike."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from moderation.cli.app import policy
from moderation.cli.options import clean, command_errors, echo_json, json_option, model_option
from moderation.errors import ModerationError
from moderation.tables import plural
from policy import PolicyError

if TYPE_CHECKING:
    from moderation.lifecycle.diff_sides import ConceptSide, PolicySide

DIFF_HELP = """Compare two policies: YAML files or compiled artifacts (.safetensors).

A policy that `extends:` another is compared flattened, so `policy diff base.yaml child.yaml`
shows exactly what the child changes. Reported: concepts added, removed and renamed-looking (a
removed and an added concept with the same definition, or vectors at cosine >= 0.999); per
concept in both (by name), threshold, action, kind (special care or not), definition, category
and severity; settings (model, compat, views, review band, on_error, special care, blur radius,
pixelate block, review placeholder, concept order, name, version, description, defaults,
categories); both digests.

Vectors are compared when both are known: a compiled artifact, a YAML policy of raw embeddings
(compiled without a model), or any YAML policy with --model (compiled with it; nothing is
downloaded: a hub id must be in the local cache). Then a changed definition shows the cosine
between the old and new vectors. Without them, prompts, embedding values, example images and
checkpoint rows are compared as written; a prompt or example concept against a compiled vector
cannot be compared without --model and counts as a difference.

Changes that decide nothing (name, version, description, category, severity, defaults,
declared categories, a reworded definition with the same vector) are reported as such and do
not make the policies differ. Concept order counts: it picks the top concept when scores tie.
A YAML policy's digest is the one `policy compile` gives (with --model: `--model M`).

\b
Exit status (like diff):
  0  the two policies decide identically
  1  they can decide differently
  2  a policy cannot be read, is invalid or cannot be compiled; a usage error

\b
--json prints one object:
  identical        true when the exit status is 0
  old, new         {path, kind: yaml|compiled, name, version, digest (null: not
                   compiled, needs a model), model}
  concepts         {added: [names], removed: [names],
                    renamed: [{old, new, cosine, changes}],
                    changed: {name: {field: {old, new, affects_decisions}}}}
                   (a changed definition also has cosine; compared: false when it
                   could not be compared)
  settings         {setting: {old, new, affects_decisions}}, only those that differ
  not_compared     concepts whose definitions (or checkpoint thresholds) could not
                   be compared without a model: they count as differences
"""


class _Trouble(click.ClickException):
    """A policy that cannot be used: exit 2, never 1 (which says that the policies differ)."""

    exit_code = 2


def _one_line(err: PolicyError) -> str:
    """The first problem at FILE:LINE:COL, and how many more there are."""
    first = clean(str(err.issues[0])) if err.issues else clean(err)
    more = len(err.issues) - 1
    return first if more < 1 else f"{first} (and {more} more: run `moderation policy validate`)"


def _trouble_exits_2(command):
    """Every error of the command, its output errors included, exits 2 (usage errors already do)."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except PolicyError as err:
            raise _Trouble(_one_line(err)) from err
        except ModerationError as err:
            raise _Trouble(clean(err)) from err
        except click.ClickException as err:
            if err.exit_code == 1:
                err.exit_code = 2
            raise

    return run


@policy.command("diff", help=DIFF_HELP, short_help="Compare two policies (exit 1: they differ).")
@click.argument("old", type=click.Path(path_type=Path))
@click.argument("new", type=click.Path(path_type=Path))
@model_option
@json_option
@command_errors
def diff_command(old: Path, new: Path, model: str | None, as_json: bool) -> None:
    identical = _diff(old, new, model, as_json)
    if not identical:
        click.get_current_context().exit(1)


@_trouble_exits_2
@command_errors
def _diff(old: Path, new: Path, model: str | None, as_json: bool) -> bool:
    from moderation.lifecycle.diff import diff
    from moderation.lifecycle.diff_sides import load_side
    from moderation.loading import load_any_policy

    loaded = [load_any_policy(old), load_any_policy(new)]  # both read before any model loads
    encoder = None
    if model is not None and any(p.suffix != ".safetensors" for p in (old, new)):
        from moderation.encoder import ClipEncoder

        encoder = ClipEncoder.from_pretrained(model, device="cpu")
    sides = [load_side(p, lp, encoder) for p, lp in zip((old, new), loaded, strict=True)]
    result = diff(*sides)
    if as_json:
        echo_json(result)
    else:
        click.echo("\n".join(render(result, *sides)))
    return result["identical"]


# -- text -------------------------------------------------------------------------------------


def value(v: Any) -> str:
    """One setting's or field's value on one line, user text escaped."""
    if v is None:
        return "none"
    if isinstance(v, bool):
        return "special care" if v else "regular"
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(clean(x) for x in v) + "]"
    if isinstance(v, dict):
        return definition(v)
    return clean(v)


def definition(source: dict[str, Any]) -> str:
    """What defines a concept (or where a threshold is read), as one line."""
    parts = []
    if "prompts" in source:
        quoted = (json.dumps(p, ensure_ascii=False) for p in source["prompts"])
        parts.append("prompts " + clean(", ".join(quoted)))
    if "examples" in source:
        content = f", content {source['content']}" if "content" in source else ""
        parts.append(
            f"examples {clean(source['examples'])} ({plural(source['images'], 'image')}{content})"
        )
    embedding = source.get("embedding")
    if embedding == "inline":
        parts.append(f"inline embedding ({source['values']} values)")
    elif isinstance(embedding, dict):
        parts.append("embedding " + _reference(embedding))
    if "checkpoint" in source:
        parts.append(_reference(source))
    if "vector" in source:
        parts.append(f"vector {source['vector']}")
    return ", ".join(parts)


def _reference(ref: dict[str, Any]) -> str:
    words = []
    for key in ("file", "checkpoint", "tensor", "row"):
        if key in ref:
            words.append(f"{'checkpoint tensor' if key == 'checkpoint' else key} {clean(ref[key])}")
    return " ".join(words)


def _change(name: str, entry: dict[str, Any]) -> str:
    line = f"{clean(name)}: {value(entry['old'])} -> {value(entry['new'])}"
    if entry.get("cosine") is not None:
        line += f" (cosine {entry['cosine']:.4f})"
    if entry.get("compared") is False:
        line += " (not compared: needs --model)"
    if not entry["affects_decisions"]:
        line += " (decides nothing)"
    return line


def _heading(sign: str, side: dict[str, Any]) -> str:
    digest = side["digest"] or "not compiled (needs a model)"
    return (
        f"{sign} {clean(side['path'])}: {side['kind']} policy {clean(side['name'])}"
        f" v{clean(side['version'])}, digest {digest}"
    )


def _concept(sign: str, concept: ConceptSide) -> str:
    """An added or removed concept with what decides with it."""
    kind = "special-care concept" if concept.special else "concept"
    action = f", action {clean(concept.action)}" if concept.action else ""
    return (
        f"{sign} {kind} {clean(concept.name)}: threshold {value(concept.threshold)}{action},"
        f" {definition(concept.source)}"
    )


def render(result: dict[str, Any], old: PolicySide, new: PolicySide) -> list[str]:
    """The diff as text: headings, concepts, settings, then one verdict line."""
    lines = [_heading("---", result["old"]), _heading("+++", result["new"])]
    concepts = result["concepts"]
    by_name = {c.name: c for c in new.concepts}
    lines += [_concept("+", by_name[name]) for name in concepts["added"]]
    by_name = {c.name: c for c in old.concepts}
    lines += [_concept("-", by_name[name]) for name in concepts["removed"]]
    for rename in concepts["renamed"]:
        how = "same definition" if rename["cosine"] is None else f"cosine {rename['cosine']:.4f}"
        lines.append(f"~ concept {clean(rename['old'])} -> {clean(rename['new'])} ({how})")
        lines += [f"    {_change(k, e)}" for k, e in rename["changes"].items()]
    for name, changes in concepts["changed"].items():
        lines.append(f"~ concept {clean(name)}")
        lines += [f"    {_change(k, e)}" for k, e in changes.items()]
    lines += [f"~ {_change(k, e)}" for k, e in result["settings"].items()]
    if result["not_compared"]:
        n = len(result["not_compared"])
        lines.append(
            f"note: {n} concept definition{'s' * (n != 1)} could not be compared without a model"
            " (prompts or example images against a vector): pass --model to compile them"
        )
    lines.append(_verdict(result))
    return lines


def _verdict(result: dict[str, Any]) -> str:
    concepts = result["concepts"]
    counts = {
        "added": len(concepts["added"]),
        "removed": len(concepts["removed"]),
        "renamed": len(concepts["renamed"]),
        "changed": len(concepts["changed"]),
    }
    summary = ", ".join(f"{n} {what}" for what, n in counts.items() if n)
    settings = len(result["settings"])
    if settings:
        summary += (", " if summary else "") + f"{settings} setting{'s' * (settings != 1)} changed"
    if result["identical"]:
        return "identical: the policies decide identically" + (
            f" ({summary}, none of which decides anything)" if summary else ""
        )
    return f"different: the policies can decide differently ({summary})"
