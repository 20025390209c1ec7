"""LDM3D hands its checker colour + depth: the colour is judged and acted on, depth kept."""

from __future__ import annotations

import numpy as np
import pytest

from moderation.integrations.diffusers import PolicySafetyChecker
from moderation.synthetic import build_safety_checker
from tests.pipelines_factory import identical, ldm3d, one_concept_policy


@pytest.fixture(scope="module")
def setup():
    theirs = build_safety_checker(seed=1)
    tiny = ldm3d(safety_checker=theirs)
    tiny.pipe.set_progress_bar_config(disable=True)
    return tiny, theirs


def run(tiny, checker, output_type="np"):
    tiny.pipe.safety_checker = checker
    return tiny.pipe(**tiny.call_args(output_type=output_type))


def splitting_checker(tiny, seed):
    """diffusers' checker with concept 0's threshold between the 4 images' cosines (the others
    can never fire), so that it flags some images and not others."""
    import torch

    theirs = build_safety_checker(seed=seed)
    probe = PolicySafetyChecker.from_checker(theirs)
    run(tiny, probe)
    cosines = sorted(float(d.cosines[0]) for d in probe.last_decisions)
    weights = torch.ones_like(theirs.concept_embeds_weights)
    weights[0] = (cosines[1] + cosines[2]) / 2
    theirs.concept_embeds_weights.data = weights
    theirs.special_care_embeds_weights.data.fill_(1.0)
    return theirs


@pytest.mark.parametrize("seed", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_flags_are_diffusers_flags(setup, seed):
    tiny, _ = setup
    theirs = splitting_checker(tiny, seed)
    expected = run(tiny, theirs)
    flagged = [i for i, f in enumerate(expected.nsfw_content_detected) if f]
    assert 0 < len(flagged) < 4, "the test needs flagged and unflagged images"
    ours = PolicySafetyChecker.from_checker(theirs)  # its own concepts, `compat: diffusers`
    got = run(tiny, ours)
    assert got.nsfw_content_detected == expected.nsfw_content_detected
    assert {d.verdict for d in ours.last_decisions} <= {"allow", "flag"}  # no error
    for i in range(4):  # both black out the colour of the same images
        assert np.array_equal(got.rgb[i], expected.rgb[i])
    assert np.all(got.rgb[flagged] == 0)
    unflagged = [i for i in range(4) if i not in flagged]
    assert np.array_equal(got.depth[unflagged], expected.depth[unflagged])


def test_a_blur_policy_blurs_the_colour_and_keeps_the_depth(setup):
    tiny, _ = setup
    bare = run(tiny, None)
    ours = PolicySafetyChecker.from_checker(setup[1], one_concept_policy("tiny", -1.0, "blur"))
    got = run(tiny, ours)
    assert got.nsfw_content_detected == [True] * 4
    assert [d.action for d in ours.last_decisions] == ["blur"] * 4
    for i in range(4):
        assert not np.array_equal(got.rgb[i], bare.rgb[i])
        assert got.rgb[i].std() > 0  # blurred, not black
    np.testing.assert_allclose(got.depth, bare.depth, atol=1e-6)


def test_allowing_everything_changes_nothing(setup):
    tiny, _ = setup
    bare = run(tiny, None, "pil")
    ours = PolicySafetyChecker.from_checker(setup[1], one_concept_policy("tiny", 1.0, "blur"))
    got = run(tiny, ours, "pil")
    assert identical(got.rgb, bare.rgb) and identical(got.depth, bare.depth)
