"""`moderation decisions list` and `show` on a log the engine wrote, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner

from moderation.cli import main
from moderation.cli.app import main as app_main
from moderation.review.explain import decision_labels
from moderation.storage import db
from tests.decisions_factory import HOSTILE_USER, RANDOM_ID, TWINS, VIEWS, Logged, seed
from tests.review_factory import row_counts

CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # anything but \n and \t


@pytest.fixture(scope="module")
def logged(module_db_url) -> Logged:
    return seed(module_db_url)


def run(*args, code: int = 0):
    result = CliRunner().invoke(main, ["decisions", *map(str, args)], catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result


def listed(logged: Logged, *args) -> list[str]:
    rows = json.loads(run("list", "--db", logged.url, "--json", *args).stdout)
    return [r["decision_id"] for r in rows]


def one_line_error(result, *needles: str) -> None:
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def newest_first(logged: Logged, *roles: str) -> list[str]:
    ids = [logged.ids[r] for r in roles]
    return sorted(ids, key=logged.order.index, reverse=True)


def test_known_values_are_the_engines():
    from moderation.cli import decisions_cmds
    from policy import vocabulary

    assert (decisions_cmds.VERDICTS, decisions_cmds.ACTIONS) == (
        vocabulary.VERDICTS,
        vocabulary.ACTIONS,
    )


@pytest.mark.parametrize("command", ["list", "show"])
def test_help(command):
    out = run(command, "--help").output
    assert out.startswith(f"Usage: main decisions {command}")
    assert "--json" in out and "--db URL" in out
    assert "decisions" in app_main.commands


FILTERS = [
    ((), ["dolphin", "clean", "band", "minor", "weapons", "numeric", "views", "error"]),
    (("--verdict", "review"), ["band", "minor", "weapons"]),
    (("--verdict", "error"), ["error"]),
    (("--action", "blackout"), ["dolphin", "error"]),
    (("--action", "blur"), ["views"]),
    (("--concept", "nudity"), ["dolphin", "views"]),
    (("--concept", "weapons"), ["weapons"]),
    (("--concept", "minor"), []),  # special care is not a fired concept
    (("--user", "alice"), ["dolphin", "band"]),
    (("--user", "42"), ["numeric"]),  # a number in the metadata matches its text
    (("--user", "%"), ["weapons"]),  # exact: not a LIKE pattern
    (("--user", "_"), []),
    (("--user", HOSTILE_USER), ["minor"]),
    (("--since", "2024-05-01T12:02:00Z", "--until", "2024-05-01 12:04"), ["band", "minor"]),
    (("--since", "2024-05-01T12:06:00"), ["views", "error"]),
    (("--until", "2024-05-01"), []),  # midnight UTC: before every decision
    (("--since", "2024-05-01T14:00:00+02:00", "--until", "2024-05-01T12:01:00Z"), ["dolphin"]),
    (("--verdict", "flag", "--user", "alice"), ["dolphin"]),
    (("--policy", "nsfw-basic", "--action", "allow"), ["clean", "numeric"]),
    (("--policy", "nsfw-candidate"), []),  # the candidate decided shadow rows only
]


def test_a_policy_name_matches_whole(logged):
    # `nsfw` is the start of two logged policies' names, not a name: a mistake, named (issue 19)
    result = run("list", "--db", logged.url, "--policy", "nsfw", code=1)
    one_line_error(result, "no policy 'nsfw'", "nsfw-basic, nsfw-candidate")


@pytest.mark.parametrize(("args", "roles"), FILTERS, ids=[" ".join(a) for a, _ in FILTERS])
def test_list_filters_return_exactly_the_expected_decisions(logged, args, roles):
    assert listed(logged, *args) == newest_first(logged, *roles)


def test_list_policy_digest_prefix_and_limit(logged):
    every = newest_first(logged, *logged.ids)
    assert listed(logged, "--policy", logged.live_digest[:10]) == every
    assert listed(logged, "--policy", logged.live_digest) == every
    assert listed(logged, "--limit", "3") == every[:3]
    assert listed(logged, "--policy", logged.candidate_digest[:8]) == []


def test_list_shadow_decisions_instead_of_live_ones(logged):
    shadows = [logged.shadows[r] for r in ("views", "band", "dolphin")]  # newest first
    assert listed(logged, "--shadow") == shadows
    assert listed(logged, "--shadow", "--policy", logged.candidate_digest[:12]) == shadows
    assert listed(logged, "--shadow", "--policy", "nsfw-basic") == []
    # nudity moved to 0.35: only the views image (0.5) still fires it under the candidate
    assert listed(logged, "--shadow", "--concept", "nudity") == [logged.shadows["views"]]
    rows = json.loads(run("list", "--db", logged.url, "--json", "--shadow").stdout)
    assert [r["shadow_of"] for r in rows] == [logged.ids[r] for r in ("views", "band", "dolphin")]


@pytest.mark.parametrize("option", ["--concept", "--policy", "--user"])
@pytest.mark.parametrize("value", ["' OR 1=1 --", "%", "_%", '"); DROP TABLE decisions; --'])
def test_hostile_filter_values_change_nothing(logged, option, value):
    engine = db.engine_for(logged.url)
    before = row_counts(engine)
    if option == "--user":  # users are not named anywhere: a value matching none lists none
        expected = newest_first(logged, "weapons") if value == "%" else []
        assert listed(logged, option, value) == expected
    else:  # a concept or policy no logged policy has is a mistake, named in one line (issue 19)
        what = option.lstrip("-")
        result = run("list", "--db", logged.url, "--json", option, value, code=1)
        one_line_error(result, f"no {what} ")
    assert row_counts(engine) == before


def test_list_json_fields_and_text_table(logged):
    (row,) = json.loads(
        run("list", "--db", logged.url, "--json", "--user", "alice", "--verdict", "flag").stdout
    )
    # Renamed (CHANGELOG, issue 14): policy_name/version/digest and model_id -> policy{...};
    # user -> metadata (all of it).
    assert row == {
        "decision_id": logged.ids["dolphin"],
        "created_at": "2024-05-01T12:00:00+00:00",
        "verdict": "flag",
        "action": "blackout",
        "top_concept": "gore",
        "fired": ["nudity", "gore"],
        "margin": pytest.approx(0.15, abs=1e-6),
        "policy": {
            "name": "nsfw-basic",
            "version": "1",
            "digest": logged.live_digest,
            "model": "tiny-clip",
        },
        "metadata": {"prompt": "a dolphin", "seed": 1, "user": "alice"},
        "error": None,
        "shadow_of": None,
    }
    text = run("list", "--db", logged.url).stdout
    lines = text.splitlines()
    assert lines[0].split() == [
        "ID", "CREATED", "(UTC)", "VERDICT", "ACTION", "CONCEPTS", "POLICY", "USER"
    ]  # fmt: skip
    assert len(lines) == 1 + len(logged.ids)  # one line per decision: the hostile user too
    dolphin = next(line for line in lines if line.startswith(logged.ids["dolphin"]))
    assert re.split(r" {2,}", dolphin) == [
        logged.ids["dolphin"], "2024-05-01 12:00:00", "flag", "blackout", "gore (+nudity)",
        "nsfw-basic@1", "alice",
    ]  # fmt: skip
    assert not CONTROL.search(text)
    assert "eve\\x1b[2J\\nforged line" in text
    assert "No decisions match." in run("list", "--db", logged.url, "--user", "nobody").stdout


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (("--verdict", "blocked"), ['unknown verdict "blocked"', "allow, flag, review, error"]),
        (
            ("--action", "Blur"),
            ['unknown action "Blur"', "allow, review, blur, pixelate, blackout"],
        ),
        (("--since", "yesterday"), ['invalid since "yesterday"']),
        (("--until", "2024-13-01"), ['invalid until "2024-13-01"']),
        (("--since", "\x1b[2Jsoon"), ['invalid since "\\x1b[2Jsoon"']),
        (("--concept", " "), ["concept filter is empty"]),
        (("--policy", ""), ["policy filter is empty"]),
    ],
)
def test_list_bad_values_are_one_line(logged, args, needles):
    one_line_error(run("list", "--db", logged.url, *args, code=1), *needles)


def test_missing_database_is_one_line_and_creates_nothing(tmp_path):
    missing = tmp_path / "typo.db"
    for args in (("list",), ("show", TWINS[0])):
        result = run(*args, "--db", f"sqlite:///{missing}", code=1)
        one_line_error(result, f"no database at {missing}", "moderation db upgrade")
    assert not missing.exists()


def show(logged: Logged, given: str) -> dict:
    return json.loads(run("show", given, "--db", logged.url, "--json").stdout)


def test_show_dolphin_names_the_winning_concept_nearest_first(logged):
    shown = show(logged, logged.ids["dolphin"])
    # The decision document (CHANGELOG, issue 14): `decision` is spread over the top level,
    # `winner` is `action_reason`, `shadow` is `shadow_of` and `shadows`.
    assert set(shown) == {
        "decision_id", "created_at", "policy", "verdict", "action", "action_reason", "fired",
        "margin", "top_concept", "concepts", "concepts_listed", "concepts_total",
        "special_care", "review_band", "metadata", "image_sha256", "views", "error",
        "shadow_of", "shadows", "recorded", "held_path", "held_file", "review", "labels",
        "value_range", "encoder_digest",
    }  # fmt: skip
    assert [c["name"] for c in shown["concepts"]] == ["gore", "nudity", "weapons"]
    gore = shown["concepts"][0]
    assert gore["cosine"] == pytest.approx(0.45, abs=1e-6)
    assert gore["threshold"] == pytest.approx(0.30)
    assert gore["score"] == pytest.approx(0.15, abs=1e-6)
    assert gore["margin"] == pytest.approx(0.15, abs=1e-6)
    assert gore["fired"] and gore["view"] is None and gore["index"] == 1
    # Both fired; gore's blackout is the decision's action, nudity's blur is not.
    assert shown["action_reason"] == {
        "rule": "concept", "concept": "gore", "text": "concept gore (its action is blackout)",
    }  # fmt: skip
    assert shown["views"] is None and shown["review"] is None and shown["labels"] is None
    assert shown["policy"] == {
        "name": "nsfw-basic", "version": "1", "digest": logged.live_digest,
        "model": "tiny-clip", "compat": None, "review_band": pytest.approx(0.02),
        "adjustment": pytest.approx(0.01), "escalate": "review",
    }  # fmt: skip
    assert shown["metadata"] == {"prompt": "a dolphin", "seed": 1, "user": "alice"}
    assert shown["shadow_of"] is None
    (shadow,) = shown["shadows"]
    assert {k: shadow[k] for k in ("decision_id", "verdict", "action", "fired", "top_concept")} == {
        "decision_id": logged.shadows["dolphin"],
        "verdict": "flag",
        "action": "blackout",
        "fired": ["gore"],
        "top_concept": "gore",
    }
    assert (shadow["policy"]["name"], shadow["policy"]["version"]) == ("nsfw-candidate", "2")
    assert shadow["policy"]["digest"] == logged.candidate_digest


def test_show_rejected_band_decision_has_its_review_history_and_labels(logged):
    shown = show(logged, logged.ids["band"])
    # The reason now names the nearest concept within the band (was None).
    assert shown["action_reason"]["rule"] == "review_band"
    assert shown["action_reason"]["concept"] == "nudity"
    assert shown["review_band"] == {"band": pytest.approx(0.02), "concepts": ["nudity"]}
    (item,) = shown["review"]["items"]
    assert (item["id"], item["status"], item["reviewer"], item["reason"]) == (
        logged.item_of["band"], "rejected", "rita", "it does show nudity"
    )  # fmt: skip
    labels = {"shows": ["nudity"], "missed": ["nudity"], "false_alarms": [], "explicit": True}
    assert item["labels"] == labels
    assert [(e["event"], e["actor"]) for e in shown["review"]["events"]] == [
        ("created", "system"),
        ("rejected", "rita"),
    ]
    with db.engine_for(logged.url).connect() as conn:
        assert shown["labels"] == decision_labels(conn, logged.ids["band"])
    assert shown["labels"] == {
        "item_id": item["id"],
        "verdict": "rejected",
        "reviewer": "rita",
        **labels,
    }
    # The candidate's nudity threshold (0.35) puts 0.24 outside its band: allowed.
    (candidate,) = shown["shadows"]
    assert (candidate["verdict"], candidate["action"]) == ("allow", "allow")


def test_show_special_care_escalation(logged):
    shown = show(logged, logged.ids["minor"])
    assert shown["action_reason"]["rule"] == "special_care" and shown["action"] == "review"
    care = shown["special_care"]
    assert care["hits"] == ["minor"] and care["adjustment"] == pytest.approx(0.01)
    (minor,) = care["concepts"]
    assert minor["hit"] and minor["cosine"] == pytest.approx(0.30, abs=1e-6)
    assert minor["threshold"] == pytest.approx(0.20)
    # every concept score carries the adjustment: 0.1 - threshold + 0.01
    assert [c["name"] for c in shown["concepts"]] == ["nudity", "weapons", "gore"]
    assert shown["concepts"][0]["score"] == pytest.approx(-0.14, abs=1e-6)
    assert shown["concepts"][0]["margin"] == pytest.approx(-0.15, abs=1e-6)
    assert [i["status"] for i in shown["review"]["items"]] == ["pending"]
    assert shown["labels"] is None


def test_show_top_lists_the_nearest_concepts(logged):
    shown = json.loads(
        run("show", logged.ids["dolphin"], "--top", 1, "--db", logged.url, "--json").stdout
    )
    assert [c["name"] for c in shown["concepts"]] == ["gore"] and shown["concepts_total"] == 3
    text = run("show", logged.ids["dolphin"], "--top", 2, "--db", logged.url).stdout
    assert "Concepts (2 nearest of 3):" in text and "weapons" not in text


def test_show_says_which_view_fired(logged):
    shown = show(logged, logged.ids["views"])
    assert shown["views"] == VIEWS
    nudity = shown["concepts"][0]
    assert nudity["name"] == "nudity" and nudity["fired"]
    assert nudity["view"] == {"index": 1, "frame": 0, "box": VIEWS[1]["box"]}
    assert shown["concepts"][1]["view"]["index"] == 0  # all-zero cosines: the first view
    assert shown["special_care"]["concepts"][0]["view"]["index"] == 1
    assert shown["action_reason"]["concept"] == "nudity"
    text = run("show", logged.ids["views"], "--db", logged.url).stdout
    assert "1 frame 0 box 32,0,64,32" in text and "Views: 2" in text
    assert "one view" in run("show", logged.ids["dolphin"], "--db", logged.url).stdout


def test_show_error_and_allowed_decisions(logged):
    shown = show(logged, logged.ids["error"])
    assert (shown["action"], shown["action_reason"]["rule"]) == ("blackout", "error")
    assert shown["action_reason"]["concept"] is None
    assert "non-finite embedding" in shown["action_reason"]["text"]
    assert all(c["cosine"] is None and c["score"] is None for c in shown["concepts"])
    assert shown["error"] == "non-finite embedding"
    assert show(logged, logged.ids["clean"])["action_reason"]["rule"] == "nothing_fired"
    assert show(logged, logged.ids["weapons"])["action_reason"]["concept"] == "weapons"


def test_show_shadow_decision_links_to_its_live_decision(logged):
    shown = show(logged, logged.shadows["dolphin"][-12:])  # a suffix works for shadows too
    assert shown["decision_id"] == logged.shadows["dolphin"]
    assert (shown["shadow_of"], shown["shadows"]) == (logged.ids["dolphin"], [])
    assert shown["policy"]["name"] == "nsfw-candidate"
    assert [c["name"] for c in shown["concepts"] if c["fired"]] == ["gore"]
    text = run("show", logged.shadows["dolphin"], "--db", logged.url).stdout
    assert f"Shadow decision of live decision {logged.ids['dolphin']}" in text


def test_show_by_prefix_and_lookup_errors(logged):
    full = logged.ids["dolphin"]
    # Ids are time-ordered: one batch's share their first characters, so their last ones name
    # them; a random id of an older log is named by its first 8 as before.
    assert show(logged, full[-8:])["decision_id"] == full
    assert show(logged, RANDOM_ID[:8])["decision_id"] == RANDOM_ID
    assert show(logged, f"  {full}  ")["decision_id"] == full
    assert show(logged, TWINS[1])["decision_id"] == TWINS[1]
    result = run("show", "abcdef12", "--db", logged.url, code=1)
    one_line_error(result, 'prefix "abcdef12" is ambiguous', TWINS[0], TWINS[1])
    one_line_error(run("show", full[:7], "--db", logged.url, code=1), "at least 8 characters")
    missing = "00000000-0000-4000-8000-000000000000"
    one_line_error(run("show", missing, "--db", logged.url, code=1), f'no decision "{missing}"')
    for hostile in ("%%%%%%%%", "________", "' OR 1=1 --", "abcdef12%"):
        one_line_error(run("show", hostile, "--db", logged.url, code=1), "no decision")
    result = run("show", "\x1b[2J\x07bad-id-here", "--db", logged.url, code=1)
    one_line_error(result, "\\x1b[2J\\x07bad-id-here")


def test_show_text_is_readable_and_escapes_metadata(logged):
    text = run("show", logged.ids["minor"], "--db", logged.url).stdout
    assert not CONTROL.search(text)
    assert not any(line.startswith("forged line") for line in text.splitlines())
    assert "verdict review, action review: set by special care escalation (minor)" in text
    assert "Special care: hits minor; adjustment applied +0.010" in text
    dolphin = run("show", logged.ids["dolphin"], "--db", logged.url).stdout
    assert "verdict flag, action blackout: set by concept gore" in dolphin
    lines = dolphin.splitlines()
    first = lines.index("Concepts (nearest first):")
    assert [line.split()[0] for line in lines[first + 2 : first + 5]] == [
        "gore",
        "nudity",
        "weapons",
    ]
    band = run("show", logged.ids["band"], "--db", logged.url).stdout
    assert "set by the review band (nudity within 0.02)" in band
    assert "item 1: rejected by rita: it does show nudity" in band.replace(
        f"item {logged.item_of['band']}:", "item 1:"
    )
    assert "labels: shows nudity; missed nudity; false alarms - (named by the reviewer)" in band


def test_decision_id_from_check_json_pastes_into_show(tmp_path, tiny_clip_dir):
    from moderation.demo import sample_images

    sample_images(tmp_path / "photos", n=1)
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        f"policy: cli-test\nmodel: {tiny_clip_dir}\n"
        "concepts:\n  - name: anything\n    prompts: [a photo]\n    threshold: -1\n"
        "    action: blackout\n"
    )
    url = f"sqlite:///{tmp_path / 'm.db'}"
    args = ["check", str(tmp_path / "photos"), "--policy", str(policy), "--db", url, "--json"]
    result = CliRunner().invoke(main, [*args, "--user", "u1"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (checked,) = json.loads(result.stdout)
    try:
        shown = json.loads(run("show", checked["decision_id"], "--db", url, "--json").stdout)
    finally:
        db.dispose(url)
    assert shown["decision_id"] == checked["decision_id"]
    assert shown["metadata"]["user"] == "u1"
    winner = shown["action_reason"]
    assert (winner["rule"], winner["concept"], shown["action"]) == (
        "concept", "anything", "blackout"
    )  # fmt: skip
    assert shown["policy"]["digest"] == checked["policy"]["digest"]
