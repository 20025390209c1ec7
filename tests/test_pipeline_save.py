"""A pipeline saved with our checker in its slot loads back with it: same policy digest, same
flags and images on the same prompt and seed, without the policy YAML, the model folder, the
network or the database URL (which is never written)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
from contextlib import contextmanager

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline
from sqlalchemy import func, select

from moderation.errors import ModerationError
from moderation.integrations.diffusers import PolicySafetyChecker
from moderation.integrations.pretrained import MANIFEST, POLICY_FILE
from moderation.storage import db
from moderation.storage.models import DecisionRow
from moderation.synthetic import build_safety_checker, make_tiny_pipeline
from policy.compiled import CompiledPolicy
from tests.test_pipeline import generate
from tests.test_pipeline_log import write_policy

CHECKER_FILES = [
    "config.json",
    "model.safetensors",
    MANIFEST,
    POLICY_FILE,
    "preprocessor_config.json",
]


@contextmanager
def diffusers_log(caplog):
    """diffusers' own log lines (its loggers do not propagate to the root logger)."""
    library = logging.getLogger("diffusers")
    library.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING):
            yield caplog
    finally:
        library.removeHandler(caplog.handler)


def engineered_direction(decisions):
    """A direction image 0 is closer to than image 1, and the threshold halfway between them."""
    e0, e1 = (d.embedding[0] / np.linalg.norm(d.embedding[0]) for d in decisions)
    direction = (e0 - e1) / np.linalg.norm(e0 - e1)
    cos = [float(e @ direction) for e in (e0, e1)]
    assert cos[0] > cos[1] + 0.05
    return direction, (cos[0] + cos[1]) / 2


def decisions_of(checker):
    return [
        (d.verdict, d.action, d.scores.tobytes(), d.embedding.tobytes())
        for d in checker.last_decisions
    ]


def generate_capturing(pipe):
    """generate(pipe), and the (clip_input, images) the pipeline handed its checker."""
    seen = {}

    def capture(module, args, kwargs):
        seen.update({k: v.clone() for k, v in kwargs.items()})

    hook = pipe.safety_checker.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        return generate(pipe), (seen["clip_input"], seen["images"])
    finally:
        hook.remove()


def same_on_the_same_inputs(theirs, ours, inputs, flags):
    """Both checkers, called with the same clip_input and images: the same flags, images and
    decisions, bit for bit."""
    clip_input, images = inputs
    outputs = [c(clip_input=clip_input, images=images.clone()) for c in (theirs, ours)]
    assert outputs[0][1] == outputs[1][1] == flags
    assert torch.equal(outputs[0][0], outputs[1][0])
    assert decisions_of(ours) == decisions_of(theirs)


def same_pipeline_output(after, before):
    """The same flags on the same prompt and seed. The images agree to float rounding only:
    diffusers reloads the UNet and VAE with other attention kernels than the ones built here."""
    assert after.nsfw_content_detected == before.nsfw_content_detected
    assert np.allclose(after.images, before.images, atol=1e-4)


def count_rows(url) -> int:
    with db.engine_for(url).connect() as conn:
        return conn.execute(select(func.count()).select_from(DecisionRow.__table__)).scalar()


def test_a_saved_pipeline_loads_back_with_its_checker(tiny_clip_dir, tmp_path, caplog):
    model = shutil.copytree(tiny_clip_dir, tmp_path / "model")
    probe = PolicySafetyChecker.from_policy(
        write_policy(tmp_path / "probe.yaml", np.ones(32), 0.99, "blackout"),
        model=model,
        device="cpu",
    )
    pipe = make_tiny_pipeline(safety_checker=probe)
    generate(pipe)
    direction, threshold = engineered_direction(probe.last_decisions)
    policy_yaml = write_policy(tmp_path / "policy.yaml", direction, threshold, "blur")
    url = f"sqlite:///{tmp_path}/secret-name.db"
    checker = PolicySafetyChecker.from_policy(
        policy_yaml, model=model, device="cpu", db=url, held_dir=tmp_path / "held"
    )
    pipe.safety_checker = checker
    before, inputs = generate_capturing(pipe)
    assert before.nsfw_content_detected == [True, False]
    saved = tmp_path / "saved"
    pipe.save_pretrained(saved)

    index = json.loads((saved / "model_index.json").read_text())
    assert index["safety_checker"] == ["moderation.integrations.diffusers", "PolicySafetyChecker"]
    assert sorted(p.name for p in (saved / "safety_checker").iterdir()) == CHECKER_FILES
    for path in saved.rglob("*"):  # the database URL (it may hold a password) is not saved
        assert not path.is_file() or b"secret-name" not in path.read_bytes(), path
    shutil.rmtree(model)  # neither the model folder nor the policy file is needed to load
    policy_yaml.unlink()

    with caplog.at_level(logging.WARNING, logger="moderation"):
        loaded = StableDiffusionPipeline.from_pretrained(saved)
    ours = loaded.safety_checker
    assert isinstance(ours, PolicySafetyChecker) and ours.moderator.log is None
    assert (
        f"moderation: the checker saved in {saved / 'safety_checker'} logged its decisions; its "
        "database URL is not saved: call checker.log_to(URL) (pipe.safety_checker.log_to(URL)) "
        "to log again"
    ) in caplog.messages
    assert ours.policy.digest == checker.policy.digest
    assert ours.encoder.vision_model.config._attn_implementation == (
        checker.encoder.vision_model.config._attn_implementation
    )
    same_pipeline_output(generate(loaded), before)
    same_on_the_same_inputs(checker, ours, inputs, [True, False])

    # Logging after a load is the caller's to set up: one call, then every image is logged.
    other = f"sqlite:///{tmp_path}/after-load.db"
    ours.log_to(other, held_dir=tmp_path / "held", spool_dir=tmp_path / "spool")
    generate(loaded)
    assert count_rows(other) == 2
    ours.close()
    checker.close()


@pytest.fixture(scope="module")
def compat_saved(tmp_path_factory):
    """A pipeline with diffusers' checker tensors wrapped by from_checker (compat: diffusers,
    eager attention), engineered so that only image 0 fires; saved, with its output."""
    checker = build_safety_checker(seed=1)
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(1.0)
        checker.special_care_embeds_weights.fill_(1.0)
    pipe = make_tiny_pipeline(safety_checker=PolicySafetyChecker.from_checker(checker))
    generate(pipe)
    direction, threshold = engineered_direction(pipe.safety_checker.last_decisions)
    with torch.no_grad():
        checker.concept_embeds[0] = torch.from_numpy(direction)
        checker.concept_embeds_weights[0] = threshold
    pipe.safety_checker = PolicySafetyChecker.from_checker(checker)
    before, inputs = generate_capturing(pipe)
    assert before.nsfw_content_detected == [True, False]
    saved = tmp_path_factory.mktemp("compat") / "saved"
    pipe.save_pretrained(saved)
    return {
        "saved": saved,
        "before": before,
        "checker": checker,
        "ours": pipe.safety_checker,
        "inputs": inputs,
    }


def test_a_compat_checker_round_trips_bit_for_bit(compat_saved):
    loaded = StableDiffusionPipeline.from_pretrained(compat_saved["saved"])
    ours = loaded.safety_checker
    assert ours.policy.compat == "diffusers"
    assert ours.policy.digest == compat_saved["ours"].policy.digest
    assert ours.encoder.vision_model.config._attn_implementation == "eager"
    same_pipeline_output(generate(loaded), compat_saved["before"])
    same_on_the_same_inputs(compat_saved["ours"], ours, compat_saved["inputs"], [True, False])


def test_loading_with_a_checker_passed_explicitly(compat_saved, caplog):
    """diffusers checks a passed checker against the saved class and warns that its type is not
    the one StableDiffusionPipeline declares; diffusers' own checker is refused for our slot."""
    mine = compat_saved["ours"]
    with diffusers_log(caplog):
        loaded = StableDiffusionPipeline.from_pretrained(compat_saved["saved"], safety_checker=mine)
    assert loaded.safety_checker is mine
    assert any(
        m.startswith("Expected types for safety_checker: (<class 'diffusers.pipelines.stable_")
        and m.endswith("got <class 'moderation.integrations.diffusers.PolicySafetyChecker'>.")
        for m in caplog.messages
    ), caplog.messages
    with pytest.raises(ValueError, match="but should be <class 'diffusers.models.modeling_utils"):
        StableDiffusionPipeline.from_pretrained(
            compat_saved["saved"], safety_checker=compat_saved["checker"]
        )
    without = StableDiffusionPipeline.from_pretrained(compat_saved["saved"], safety_checker=None)
    assert without.safety_checker is None


def test_from_pretrained_directly_with_a_log(compat_saved, tmp_path):
    url = f"sqlite:///{tmp_path}/moderation.db"
    ours = PolicySafetyChecker.from_pretrained(
        compat_saved["saved"] / "safety_checker", db=url, metadata={"app": "batch"}
    )
    clip_input = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    _, flags = ours(clip_input=clip_input, images=torch.zeros(3, 3, 8, 8))
    assert len(flags) == 3 and count_rows(url) == 3
    assert [d.metadata for d in ours.last_decisions] == [{"app": "batch"}] * 3
    ours.close()


def saved_checker(folder):
    ours = PolicySafetyChecker.from_checker(build_safety_checker(seed=2))
    ours.save_pretrained(folder)
    return ours


def test_a_folder_that_is_not_a_checker_is_refused(tmp_path):
    with pytest.raises(ModerationError) as err:
        PolicySafetyChecker.from_pretrained(tmp_path)
    assert str(err.value) == f"{tmp_path}: not a saved PolicySafetyChecker ({MANIFEST} not found)"


def sha256_of(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def edit_manifest(folder, **changes) -> dict:
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest.update(changes)
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return manifest


def loosened_policy(ours, folder) -> CompiledPolicy:
    """Another policy (thresholds 0.5 higher) saved over the checker's own policy file."""
    fields = {f.name: getattr(ours.policy, f.name) for f in dataclasses.fields(CompiledPolicy)}
    other = CompiledPolicy(**{**fields, "thresholds": ours.policy.thresholds + 0.5, "digest": ""})
    other.save(folder / POLICY_FILE)
    return other


def refused(folder, **options) -> str:
    with pytest.raises(ModerationError) as err:
        PolicySafetyChecker.from_pretrained(folder, **options)
    return str(err.value)


def test_a_modified_checker_folder_is_refused(tmp_path):
    ours = saved_checker(tmp_path)
    saved = json.loads((tmp_path / MANIFEST).read_text())["files"][POLICY_FILE]
    loosened_policy(ours, tmp_path)
    assert refused(tmp_path) == (
        f"{tmp_path / POLICY_FILE}: sha256 {sha256_of(tmp_path / POLICY_FILE)[:12]} is not the "
        f"one the checker was saved with ({saved[:12]}): the folder was modified"
    )
    (tmp_path / MANIFEST).write_text(json.dumps({"format": 9}))
    assert refused(tmp_path) == f"{tmp_path / MANIFEST}: not a checker folder of format 2 (found 9)"


def test_a_tampered_policy_with_its_digests_rewritten_is_refused_by_a_pin(tmp_path):
    """Whoever rewrites the folder can rewrite its manifest: the caller's pin catches it."""
    ours = saved_checker(tmp_path)
    pinned = ours.policy.digest
    other = loosened_policy(ours, tmp_path)
    files = json.loads((tmp_path / MANIFEST).read_text())["files"]
    files[POLICY_FILE] = sha256_of(tmp_path / POLICY_FILE)
    edit_manifest(tmp_path, files=files, policy_digest=other.digest)
    assert PolicySafetyChecker.from_pretrained(tmp_path).policy.digest == other.digest
    assert refused(tmp_path, expect_digest=pinned) == (
        f"{tmp_path / POLICY_FILE}: policy: digest {other.digest[:12]} is not the expected "
        f"{pinned[:12]}: refusing to judge images with it"
    )
    assert PolicySafetyChecker.from_pretrained(tmp_path, expect_digest=other.digest.upper())
    assert refused(tmp_path, expect_digest=pinned[:12]) == (
        f"expected digest {pinned[:12]!r} is not a full sha256 digest (64 hex digits)"
    )


def test_swapped_tower_weights_are_refused(tmp_path):
    ours = saved_checker(tmp_path / "ours")
    PolicySafetyChecker.from_checker(build_safety_checker(seed=3)).save_pretrained(tmp_path / "b")
    weights = tmp_path / "ours" / "model.safetensors"
    shutil.copyfile(tmp_path / "b" / "model.safetensors", weights)
    assert refused(tmp_path / "ours").startswith(f"{weights}: sha256 {sha256_of(weights)[:12]} ")
    # The file digest rewritten too: the loaded tower's own digest still tells.
    files = json.loads((tmp_path / "ours" / MANIFEST).read_text())["files"]
    edit_manifest(tmp_path / "ours", files={**files, "model.safetensors": sha256_of(weights)})
    assert refused(tmp_path / "ours").startswith(f"{weights}: encoder digest ")
    # Everything rewritten: only a pin on the encoder can tell.
    theirs = json.loads((tmp_path / "b" / MANIFEST).read_text())["encoder_digest"]
    edit_manifest(tmp_path / "ours", encoder_digest=theirs)
    mine = ours.moderator.encoder.digest
    assert refused(tmp_path / "ours", expect_encoder_digest=mine) == (
        f"{weights}: encoder: digest {theirs[:12]} is not the expected {mine[:12]}: "
        "refusing to judge images with it"
    )


@pytest.mark.parametrize(
    ("key", "value", "why"),
    [
        ("image_std", [1e6, 1e6, 1e6], "image_std must be 3 numbers from 0.05 to 1.0"),
        ("image_std", [0.0, 0.3, 0.3], "image_std must be 3 numbers from 0.05 to 1.0"),
        ("image_mean", [-4, 0.5, 0.5], "image_mean must be 3 numbers from 0.0 to 1.0"),
        ("image_mean", [0.5, 0.5], "image_mean must be 3 numbers from 0.0 to 1.0"),
        ("crop_size", {"height": 4096, "width": 4096}, "crop_size must be a whole number"),
        ("crop_size", {"height": 112, "width": 112}, "crop_size 112 is not the vision tower's"),
        ("resample", 9, "resample must be a PIL filter number (0 to 5), not 9"),
        ("do_normalize", False, "do_normalize must be true"),
        ("rescale_factor", 1.0, "rescale_factor must be 1/255, not 1.0"),
    ],
)
def test_preprocessing_outside_sane_bounds_is_refused(tmp_path, key, value, why):
    saved_checker(tmp_path)
    path = tmp_path / "preprocessor_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, key: value}))
    files = json.loads((tmp_path / MANIFEST).read_text())["files"]
    edit_manifest(tmp_path, files={**files, path.name: sha256_of(path)})  # past the file check
    message = refused(tmp_path)
    assert message.startswith(f"{path}: {why}") and message.endswith(
        "; refusing to judge images with it"
    ), message


def test_a_format_1_folder_is_refused(tmp_path):
    saved_checker(tmp_path)
    edit_manifest(tmp_path, format=1)
    assert refused(tmp_path) == (
        f"{tmp_path / MANIFEST}: saved in format 1, which records no digests of the vision "
        "tower: load the checker from its policy and model and save it again"
    )


def test_decisions_carry_the_encoder_digest(tmp_path):
    ours = saved_checker(tmp_path / "saved")
    manifest = json.loads((tmp_path / "saved" / MANIFEST).read_text())
    url = f"sqlite:///{tmp_path}/moderation.db"
    loaded = PolicySafetyChecker.from_pretrained(tmp_path / "saved", db=url)
    # The same tower, whether built from diffusers' module or loaded from the saved folder.
    assert loaded.moderator.encoder.digest == ours.moderator.encoder.digest
    assert manifest["encoder_digest"] == ours.moderator.encoder.digest
    clip_input = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    loaded(clip_input=clip_input, images=torch.zeros(2, 3, 8, 8))
    assert [d.encoder_digest for d in loaded.last_decisions] == [manifest["encoder_digest"]] * 2
    loaded.close()
    with db.engine_for(url).connect() as conn:
        logged = conn.execute(select(DecisionRow.encoder_digest, DecisionRow.value_range)).all()
    assert logged == [(manifest["encoder_digest"], "-1,1")] * 2


class PassThrough(torch.nn.Module):
    def encode_image(self, pixel_values):
        return pixel_values


def test_a_checker_without_a_clip_tower_cannot_be_saved(tmp_path):
    policy = CompiledPolicy(
        name="t",
        version="1",
        model="t",
        concept_names=("a",),
        categories=(None,),
        severities=("medium",),
        actions=("blackout",),
        concept_matrix=F.normalize(torch.ones(1, 8)),
        thresholds=torch.zeros(1),
    )
    with pytest.raises(ModerationError) as err:
        PolicySafetyChecker(policy, PassThrough()).save_pretrained(tmp_path)
    assert str(err.value) == (
        "cannot save this checker: its encoder (PassThrough) is not a CLIP vision tower with a "
        "projection; build it with from_policy or from_checker"
    )


def test_from_policy_pins_the_policy_digest(tiny_clip_dir, tmp_path):
    path = write_policy(tmp_path / "p.yaml", np.ones(32), 0.99, "blackout")
    digest = PolicySafetyChecker.from_policy(path, model=tiny_clip_dir).policy.digest
    pinned = PolicySafetyChecker.from_policy(path, model=tiny_clip_dir, expect_digest=digest)
    assert pinned.policy.digest == digest
    with pytest.raises(ModerationError) as err:
        PolicySafetyChecker.from_policy(path, model=tiny_clip_dir, expect_digest="0" * 64)
    assert str(err.value) == (
        f"policy 'pipeline-log': digest {digest[:12]} is not the expected 000000000000: "
        "refusing to judge images with it"
    )
