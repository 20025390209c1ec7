"""The policies shipped in `policies/`: each one loads, validates and compiles offline against a
tiny model of its model's width, and compiles to exactly what its YAML says."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from click.testing import CliRunner

from moderation.cli import main
from moderation.encoder import ClipEncoder
from moderation.engine import Moderator
from moderation.synthetic import make_tiny_clip
from policy import compile_policy, load_policy
from policy.loader import check_embed_dim

SHIPPED = sorted((Path(__file__).resolve().parents[1] / "policies").glob("*.y*ml"))
# The projection width of each model a shipped policy names (facts about the published
# checkpoints, which tests cannot download): a policy naming another model must be added here.
MODEL_WIDTH = {
    "openai/clip-vit-large-patch14": 768,
    "CompVis/stable-diffusion-safety-checker": 768,
}


def is_checkpoint_ref(value) -> bool:
    return isinstance(value, dict) and "checkpoint" in value


def raw_concepts(raw: dict) -> tuple[list[dict], list[dict]]:
    """The concept and special-care mappings as the YAML file has them."""
    return raw["concepts"], (raw.get("special_care") or {}).get("concepts", [])


def uses_checkpoint(raw: dict) -> bool:
    concepts, special = raw_concepts(raw)
    return any(is_checkpoint_ref(c.get("embedding")) for c in concepts + special)


@pytest.fixture(scope="module")
def tiny_clip_768(tmp_path_factory):
    """A tiny CLIP whose projection is as wide as ViT-L/14's (768): prompts compile to [768]."""
    return make_tiny_clip(tmp_path_factory.mktemp("tiny-clip-768"), projection_dim=768)


@pytest.fixture
def tiny_model_for(tiny_clip_768, tiny_checker_dir):
    """The tiny stand-in for a shipped policy's model: a safety checker when the policy reads the
    checker's tensors (its width is the checkpoint's), else a CLIP of the model's width."""

    def pick(raw: dict) -> Path:
        return tiny_checker_dir if uses_checkpoint(raw) else tiny_clip_768

    return pick


def test_the_shipped_policies_are_found():
    assert [p.name for p in SHIPPED][:2] == ["default.yaml", "sd-safety-checker.yaml"]


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_policy_validates(path, tiny_model_for):
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    policy = load_policy(path)
    assert policy.model == raw["model"] and policy.model in MODEL_WIDTH
    check_embed_dim(policy, MODEL_WIDTH[policy.model])  # raw vectors fit the named model
    concepts, special = raw_concepts(raw)
    result = CliRunner().invoke(
        main,
        ["policy", "validate", str(path), "--model", str(tiny_model_for(raw))],
        catch_exceptions=False,
    )
    assert (result.exit_code, result.output) == (
        0,
        f"{path}: ok ({len(concepts)} concepts, {len(special)} special-care)\n",
    )


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_policy_compiles_to_what_it_says(path, tiny_model_for):
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    model = tiny_model_for(raw)
    encoder = ClipEncoder.from_pretrained(model)
    if not uses_checkpoint(raw):
        assert encoder.embed_dim == MODEL_WIDTH[raw["model"]]
    compiled = compile_policy(load_policy(path), encoder, cache=False)

    defaults = raw.get("defaults", {})
    concepts, special = raw_concepts(raw)
    care = raw.get("special_care") or {}
    assert (compiled.name, compiled.version) == (raw["policy"], str(raw["version"]))
    assert compiled.model == str(model)  # the override is recorded
    assert compiled.concept_names == tuple(c["name"] for c in concepts)
    assert compiled.special_names == tuple(c["name"] for c in special)
    assert compiled.categories == tuple(c.get("category") for c in concepts)
    assert compiled.actions == tuple(c.get("action", defaults["action"]) for c in concepts)
    assert compiled.severities == tuple(c.get("severity", defaults["severity"]) for c in concepts)
    assert compiled.review_band == pytest.approx(raw["review_band"])
    assert compiled.on_error == raw["on_error"] and compiled.compat == raw.get("compat")
    assert compiled.adjustment == pytest.approx(care.get("adjustment", 0.0))
    assert compiled.escalate == care.get("escalate")
    assert compiled.source == path.read_text(encoding="utf-8")

    def threshold(c: dict) -> torch.Tensor:
        value = c.get("threshold", defaults.get("threshold"))
        if is_checkpoint_ref(value):
            return encoder.checkpoint_tensor(value["checkpoint"])[value["row"]]
        return torch.tensor(value, dtype=torch.float32)

    def vector(c: dict) -> torch.Tensor | None:
        ref = c.get("embedding")
        return encoder.checkpoint_tensor(ref["checkpoint"])[ref["row"]] if ref else None

    for matrix, thresholds, rows in (
        (compiled.concept_matrix, compiled.thresholds, concepts),
        (compiled.special_matrix, compiled.special_thresholds, special),
    ):
        assert matrix.shape == (len(rows), encoder.embed_dim)
        assert torch.equal(thresholds, torch.stack([threshold(c) for c in rows]))
        assert torch.allclose(matrix.norm(dim=1), torch.ones(len(rows)))
        vectors = [vector(c) for c in rows]
        if all(v is not None for v in vectors):  # read from the checkpoint: exactly its rows
            assert torch.equal(matrix, F.normalize(torch.stack(vectors)))
        else:  # prompt ensembles: one distinct direction per concept
            assert len({tuple(r) for r in matrix.tolist()}) == len(rows)


def test_sd_safety_checker_policy_flags_what_the_checker_flags(tmp_path):
    """The shipped policy, compiled against a (tiny) checker, decides as diffusers' forward does."""
    from diffusers.pipelines.stable_diffusion.safety_checker import cosine_distance

    from moderation.synthetic import build_safety_checker

    checker = build_safety_checker(seed=2)
    torch.manual_seed(0)
    clip_input = torch.randn(16, 3, 224, 224)
    with torch.no_grad():
        # diffusers' own tower, so both sides score the same embedding bits
        embeds = checker.visual_projection(checker.vision_model(clip_input)[1])  # [B, D]
        # Thresholds that split the batch: concept 0 and special-care 0 at their median cosine,
        # the rest out of reach; the special-care adjustment then decides some images.
        for weights, cosines in (
            (checker.concept_embeds_weights, cosine_distance(embeds, checker.concept_embeds)),
            (
                checker.special_care_embeds_weights,
                cosine_distance(embeds, checker.special_care_embeds),
            ),
        ):
            middle = cosines[:, 0].sort().values[7:9].mean()
            weights.fill_(1.0)
            weights[0] = middle
    folder = checker.save_pretrained(tmp_path / "checker") or tmp_path / "checker"
    path = next(p for p in SHIPPED if p.name == "sd-safety-checker.yaml")
    compiled = compile_policy(load_policy(path), ClipEncoder.from_pretrained(folder), cache=False)
    # The whole checkpoint, in its order: concept sd-i is row i, nothing left out.
    assert torch.equal(compiled.concept_matrix, F.normalize(checker.concept_embeds))
    assert torch.equal(compiled.thresholds, checker.concept_embeds_weights)
    assert torch.equal(compiled.special_matrix, F.normalize(checker.special_care_embeds))
    assert torch.equal(compiled.special_thresholds, checker.special_care_embeds_weights)
    with torch.no_grad():
        _, theirs = checker(clip_input=clip_input, images=np.zeros((16, 8, 8, 3)))
    decisions = Moderator(compiled).moderate_embeddings(embeds)
    assert [d.flagged for d in decisions] == theirs
    assert any(theirs) and not all(theirs), "the batch should have flagged and clean images"
    assert any(d.special_hits for d in decisions) and not all(d.special_hits for d in decisions)
