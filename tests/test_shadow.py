"""Shadow candidates on live traffic (SQLite and PostgreSQL): logged and linked to their live
decision, never acted on, never queued, never held; refused when they do not fit the live
policy; a failing candidate leaves the live decisions and images as they are."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from sqlalchemy import select

import moderation.shadow
from moderation.cli import main
from moderation.engine import Moderator
from moderation.errors import ModerationError
from moderation.storage import DecisionLog, db
from moderation.storage.models import DecisionRow, PolicyRow, ReviewItem
from policy import CompiledPolicy, compile_policy, load_policy
from tests.policy_factory import random_policy


@pytest.fixture(scope="module")
def images():
    """Six smooth 64x64 images in [-1, 1], as a VAE decodes them."""
    torch.manual_seed(1)
    base = torch.rand(6, 3, 8, 8)
    return F.interpolate(base, size=(64, 64), mode="bilinear") * 2 - 1


def write_policy(path, model, name, concepts, extra=""):
    """A YAML policy whose concepts are given vectors: [(name, vector, action)], threshold 0.999."""
    lines = [f"policy: {name}", "version: 2", f"model: {model}", "defaults: {threshold: 0.999}"]
    lines.append("concepts:")
    for concept, vector, action in concepts:
        values = ", ".join(f"{v:.8f}" for v in vector)
        lines += [f"  - name: {concept}", f"    embedding: [{values}]", f"    action: {action}"]
    path.write_text("\n".join(lines) + "\n" + extra, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def policies(tmp_path_factory, encoder, images, tiny_clip_dir):
    """Live: image 0 blacked out, image 1 to review. Candidate: image 0 blurred, image 1 allowed,
    image 3 to review, image 4 blacked out, image 5 special care (escalate: review)."""
    folder = tmp_path_factory.mktemp("shadow-policies")
    e = encoder.embed_images(images).float().tolist()
    live = write_policy(
        folder / "live.yaml",
        tiny_clip_dir,
        "live",
        [("c0", e[0], "blackout"), ("c1", e[1], "review")],
    )
    special = ", ".join(f"{v:.8f}" for v in e[5])
    candidate = write_policy(
        folder / "candidate.yaml",
        tiny_clip_dir,
        "candidate",
        [
            ("c0", e[0], "blur"),
            ("c1", e[1], "allow"),
            ("c3", e[3], "review"),
            ("c4", e[4], "blackout"),
        ],
        "special_care:\n  adjustment: 0.0\n  escalate: review\n  concepts:\n"
        f"    - name: s5\n      embedding: [{special}]\n      threshold: 0.999\n",
    )
    tiles = write_policy(
        folder / "tiles.yaml", tiny_clip_dir, "tiles", [("c0", e[0], "blur")], "views: tiles\n"
    )
    compiled = {
        k: compile_policy(load_policy(p), encoder)
        for k, p in [("live", live), ("candidate", candidate), ("tiles", tiles)]
    }
    return {"paths": {"live": live, "candidate": candidate, "tiles": tiles}, **compiled}


def rows_of(url):
    with db.engine_for(url).connect() as conn:
        decisions = {r.id: r for r in conn.execute(select(DecisionRow.__table__))}
        items = list(conn.execute(select(ReviewItem.__table__)))
        policies = {r.digest for r in conn.execute(select(PolicyRow.digest))}
    return decisions, items, policies


def logged_moderator(policy, encoder, url, tmp_path, **kwargs):
    log = DecisionLog(url, spool_dir=tmp_path / "spool", held_dir=tmp_path / "held")
    return Moderator(policy, encoder, log=log, **kwargs)


def assert_same_decisions(a, b):
    """Bit-identical live decisions (ids and times aside)."""
    for x, y in zip(a, b, strict=True):
        assert (x.verdict, x.action, x.fired, x.special_hits) == (
            y.verdict,
            y.action,
            y.fired,
            y.special_hits,
        )
        for name in ("cosines", "scores", "special_cosines", "special_scores"):
            assert getattr(x, name).tobytes() == getattr(y, name).tobytes()


def test_shadow_decisions_are_logged_linked_never_acted_on_queued_or_held(
    db_url, tmp_path, encoder, images, policies
):
    plain = Moderator(policies["live"], encoder).moderate(images.clone())
    candidate = policies["candidate"]
    with logged_moderator(policies["live"], encoder, db_url, tmp_path, shadow=[candidate]) as m:
        result = m.moderate(images.clone(), metadata={"prompt": "p", "seed": 3})
        m.log.flush()
    # The live policy decides and acts as without a shadow: images bit for bit.
    assert torch.equal(result.images, plain.images)
    assert_same_decisions(result.decisions, plain.decisions)
    assert [d.action for d in result.decisions] == ["blackout", "review"] + ["allow"] * 4
    shadows = [s for [s] in result.shadow]
    assert [s.action for s in shadows] == ["blur", "allow", "allow", "review", "blackout", "review"]
    assert shadows[5].special_hits == ("s5",)
    assert not any(s.needs_review for s in shadows)

    decisions, items, registered = rows_of(db_url)
    assert len(decisions) == 12
    assert registered == {policies["live"].digest, candidate.digest}
    for live, shadow in zip(result.decisions, shadows, strict=True):
        row, srow = decisions[live.decision_id], decisions[shadow.decision_id]
        assert row.shadow_of is None and srow.shadow_of == live.decision_id == shadow.shadow_of
        assert srow.policy_digest == candidate.digest and srow.model_id == candidate.model
        assert (srow.verdict, srow.action) == (shadow.verdict, shadow.action)
        assert srow.embedding is None and row.embedding is not None  # the live row holds it
        assert srow.held_path is None
        assert (srow.created_at, srow.image_sha256, srow.meta, srow.views) == (
            row.created_at,
            row.image_sha256,
            row.meta,
            row.views,
        )
        assert srow.image_sha256 is not None and srow.meta == {"prompt": "p", "seed": 3}
    # Review items: exactly the live policy's (image 1), none of the candidate's (3 and 5).
    assert [i.decision_id for i in items] == [result.decisions[1].decision_id]
    assert len(list((tmp_path / "held").rglob("*.png"))) == 1


def test_without_stored_embeddings_and_with_several_views(db_url, tmp_path, encoder, policies):
    """store_embeddings=False; non-square images judged on several views (cover)."""
    torch.manual_seed(4)
    tall = F.interpolate(torch.rand(3, 3, 8, 4), size=(128, 64), mode="bilinear") * 2 - 1
    candidate = policies["candidate"]
    m = logged_moderator(
        policies["live"], encoder, db_url, tmp_path, shadow=[candidate], store_embeddings=False
    )
    with m:
        result = m.moderate(tall.clone())
        m.log.flush()
    alone = Moderator(candidate, encoder).moderate(tall.clone())
    assert torch.equal(result.images, Moderator(policies["live"], encoder).moderate(tall).images)
    decisions, _, _ = rows_of(db_url)
    assert len(decisions) == 6
    for live, [shadow], own in zip(result.decisions, result.shadow, alone.decisions, strict=True):
        assert live.views is not None and len(live.views) > 1  # several views an image
        assert shadow.views == live.views == own.views
        # What the candidate decides in the shadow is what it would decide live.
        assert (shadow.verdict, shadow.action, shadow.fired) == (own.verdict, own.action, own.fired)
        np.testing.assert_allclose(shadow.cosines, own.cosines, atol=1e-6)
        assert shadow.concept_views.tolist() == own.concept_views.tolist()
        assert decisions[live.decision_id].embedding is None
        assert decisions[shadow.decision_id].shadow_of == live.decision_id


def test_candidates_that_do_not_fit_are_refused(encoder, policies, tmp_path):
    live, candidate = policies["live"], policies["candidate"]
    narrow = CompiledPolicy(
        name="narrow",
        version="1",
        model=live.model,
        concept_names=("a",),
        categories=(None,),
        severities=("high",),
        actions=("blur",),
        concept_matrix=F.normalize(torch.randn(1, 16)),
        thresholds=torch.tensor([0.5]),
    )
    other = dataclasses.replace(candidate, model="other/model", digest="")
    for misfit, words in [
        (narrow, "16-wide embeddings"),
        (other, "compiled for model 'other/model'"),
        (policies["tiles"], "views: tiles"),
    ]:
        with pytest.raises(ModerationError, match=f"shadow candidate '{misfit.name}'.*{words}"):
            Moderator(live, encoder, shadow=[misfit])
    with pytest.raises(ModerationError, match="given twice"):
        Moderator(live, encoder, shadow=[candidate, candidate])
    with pytest.raises(ModerationError, match="views: tiles"):
        Moderator.from_policy(policies["paths"]["live"], shadow=[policies["paths"]["tiles"]])
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ModerationError, match="shadow candidate .*missing.yaml"):
        Moderator.from_policy(policies["paths"]["live"], shadow=[missing])


def test_a_failing_candidate_leaves_live_decisions_and_images_intact(
    db_url, tmp_path, encoder, images, policies, monkeypatch, caplog
):
    plain = Moderator(policies["live"], encoder).moderate(images.clone())

    def broken(*args, **kwargs):
        raise RuntimeError("candidate exploded")

    monkeypatch.setattr(moderation.shadow.ShadowCandidates, "_decide", broken)
    m = logged_moderator(
        policies["live"], encoder, db_url, tmp_path, shadow=[policies["candidate"]]
    )
    with m:
        result = m.moderate(images.clone())
        m.log.flush()
    assert torch.equal(result.images, plain.images)
    assert_same_decisions(result.decisions, plain.decisions)
    assert result.unrecorded == [] and result.log_error is None
    shadows = [s for [s] in result.shadow]
    assert {(s.verdict, s.action) for s in shadows} == {("error", "blackout")}
    assert all("candidate exploded" in s.error for s in shadows)
    assert "scoring 1 shadow candidates failed" in caplog.text
    decisions, items, _ = rows_of(db_url)
    assert len(decisions) == 12 and len(items) == 1  # recorded as errors; none queued


def test_live_errors_embeddings_and_fail_shadow_too(
    tmp_path, encoder, images, policies, monkeypatch
):
    live, candidate = policies["live"], policies["candidate"]
    m = Moderator(live, encoder, shadow=[candidate])
    batch = images[:3].clone()
    batch[1, 0, 5, 5] = float("nan")
    result = m.moderate(batch)
    [bad] = result.shadow[1]
    assert result.decisions[1].verdict == "error"
    assert (bad.verdict, bad.action, bad.error) == (
        "error",
        candidate.on_error,
        result.decisions[1].error,
    )
    assert result.shadow[0][0].verdict != "error"

    embeddings = encoder.embed_images(images).float()
    decisions = m.moderate_embeddings(embeddings)
    assert [d.shadows[0].action for d in decisions] == [
        "blur",
        "allow",
        "allow",
        "review",
        "blackout",
        "review",
    ]
    failed = m.fail(["unreadable file"])
    assert (failed[0].shadows[0].verdict, failed[0].shadows[0].error) == (
        "error",
        "unreadable file",
    )
    assert failed[0].shadows[0].shadow_of == failed[0].decision_id

    def broken(pixel_values):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(m.encoder, "encode_image", broken)
    result = m.moderate(images[:2].clone())
    assert [s.verdict for [s] in result.shadow] == ["error", "error"]
    assert "CUDA out of memory" in result.shadow[0][0].error


def test_moderator_from_policy_compiles_yaml_candidates_with_the_live_model(policies):
    m = Moderator.from_policy(policies["paths"]["live"], shadow=[policies["paths"]["candidate"]])
    [candidate] = m.shadow_policies
    assert candidate.digest == policies["candidate"].digest
    assert m.to("cpu").shadow_policies[0].device.type == "cpu"


# -- the diffusers checker ----------------------------------------------------------------------


def test_diffusers_checker_logs_shadows_keeps_them_through_log_to_and_saving(
    db_url, tmp_path, policies
):
    from moderation.integrations.diffusers import PolicySafetyChecker
    from moderation.synthetic import make_tiny_pipeline

    paths = policies["paths"]
    checker = PolicySafetyChecker.from_policy(
        paths["live"],
        shadow=[paths["candidate"]],
        device="cpu",
        db=db_url,
        held_dir=tmp_path / "held",
        spool_dir=tmp_path / "spool",
    )
    pipe = make_tiny_pipeline(safety_checker=checker)
    run = dict(
        num_inference_steps=2, num_images_per_prompt=2, height=64, width=64, output_type="np"
    )
    out = pipe("a dolphin", generator=torch.Generator().manual_seed(0), **run)
    plain = PolicySafetyChecker.from_policy(paths["live"], device="cpu")
    pipe.safety_checker = plain
    reference = pipe("a dolphin", generator=torch.Generator().manual_seed(0), **run)
    assert np.array_equal(out.images, reference.images)
    assert_same_decisions(checker.last_decisions, plain.last_decisions)
    [[a], [b]] = checker.last_shadow_decisions
    assert a.policy.digest == policies["candidate"].digest
    checker.moderator.log.flush()
    decisions, _, _ = rows_of(db_url)
    assert decisions[a.decision_id].shadow_of == checker.last_decisions[0].decision_id
    assert decisions[b.decision_id].shadow_of == checker.last_decisions[1].decision_id

    checker.log_to(db_url, held_dir=tmp_path / "held", spool_dir=tmp_path / "spool")
    assert [p.digest for p in checker.moderator.shadow_policies] == [policies["candidate"].digest]
    checker.to("cpu")
    assert checker.moderator.shadow_policies[0].device.type == "cpu"
    checker.save_pretrained(tmp_path / "saved")
    loaded = PolicySafetyChecker.from_pretrained(tmp_path / "saved")
    assert [p.digest for p in loaded.moderator.shadow_policies] == [policies["candidate"].digest]
    checker.close()


def test_diffusers_parity_holds_with_a_shadow_candidate():
    """diffusers' own forward, ours, and ours with a (wider) shadow candidate: the same bits."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    from moderation.integrations.diffusers import PolicySafetyChecker
    from tests.test_diffusers_parity import (
        PassThrough,
        compiled_from_rows,
        edge_thresholds,
        fake_checker,
        run_diffusers,
    )

    g = torch.Generator().manual_seed(5)
    batch, dim = 24, 16
    embeddings = torch.randn(dim, generator=g) + 0.3 * torch.randn(batch, dim, generator=g)
    rows, special = torch.randn(60, dim, generator=g), torch.randn(9, dim, generator=g)
    thresholds = edge_thresholds(embeddings, rows, [0.0, 0.01], 5)
    special_thresholds = edge_thresholds(embeddings, special, [0.0, 0.01], 105)
    forward = StableDiffusionSafetyChecker.forward.__get__(
        fake_checker(rows, thresholds, special, special_thresholds)
    )
    images = torch.rand(batch, 3, 8, 8, generator=g)
    theirs_images, flags, _ = run_diffusers(forward, embeddings, images.clone())
    policy = compiled_from_rows(rows, thresholds, special, special_thresholds)
    candidate = compiled_from_rows(  # more concepts: another matrix shape, thresholds moved
        torch.cat([rows, torch.randn(40, dim, generator=g)]),
        torch.cat([thresholds - 0.01, torch.full((40,), 0.1)]),
        special,
        special_thresholds,
    )
    plain = PolicySafetyChecker(policy, PassThrough())
    ours = PolicySafetyChecker(policy, PassThrough(), shadow=[candidate])
    plain_images, plain_flags = plain(clip_input=embeddings, images=images.clone())
    our_images, our_flags = ours(clip_input=embeddings, images=images.clone())
    assert our_flags == plain_flags == flags
    assert torch.equal(our_images, theirs_images) and torch.equal(plain_images, theirs_images)
    assert_same_decisions(ours.last_decisions, plain.last_decisions)
    assert all(len(s) == 1 for s in ours.last_shadow_decisions)


# -- moderation check --shadow -------------------------------------------------------------------


def test_check_shadow_end_to_end(db_url, tmp_path, policies):
    from moderation.demo import sample_images

    photos = tmp_path / "photos"
    sample_images(photos, n=3)
    paths = policies["paths"]

    def check(*extra):
        args = ["check", str(photos), "--policy", str(paths["live"]), "--db", db_url, *extra]
        return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)

    plain = check("--out", tmp_path / "plain", "--no-log")
    assert plain.exit_code == 0, plain.output
    result = check("--shadow", paths["candidate"], "--out", tmp_path / "out", "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    decisions, items, _ = rows_of(db_url)
    assert len(decisions) == 6 and items == []
    for row in rows:
        [shadow] = row["shadows"]  # renamed from "shadow" (CHANGELOG, issue 14)
        assert shadow["policy"]["name"] == "candidate"  # renamed from "candidate"
        assert shadow["policy"]["digest"] == policies["candidate"].digest
        assert shadow["shadow_of"] == row["decision_id"] and shadow["recorded"] is True
        assert decisions[shadow["decision_id"]].shadow_of == row["decision_id"]
        assert {"verdict", "action", "fired"} <= set(shadow)
    for png in (tmp_path / "plain").iterdir():  # --out images are the live policy's alone
        assert (tmp_path / "out" / png.name).read_bytes() == png.read_bytes()

    text = check("--shadow", paths["candidate"])
    assert text.exit_code == 0, text.output
    digest = policies["candidate"].digest[:12]
    assert f"shadow candidate v2 ({digest}): 3 shadow decisions logged;" in text.stdout
    bad = check("--shadow", paths["tiles"])
    assert bad.exit_code == 1
    # One error line (a model-loading progress bar may precede it when other tests enabled it).
    (error,) = [line for line in bad.stderr.splitlines() if line.startswith("Error:")]
    assert "views: tiles" in error and "Traceback" not in bad.stderr
    assert bad.stderr.endswith(error + "\n")


def shadow_policy(g, name, n, s, **rules):
    """A random policy of n concepts (random actions) and s special-care ones, width 32."""
    return random_policy(
        n, s, 32, generator=g, name=name, names=name, special_names=f"{name}-s", actions="random",
        threshold=0.3, special_threshold=0.15, special_spread=0.05, **rules,
    )  # fmt: skip


@pytest.mark.parametrize("with_views", [False, True])
def test_fused_candidates_decide_as_each_would_alone(with_views):
    """K candidates in one product decide what each decides as a live policy (scores up to
    float rounding): thresholds, special care and escalation, review band, margin, top concept."""
    g = torch.Generator().manual_seed(3)
    live = shadow_policy(g, "live", 4, 1)
    candidates = [
        shadow_policy(g, "a", 7, 2, adjustment=0.05, escalate="review", review_band=0.05),
        shadow_policy(g, "b", 3, 0),
        shadow_policy(g, "c", 12, 1, escalate="blur", review_band=0.2),
    ]
    embeddings = torch.randn(20, 32, generator=g)
    embeddings[4, 3] = float("nan")  # images that cannot be scored
    embeddings[7, 0] = float("inf")
    owners = views = None
    if with_views:
        owners = torch.arange(10).repeat_interleave(2)
        views = [[{"frame": 0, "box": [0, 0, 1, 1]}] * 2 for _ in range(10)]
    m = Moderator(live, shadow=candidates)
    assert m.shadows.fused is not None
    decisions = m.moderate_embeddings(embeddings, owners=owners, views=views)
    seen = set()
    for k, candidate in enumerate(candidates):
        alone = Moderator(candidate).moderate_embeddings(embeddings, owners=owners, views=views)
        for d, own in zip(decisions, alone, strict=True):
            s = d.shadows[k]
            assert (s.verdict, s.action, s.fired, s.special_hits, s.top_concept) == (
                own.verdict,
                own.action,
                own.fired,
                own.special_hits,
                own.top_concept,
            )
            np.testing.assert_allclose(s.scores, own.scores, atol=1e-6)
            np.testing.assert_allclose(s.special_scores, own.special_scores, atol=1e-6)
            # None (an image that could not be scored) only where the candidate alone says so
            assert s.margin == (None if own.margin is None else pytest.approx(own.margin, abs=1e-6))
            assert s.adjustment == own.adjustment
            if with_views:
                assert s.concept_views.tolist() == own.concept_views.tolist()
            seen.add(s.action)
            seen.update("special care" for _ in s.special_hits)
    assert {"allow", "review", "special care"} < seen  # the candidates' rules are exercised
