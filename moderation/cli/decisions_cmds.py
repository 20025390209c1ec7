"""`moderation decisions ...`: browse the decision log and explain any decision."""

from __future__ import annotations

import click

from moderation.cli.app import main
from moderation.cli.decisions_text import list_table, render_decision
from moderation.cli.options import (
    command_errors,
    db_option,
    echo_json,
    json_option,
    since_option,
    top_option,
    until_option,
)
from moderation.decisions.browser import MAX_LIST, DecisionBrowser
from policy.vocabulary import ACTIONS, VERDICTS


@main.group(short_help="Browse and explain logged decisions.")
def decisions() -> None:
    """Browse and explain logged decisions ("why was my image blacked out?")."""


def _browser(db_url: str | None) -> DecisionBrowser:
    """The log of an existing database: a mistyped SQLite path must not create an empty one."""
    return DecisionBrowser(db_url)


@decisions.command("list")
@since_option
@until_option
@click.option("--verdict", metavar="[" + "|".join(VERDICTS) + "]", help="Only this verdict.")
@click.option("--action", metavar="[" + "|".join(ACTIONS) + "]", help="Only this action.")
@click.option("--concept", metavar="NAME", help="Only decisions where this concept fired.")
@click.option("--policy", metavar="NAME|DIGEST", help="Policy name or digest prefix.")
@click.option("--user", metavar="U", help='Only decisions whose metadata has "user": U.')
@click.option(
    "--limit",
    type=click.IntRange(1, MAX_LIST),
    default=50,
    show_default=True,
    help="At most N rows.",
)
@click.option(
    "--shadow",
    is_flag=True,
    help="List shadow decisions (candidate policies scored on live traffic) instead of live ones.",
)
@json_option
@db_option
@command_errors
def list_cmd(since, until, verdict, action, concept, policy, user, limit, shadow, as_json, db_url):
    """List logged decisions, newest first.

    Live decisions only, unless --shadow: then only the shadow decisions that candidate
    policies made on the same images (never acted on; `decisions show` links the two).
    Every filter is an exact match; --policy also takes a digest prefix.
    """
    browser = _browser(db_url)
    entries = browser.list(
        since=since,
        until=until,
        verdict=verdict,
        action=action,
        concept=concept,
        policy=policy,
        user=user,
        limit=limit,
        shadow=shadow,
    )
    if as_json:
        if not entries:
            refuse_filters_naming_nothing(browser.engine, concept=concept, policy=policy)
        echo_json(entries)
        return
    if not entries:
        refuse_filters_naming_nothing(browser.engine, concept=concept, policy=policy)
        click.echo("No shadow decisions match." if shadow else "No decisions match.")
        return
    click.echo(list_table(entries, shadow=shadow))


@decisions.command("show")
@click.argument("decision_id", metavar="ID")
@top_option()
@json_option
@db_option
@command_errors
def show_cmd(decision_id, top, as_json, db_url):
    """Explain one decision: why it got its action.

    ID is the decision id that `check --json`, `Decision.decision_id` and the diffusers
    checker's `last_decisions` give, or a unique prefix or suffix of at least 8 characters
    (ids are time-ordered: the last characters tell one batch's decisions apart). Shows every
    concept's cosine, threshold, score and margin (nearest first), the view that gave each
    cosine, special care, the review band, which concept's action won, the policy, the caller's
    metadata, the review history and its labels, and shadow decisions.
    """
    browser = _browser(db_url)
    shown = browser.show(decision_id, top=top or None)
    if as_json:
        echo_json(shown)
        return
    click.echo(render_decision(shown))


def refuse_filters_naming_nothing(engine, **filters) -> None:
    """A --concept or --policy that no logged policy has is a mistake: one Error line, exit 1."""
    from moderation.review.names import unknown_filter

    problem = unknown_filter(engine, **filters)
    if problem:
        raise click.ClickException(problem)
