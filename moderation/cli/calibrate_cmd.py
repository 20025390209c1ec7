"""`moderation policy calibrate`: thresholds from reviewers' verdicts and labelled example folders."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from moderation.cli.app import policy
from moderation.cli.options import db_option, echo_json, failures, format_table, json_option

DEFAULT_PRECISION = 0.9
DEFAULT_MIN_EXAMPLES = 20


def _printable(text: str) -> str:
    return text if text.isprintable() else repr(text)[1:-1]


def _positive(ctx, param, values: tuple[str, ...]) -> list[tuple[str, Path]]:
    pairs = []
    for value in values:
        concept, sep, folder = value.partition("=")
        if not sep or not concept or not folder:
            raise click.BadParameter(f"expected CONCEPT=DIR, got {value!r}", ctx, param)
        if not Path(folder).is_dir():
            raise click.BadParameter(f"{folder!r} is not a folder", ctx, param)
        pairs.append((concept, Path(folder)))
    return pairs


def _count(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _rate(value: float | None, interval: list[float] | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f} [{interval[0]:.2f}, {interval[1]:.2f}]" if interval else f"{value:.2f}"


def _row(name: str, pos: str, neg: str, which: str, m: dict) -> list[str]:
    return [
        name,
        pos,
        neg,
        f"{m['threshold']:.4g} ({which})",
        *(str(m[k]) for k in ("tp", "fp", "fn", "tn")),
        _rate(m["precision"], m["precision_ci"]),
        _rate(m["recall"], m["recall_ci"]),
        _rate(m["fpr"], m["fpr_ci"]),
    ]


def render(data: dict) -> str:
    """The text report: one row for the current threshold, one for the suggestion."""
    pol, labels, target = data["policy"], data["labels"], data["target"]
    goal = (
        f"false positive rate <= {target['max_false_positive_rate']:g}"
        if "max_false_positive_rate" in target
        else f"precision >= {target['precision']:g}"
    )
    lines = [
        f"Policy {_printable(pol['name'])} v{_printable(pol['version'])} (digest {pol['digest'][:12]}): "
        f"{labels['distinct_images']} labelled images ({labels['decisions']} reviewed decisions, "
        f"{labels['images']} folder images); target {goal}, best recall"
    ]
    if labels["skipped"]:
        skipped = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in labels["skipped"].items())
        lines.append(f"Not counted: {skipped}")
    rows, notes = [], []
    for name, c in data["concepts"].items():
        shown = _printable(name) + (" (special care)" if c["special_care"] else "")
        rows.append(_row(shown, str(c["positives"]), str(c["negatives"]), "current", c["current"]))
        if c["suggested"] is not None:
            which = "suggested" if c["suggested"]["changed"] else "keep"
            rows.append(_row("", "", "", which, c["suggested"]))
        if c["refused"]:
            notes.append(f"{shown}: no suggestion: {c['refused']}")
        extra = []
        if c["excluded_examples"]:
            extra.append(f"{c['excluded_examples']} of its example images left out")
        if c["conflicts"]:
            extra.append(f"{c['conflicts']} images with conflicting labels left out")
        if extra:
            notes.append(f"{shown}: " + "; ".join(extra))
    headers = ["CONCEPT", "POS", "NEG", "THRESHOLD", "TP", "FP", "FN", "TN"]
    headers += ["PRECISION [95% CI]", "RECALL [95% CI]", "FPR [95% CI]"]
    lines += ["", format_table(headers, rows)]
    if notes:
        lines += [""] + notes
    return "\n".join(lines)


@policy.command("calibrate")
@click.argument(
    "policy_path", metavar="POLICY", type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@db_option
@click.option(
    "--positive",
    "positives",
    multiple=True,
    metavar="CONCEPT=DIR",
    callback=_positive,
    help="Images in DIR show CONCEPT (repeatable).",
)
@click.option(
    "--negative",
    "negatives",
    multiple=True,
    metavar="DIR",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Images in DIR show none of the policy's concepts (repeatable).",
)
@click.option(
    "--target-precision",
    type=click.FloatRange(0, 1, min_open=True),
    metavar="P",
    help=f"Suggest the threshold with the best recall at precision >= P (default {DEFAULT_PRECISION}).",
)
@click.option(
    "--max-false-positive-rate",
    type=click.FloatRange(0, 1),
    metavar="F",
    help="Instead: the best recall with a false positive rate <= F.",
)
@click.option(
    "--min-examples",
    type=click.IntRange(1),
    default=DEFAULT_MIN_EXAMPLES,
    show_default=True,
    metavar="N",
    help="Refuse to suggest with fewer than N positives or N negatives.",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="NEW.yaml",
    help="Write the policy with the suggested thresholds (nothing else changes).",
)
@click.option(
    "--plot",
    "plot_dir",
    type=click.Path(file_okay=False, path_type=Path),
    metavar="DIR",
    help="Write one PNG per concept: score distributions and thresholds.",
)
@json_option
def calibrate_command(
    policy_path, db_url, positives, negatives, target_precision, max_false_positive_rate,
    min_examples, out, plot_dir, as_json,
):  # fmt: skip
    """Measure each threshold on labelled images and suggest better ones.

    Labels come from reviewed decisions in the log (--db; used when given, when
    $MODERATION_DB_URL is set, or when no folders are given) and from folders of images
    (--positive, --negative). See docs/calibration.md for what counts as a positive.
    """
    from moderation.calibration.calibrate import calibrate
    from moderation.calibration.metrics import Target

    if target_precision is not None and max_false_positive_rate is not None:
        raise click.UsageError("give --target-precision or --max-false-positive-rate, not both")
    if out is not None and policy_path.suffix == ".safetensors":
        raise click.UsageError("--out needs a YAML policy, not a compiled artifact")
    target = (
        Target(max_fpr=max_false_positive_rate)
        if max_false_positive_rate is not None
        else Target(precision=target_precision or DEFAULT_PRECISION)
    )
    use_log = bool(db_url or os.environ.get("MODERATION_DB_URL")) or not (positives or negatives)
    with failures():
        report = calibrate(
            policy_path,
            db=db_url,
            use_log=use_log,
            positives=positives,
            negatives=negatives,
            target=target,
            min_examples=min_examples,
            progress=sys.stderr.isatty(),  # the bar goes to stderr: --json output stays clean
        )
        data = report.to_dict()
        changes = {c.name: (c.special, c.suggested_threshold) for c in report.concepts if c.changed}
        if out is not None:
            from moderation.calibration.rewrite import write_policy

            write_policy(policy_path, out, changes, scored_text=report.source_text)
            data["out"] = {"file": str(out), "changed": {n: t for n, (_, t) in changes.items()}}
        if plot_dir is not None:
            from moderation.calibration.plot import write_plots

            data["plots"] = [str(p) for p in write_plots(report, plot_dir)]
    if as_json:
        echo_json(data)
        return
    click.echo(render(data))
    if out is not None:
        moved = ", ".join(
            f"{_printable(n)} {_num(next(c.threshold for c in report.concepts if c.name == n), 4)}"
            f" -> {t:.4g}"
            for n, (_, t) in changes.items()
        )
        click.echo(
            f"\nWrote {out}: "
            + (
                f"{_count(len(changes), 'threshold')} changed ({moved})"
                if changes
                else "no threshold changed"
            )
        )
    if plot_dir is not None:
        click.echo(f"Plots: {_count(len(data['plots']), 'PNG file')} in {plot_dir}")
