"""import-sd-checker: checker checkpoints (any layout, any row count) become policy YAML + tensors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from moderation.cli import main
from moderation.integrations.sd_checker import (
    CheckpointError,
    float32_text,
    import_sd_checker,
    read_checker_tensors,
)
from moderation.synthetic import build_safety_checker


def invoke(*args):
    return CliRunner().invoke(main, ["policy", "import-sd-checker", *map(str, args)])


def same_bits(a, b) -> bool:
    a, b = (np.asarray(x.detach() if torch.is_tensor(x) else x, np.float32) for x in (a, b))
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def check_import(checkpoint, out, checker):
    """The YAML names every row with its exact threshold; the embeddings file holds raw rows."""
    doc = yaml.safe_load(out.read_text())
    n_concepts, n_special = checker.concept_embeds.shape[0], checker.special_care_embeds.shape[0]
    assert doc["compat"] == "diffusers" and doc["review_band"] == 0
    assert doc["model"] == str(checkpoint)
    assert doc["special_care"]["adjustment"] == 0.01
    assert doc["special_care"]["escalate"] == "allow"
    concepts, special = doc["concepts"], doc["special_care"]["concepts"]
    assert [c["name"] for c in concepts] == [f"sd-{i}" for i in range(n_concepts)]
    assert {c["action"] for c in concepts} == {"blackout"}
    assert [c["embedding"] for c in concepts] == [
        {"file": out.stem + ".safetensors", "tensor": "concept_embeds", "row": i}
        for i in range(n_concepts)
    ]
    assert [c["embedding"] for c in special] == [
        {"file": out.stem + ".safetensors", "tensor": "special_care_embeds", "row": i}
        for i in range(n_special)
    ]
    assert same_bits([c["threshold"] for c in concepts], checker.concept_embeds_weights)
    assert same_bits([c["threshold"] for c in special], checker.special_care_embeds_weights)
    tensors = load_file(out.with_suffix(".safetensors"))
    assert torch.equal(tensors["concept_embeds"], checker.concept_embeds)
    assert torch.equal(tensors["special_care_embeds"], checker.special_care_embeds)


def test_tiny_checker(tiny_checker_dir, tmp_path):
    out = tmp_path / "sd.yaml"
    result = invoke(tiny_checker_dir, "--out", out)
    assert result.exit_code == 0, result.output
    assert "17 concepts, 3 special-care concepts" in result.output
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    check_import(
        tiny_checker_dir, out, StableDiffusionSafetyChecker.from_pretrained(tiny_checker_dir)
    )


@pytest.mark.parametrize("n_concepts, n_special", [(5, 2), (40, 0)])
def test_any_number_of_rows(tmp_path, n_concepts, n_special):
    checker = build_safety_checker(n_concepts=n_concepts, n_special=n_special, seed=n_concepts)
    checker.save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "p.yaml"
    result = invoke(tmp_path / "ckpt", "--out", out, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert (data["concepts"], data["special_care"]) == (n_concepts, n_special)
    check_import(tmp_path / "ckpt", out, checker)


def test_published_key_layout(tmp_path):
    """The published checkpoint nests the tower as vision_model.vision_model.*."""
    checker = build_safety_checker(seed=3)
    checker.save_pretrained(tmp_path / "current")
    state = load_file(tmp_path / "current" / "model.safetensors")
    published = {
        (
            k.replace("vision_model.", "vision_model.vision_model.", 1)
            if k.startswith("vision_model.")
            else k
        ): v
        for k, v in state.items()
    }
    assert any(k.startswith("vision_model.vision_model.") for k in published)
    (tmp_path / "published").mkdir()
    save_file(published, tmp_path / "published" / "model.safetensors")
    (tmp_path / "published" / "config.json").write_bytes(
        (tmp_path / "current" / "config.json").read_bytes()
    )
    out = tmp_path / "p.yaml"
    import_sd_checker(tmp_path / "published", out)
    check_import(tmp_path / "published", out, checker)


def test_pytorch_bin_and_pipeline_folder(tmp_path):
    checker = build_safety_checker(seed=4, n_concepts=7, n_special=1)
    folder = tmp_path / "pipe" / "safety_checker"
    folder.mkdir(parents=True)
    torch.save(checker.state_dict(), folder / "pytorch_model.bin")
    tensors = read_checker_tensors(tmp_path / "pipe")
    assert tensors.source == str(folder / "pytorch_model.bin")
    assert torch.equal(tensors.concept_embeds, checker.concept_embeds)
    assert torch.equal(tensors.special_thresholds, checker.special_care_embeds_weights)


def test_sharded_checkpoint(tmp_path):
    checker = build_safety_checker(seed=5, n_concepts=4, n_special=2)
    state = {k: v.contiguous() for k, v in checker.state_dict().items()}
    first = {k: v for k, v in state.items() if "embeds" not in k}
    second = {k: v for k, v in state.items() if "embeds" in k}
    save_file(first, tmp_path / "model-00001-of-00002.safetensors")
    save_file(second, tmp_path / "model-00002-of-00002.safetensors")
    weight_map = {k: "model-00001-of-00002.safetensors" for k in first}
    weight_map |= {k: "model-00002-of-00002.safetensors" for k in second}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    tensors = read_checker_tensors(tmp_path)
    assert torch.equal(tensors.concept_thresholds, checker.concept_embeds_weights)
    assert torch.equal(tensors.special_embeds, checker.special_care_embeds)


@pytest.mark.parametrize(
    "value", [0.0, -0.0, 1.0, 0.1865, -0.0123, 1e-8, 3.0e38, float(np.float32(0.1)), 0.05 * np.pi]
)
def test_thresholds_read_back_as_the_same_float32(value):
    text = float32_text(value)
    assert same_bits(yaml.safe_load(f"t: {text}")["t"], value)
    assert "e" not in text


def test_random_thresholds_round_trip():
    values = np.random.default_rng(0).normal(0, 0.1, 2000).astype(np.float32)
    parsed = yaml.safe_load("[" + ", ".join(float32_text(v) for v in values) + "]")
    assert same_bits(parsed, values)


def test_not_a_checker_folder(tiny_clip_dir, tmp_path):
    result = invoke(tiny_clip_dir, "--out", tmp_path / "p.yaml")
    assert result.exit_code == 1
    assert "not a StableDiffusionSafetyChecker checkpoint: none of concept_embeds" in result.output
    assert not (tmp_path / "p.yaml").exists()


def test_missing_tensors(tmp_path):
    save_file(
        {"concept_embeds": torch.ones(2, 4), "concept_embeds_weights": torch.ones(2)},
        tmp_path / "model.safetensors",
    )
    result = invoke(tmp_path, "--out", tmp_path / "p.yaml")
    assert result.exit_code == 1
    assert result.output.strip().endswith(
        "model.safetensors: missing tensors: special_care_embeds, special_care_embeds_weights"
    )


@pytest.mark.parametrize(
    "tensors, message",
    [
        (
            {"concept_embeds_weights": torch.ones(3)},
            "concept_embeds_weights has shape (3,), expected one threshold per row of "
            "concept_embeds (2)",
        ),
        (
            {"special_care_embeds": torch.ones(1, 5)},
            "special_care_embeds rows are 5 wide, concept_embeds rows 4",
        ),
        (
            {"concept_embeds": torch.full((2, 4), float("nan"))},
            "concept_embeds holds NaN or infinite values",
        ),
        ({"concept_embeds": torch.ones(4)}, "concept_embeds must be [rows, width], not (4,)"),
    ],
)
def test_bad_tensors(tmp_path, tensors, message):
    good = {
        "concept_embeds": torch.ones(2, 4),
        "concept_embeds_weights": torch.ones(2),
        "special_care_embeds": torch.ones(1, 4),
        "special_care_embeds_weights": torch.ones(1),
    }
    save_file(good | tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError) as info:
        read_checker_tensors(tmp_path / "model.safetensors")
    assert str(info.value) == f"{tmp_path / 'model.safetensors'}: {message}"


def test_folder_without_weights_and_missing_path(tmp_path):
    result = invoke(tmp_path, "--out", tmp_path / "p.yaml")
    assert result.exit_code == 1
    assert "no model.safetensors or pytorch_model.bin here or in safety_checker/" in result.output
    result = invoke(tmp_path / "nope", "--out", tmp_path / "p.yaml")
    assert result.exit_code == 1 and "nope: no such file or folder" in result.output


def test_existing_output_needs_force(tiny_checker_dir, tmp_path):
    out = tmp_path / "p.yaml"
    assert invoke(tiny_checker_dir, "--out", out).exit_code == 0
    result = invoke(tiny_checker_dir, "--out", out)
    assert result.exit_code == 1 and "exists; pass --force to overwrite it" in result.output
    assert invoke(tiny_checker_dir, "--out", out, "--force").exit_code == 0


def test_written_policy_compiles_to_the_checkers_tensors(tiny_checker_dir, tmp_path):
    """The imported file loads and compiles as it is, to exactly the checker's rows and thresholds."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    from moderation.encoder import ClipEncoder
    from policy import compile_policy, load_policy

    out = tmp_path / "p.yaml"
    import_sd_checker(tiny_checker_dir, out)
    source = load_policy(out)
    compiled = compile_policy(
        source, ClipEncoder.from_pretrained(source.resolved_model), cache=False
    )
    checker = StableDiffusionSafetyChecker.from_pretrained(tiny_checker_dir)
    assert compiled.concept_names == tuple(f"sd-{i}" for i in range(17))
    assert torch.equal(compiled.concept_matrix, F.normalize(checker.concept_embeds))
    assert same_bits(compiled.thresholds, checker.concept_embeds_weights)
    assert torch.equal(compiled.special_matrix, F.normalize(checker.special_care_embeds))
    assert same_bits(compiled.special_thresholds, checker.special_care_embeds_weights)
    assert (compiled.compat, compiled.adjustment, compiled.escalate) == ("diffusers", 0.01, "allow")


def test_relative_checkpoint_is_written_relative_to_the_policy(tmp_path, monkeypatch):
    """`model:` must still name the checker when the policy is loaded from another folder."""
    from policy.loader import load_policy

    build_safety_checker(seed=6, n_concepts=2, n_special=1).save_pretrained(tmp_path / "ckpt")
    (tmp_path / "policies").mkdir()
    monkeypatch.chdir(tmp_path)
    result = invoke("ckpt/model.safetensors", "--out", "policies/sd.yaml")
    assert result.exit_code == 0, result.output
    assert yaml.safe_load((tmp_path / "policies" / "sd.yaml").read_text())["model"] == "../ckpt"
    monkeypatch.chdir(tmp_path / "policies")
    assert load_policy("sd.yaml").resolved_model == str((tmp_path / "ckpt").resolve())
