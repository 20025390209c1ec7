"""ClipEncoder: loading CLIP and safety-checker checkpoints offline, and what it computes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from moderation.encoder import ClipEncoder, check_device, default_dtype, resolve_device
from moderation.errors import EncoderError, ModerationError
from moderation.preprocess import CLIP_MEAN, CLIP_STD
from moderation.synthetic import build_safety_checker, make_safety_checker, make_tiny_clip

CHECKER_TENSORS = {
    "concept_embeds": (17, 32),
    "concept_embeds_weights": (17,),
    "special_care_embeds": (3, 32),
    "special_care_embeds_weights": (3,),
}


@pytest.fixture(scope="module")
def pixels():
    torch.manual_seed(1)
    return torch.randn(2, 3, 224, 224)  # [B, 3, 224, 224] preprocessed


@pytest.fixture(scope="module")
def clip_encoder(tiny_clip_dir):
    return ClipEncoder.from_pretrained(tiny_clip_dir)


@pytest.fixture(scope="module")
def checker_encoder(tiny_checker_dir):
    return ClipEncoder.from_pretrained(tiny_checker_dir)


def diffusers_checker(folder):
    """The checker as a diffusers pipeline loads it (default attention)."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    return StableDiffusionSafetyChecker.from_pretrained(folder).eval()


def diffusers_embeds(checker, pixels):
    """What diffusers' checker computes before its cosines."""
    with torch.no_grad():
        return checker.visual_projection(checker.vision_model(pixels)[1])


def test_clip_checkpoint_attributes(clip_encoder, tiny_clip_dir):
    enc = clip_encoder
    assert enc.model_id == str(tiny_clip_dir)
    assert enc.kind == "clip"
    assert enc.embed_dim == 32
    assert enc.device == torch.device("cpu") and enc.dtype == torch.float32
    assert enc.has_text_tower
    assert (enc.image_size, enc.image_mean, enc.image_std) == (224, CLIP_MEAN, CLIP_STD)


def test_clip_image_embeddings_are_get_image_features(clip_encoder, tiny_clip_dir, pixels):
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    with torch.inference_mode():
        expected = model.get_image_features(pixel_values=pixels).pooler_output
    got = clip_encoder.encode_image(pixels)
    assert got.shape == (2, 32) and got.dtype == torch.float32
    assert torch.equal(got, expected)


def test_text_embeddings_are_get_text_features(clip_encoder, tiny_clip_dir):
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    prompts = ["a photo of a cat", "nude body", "a gory photo with blood and wounds"]
    got = clip_encoder.encode_text(prompts)
    assert got.shape == (3, 32) and got.dtype == torch.float32 and got.device.type == "cpu"
    for i, prompt in enumerate(prompts):
        tokens = clip_encoder.tokenizer([prompt], return_tensors="pt")
        with torch.inference_mode():
            expected = model.get_text_features(**tokens).pooler_output[0]
        assert torch.equal(got[i], expected)
    # A prompt's embedding does not depend on the other prompts encoded with it.
    assert torch.equal(clip_encoder.encode_text(prompts[1:2])[0], got[1])
    assert clip_encoder.encode_text([]).shape == (0, 32)


def test_checker_image_embeddings_are_diffusers(checker_encoder, tiny_checker_dir, pixels):
    assert checker_encoder.kind == "sd-safety-checker"
    assert not checker_encoder.has_text_tower
    assert checker_encoder.embed_dim == 32
    expected = diffusers_embeds(diffusers_checker(tiny_checker_dir), pixels)
    assert torch.equal(checker_encoder.encode_image(pixels), expected)


def test_checker_published_key_layout_loads_the_same(tmp_path, tiny_checker_dir, pixels):
    """The published checkpoint nests the vision tower: `vision_model.vision_model.*`."""
    weights = load_file(str(tiny_checker_dir / "model.safetensors"))
    published = {
        ("vision_model." + k if k.startswith("vision_model.") else k): v for k, v in weights.items()
    }
    assert any(k.startswith("vision_model.vision_model.") for k in published)
    folder = tmp_path / "published"
    folder.mkdir()
    shutil.copy(tiny_checker_dir / "config.json", folder / "config.json")
    save_file(published, str(folder / "model.safetensors"), metadata={"format": "pt"})
    enc = ClipEncoder.from_pretrained(folder)
    expected = diffusers_embeds(diffusers_checker(tiny_checker_dir), pixels)
    assert torch.equal(enc.encode_image(pixels), expected)
    for name in CHECKER_TENSORS:
        assert torch.equal(enc.checkpoint_tensor(name), weights[name])


def test_checkpoint_tensors_as_stored(checker_encoder, tiny_checker_dir):
    weights = load_file(str(tiny_checker_dir / "model.safetensors"))
    for name, shape in CHECKER_TENSORS.items():
        tensor = checker_encoder.checkpoint_tensor(name)
        assert tensor.shape == shape and tensor.dtype == torch.float32
        assert torch.equal(tensor, weights[name])


def test_checkpoint_tensors_any_number_of_rows_and_float16(tmp_path, pixels):
    checker = build_safety_checker(seed=3, n_concepts=5, n_special=2).half()
    checker.save_pretrained(tmp_path)
    enc = ClipEncoder.from_pretrained(tmp_path)
    stored = load_file(str(tmp_path / "model.safetensors"))
    assert stored["concept_embeds"].dtype == torch.float16
    assert enc.checkpoint_tensor("concept_embeds").shape == (5, 32)
    assert enc.checkpoint_tensor("special_care_embeds_weights").shape == (2,)
    for name in CHECKER_TENSORS:
        tensor = enc.checkpoint_tensor(name)
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, stored[name].float())
    assert enc.encode_image(pixels).shape == (2, 32)


def test_unknown_checkpoint_tensor_lists_what_exists(checker_encoder, clip_encoder):
    with pytest.raises(EncoderError) as info:
        checker_encoder.checkpoint_tensor("concept_embed")
    assert str(info.value) == (
        f"model {checker_encoder.model_id} has no tensor 'concept_embed'; it has: "
        "concept_embeds, concept_embeds_weights, special_care_embeds, special_care_embeds_weights"
    )
    assert clip_encoder.checkpoint_tensor("logit_scale").shape == ()


def test_checker_without_text_tower_says_what_to_do(checker_encoder):
    with pytest.raises(EncoderError) as info:
        checker_encoder.encode_text(["a photo of a cat"])
    message = str(info.value)
    assert "has no text tower" in message
    assert "text_model=" in message and "`embedding:`" in message
    assert isinstance(info.value, ModerationError)


def test_text_model_gives_a_checker_a_text_tower(tiny_checker_dir, tiny_clip_dir, clip_encoder):
    enc = ClipEncoder.from_pretrained(tiny_checker_dir, text_model=tiny_clip_dir)
    assert enc.kind == "sd-safety-checker" and enc.has_text_tower
    prompts = ["a photo of a cat", "a dog"]
    assert torch.equal(enc.encode_text(prompts), clip_encoder.encode_text(prompts))
    assert enc.text_fingerprint == clip_encoder.text_fingerprint


def test_a_bare_text_tower_with_projection_is_a_text_model(
    tmp_path, tiny_checker_dir, clip_encoder
):
    """CLIPTextModelWithProjection (the text half of a CLIP, saved on its own) works too."""
    from transformers import CLIPModel, CLIPTextModelWithProjection

    clip = CLIPModel.from_pretrained(clip_encoder.model_id)
    text_config = clip.config.text_config
    text_config.projection_dim = clip.config.projection_dim
    tower = CLIPTextModelWithProjection(text_config)
    tower.text_model.load_state_dict(clip.text_model.state_dict())
    tower.text_projection.load_state_dict(clip.text_projection.state_dict())
    folder = tmp_path / "text-tower"
    tower.save_pretrained(folder)
    clip_encoder.tokenizer.save_pretrained(folder)
    enc = ClipEncoder.from_pretrained(tiny_checker_dir, text_model=folder)
    prompts = ["a photo", "a painting of a dolphin"]
    # Same weights; the standalone tower may pick another attention kernel, so not bit for bit.
    torch.testing.assert_close(enc.encode_text(prompts), clip_encoder.encode_text(prompts))
    assert enc.max_text_tokens == clip_encoder.max_text_tokens == 77


def test_text_model_must_match_the_projection_width(tmp_path, tiny_checker_dir):
    narrow = make_tiny_clip(tmp_path / "narrow", projection_dim=16)
    with pytest.raises(EncoderError, match="projects text to 16 dimensions .* images to 32"):
        ClipEncoder.from_pretrained(tiny_checker_dir, text_model=narrow)


def test_text_model_needs_a_text_tower(tiny_checker_dir):
    with pytest.raises(EncoderError, match="has no CLIP text tower"):
        ClipEncoder.from_pretrained(tiny_checker_dir, text_model=tiny_checker_dir)


def test_pipeline_folder_and_its_safety_checker_subfolder(tmp_path, pixels):
    from transformers import CLIPImageProcessor

    from moderation.synthetic import make_tiny_pipeline

    checker = build_safety_checker(seed=4)
    processor = CLIPImageProcessor(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    make_tiny_pipeline(safety_checker=checker, feature_extractor=processor).save_pretrained(
        tmp_path
    )
    expected = diffusers_embeds(diffusers_checker(tmp_path / "safety_checker"), pixels)
    for folder in (tmp_path / "safety_checker", tmp_path):
        enc = ClipEncoder.from_pretrained(folder)
        assert enc.kind == "sd-safety-checker"
        assert torch.equal(enc.encode_image(pixels), expected)
        # The pipeline keeps the checker's preprocessing beside it, in feature_extractor/.
        assert enc.image_mean == (0.5, 0.5, 0.5) and enc.image_size == 224


def test_preprocessor_config_is_read(tmp_path):
    folder = make_safety_checker(tmp_path / "checker")
    config = {"crop_size": {"height": 224, "width": 224}, "image_mean": [0.1, 0.2, 0.3]}
    (folder / "preprocessor_config.json").write_text(json.dumps(config))
    enc = ClipEncoder.from_pretrained(folder)
    assert enc.image_size == 224
    assert enc.image_mean == (0.1, 0.2, 0.3) and enc.image_std == CLIP_STD
    before = enc.digest
    # An absurd std (every image would embed the same) is refused wherever a model loads from.
    config["image_std"] = [1e6, 1e6, 1e6]
    (folder / "preprocessor_config.json").write_text(json.dumps(config))
    with pytest.raises(EncoderError) as err:
        ClipEncoder.from_pretrained(folder)
    assert str(err.value) == (
        f"{folder / 'preprocessor_config.json'}: image_std must be 3 numbers from 0.05 to 1.0, "
        "not [1000000.0, 1000000.0, 1000000.0]; refusing to judge images with it"
    )
    # The digest covers the preprocessing: another valid mean is another encoder.
    config["image_std"], config["image_mean"] = list(CLIP_STD), [0.1, 0.2, 0.4]
    (folder / "preprocessor_config.json").write_text(json.dumps(config))
    assert ClipEncoder.from_pretrained(folder).digest != before


def test_an_unreadable_or_odd_json_file_names_the_model_and_the_file(tmp_path):
    folder = make_safety_checker(tmp_path / "checker")
    preprocessor = folder / "preprocessor_config.json"
    preprocessor.write_text("{not json")
    with pytest.raises(EncoderError, match=r"^model .*: cannot read .*preprocessor_config\.json: "):
        ClipEncoder.from_pretrained(folder)
    preprocessor.write_text("[1, 2]")
    with pytest.raises(EncoderError) as err:
        ClipEncoder.from_pretrained(folder)
    assert str(err.value) == f"{preprocessor}: not a preprocessing config (expected a JSON object)"
    preprocessor.unlink()
    (folder / "config.json").write_text("[]")
    with pytest.raises(EncoderError, match=r"config\.json does not hold a JSON object$"):
        ClipEncoder.from_pretrained(folder)


def test_vision_only_clip_checkpoint(tmp_path, pixels):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from moderation.synthetic import TINY

    torch.manual_seed(5)
    model = CLIPVisionModelWithProjection(
        CLIPVisionConfig(**TINY, patch_size=32, image_size=224, projection_dim=32)
    ).eval()
    model.save_pretrained(tmp_path)
    enc = ClipEncoder.from_pretrained(tmp_path)
    assert enc.kind == "clip" and not enc.has_text_tower
    with torch.inference_mode():
        assert torch.equal(enc.encode_image(pixels), model(pixel_values=pixels).image_embeds)


@pytest.mark.parametrize(
    "dtype", [torch.bfloat16, torch.float16], ids=lambda d: str(d).removeprefix("torch.")
)
def test_half_precision_dtype(tiny_checker_dir, checker_encoder, pixels, dtype):
    enc = ClipEncoder.from_pretrained(tiny_checker_dir, device="cpu", dtype=dtype)
    got = enc.encode_image(pixels)
    assert got.dtype == dtype
    assert enc.checkpoint_tensor("concept_embeds").dtype == torch.float32
    expected = checker_encoder.encode_image(pixels)
    assert torch.nn.functional.cosine_similarity(got.float(), expected).min() > 0.99


def test_default_device_and_dtype():
    assert default_dtype(torch.device("cuda")) == torch.float16
    assert default_dtype(torch.device("cpu")) == torch.float32
    assert resolve_device("cpu", None) == (torch.device("cpu"), torch.float32)
    assert resolve_device("cpu", torch.bfloat16) == (torch.device("cpu"), torch.bfloat16)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device(None, None)[0].type == expected


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("banana", "device 'banana': not a torch device (expected e.g. cpu, cuda, cuda:1 or mps)"),
        ("", "device '': not a torch device (expected e.g. cpu, cuda, cuda:1 or mps)"),
        ("meta", "device meta: holds no data, so it cannot run a model"),
    ],
)
def test_unknown_devices_are_named(device, message):
    with pytest.raises(EncoderError) as info:
        ClipEncoder.from_pretrained("never/loaded", device=device)
    assert str(info.value) == message


def test_a_device_this_machine_lacks_is_named():
    if torch.cuda.is_available():  # then ask for one GPU more than there are
        count = torch.cuda.device_count()
        device = f"cuda:{count}"
        message = (
            f"device {device}: this machine has {count} CUDA device(s) (cuda:0 to cuda:{count - 1})"
        )
    else:
        device = "cuda"
        why = (
            f"this torch build ({torch.__version__}) has no CUDA support"
            if torch.version.cuda is None
            else "no CUDA GPU is visible"
        )
        message = f"device cuda: CUDA is not available ({why}); use cpu"
    with pytest.raises(EncoderError) as info:
        check_device(device)
    assert str(info.value) == message


def test_encode_image_rejects_unprocessed_input(checker_encoder):
    with pytest.raises(EncoderError, match=r"needs preprocessed pixels \[B, 3, 224, 224\]"):
        checker_encoder.encode_image(torch.zeros(224, 224, 3))


def test_embed_images_is_clip_preprocess_then_encode_image(checker_encoder):
    from moderation.images import clip_preprocess

    torch.manual_seed(2)
    images = torch.rand(2, 3, 80, 96)  # [0, 1]
    expected = checker_encoder.encode_image(clip_preprocess(images))
    assert torch.equal(checker_encoder.embed_images(images), expected)
    assert torch.equal(checker_encoder.embed_images(images * 2 - 1, value_range="-1,1"), expected)
    assert checker_encoder.embed_images(images).shape == (2, 32)


def test_embed_images_uses_the_checkpoint_preprocessing(tmp_path):
    from moderation.images import clip_preprocess

    folder = make_safety_checker(tmp_path / "checker")
    config = {"crop_size": 224, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    (folder / "preprocessor_config.json").write_text(json.dumps(config))
    enc = ClipEncoder.from_pretrained(folder)
    images = torch.rand(1, 3, 64, 64)
    pixels = clip_preprocess(images, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert torch.equal(enc.embed_images(images), enc.encode_image(pixels))


def test_embed_images_non_finite_input_gives_nan_rows(checker_encoder):
    images = torch.rand(2, 3, 64, 64)
    images[1, 0, 3, 3] = float("nan")
    embeds = checker_encoder.embed_images(images)
    assert bool(torch.isfinite(embeds[0]).all()) and bool(torch.isnan(embeds[1]).all())


def write_config(folder, architectures):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": architectures}))
    return folder


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda tmp: tmp / "nowhere", "model {}: no such folder"),
        (lambda tmp: tmp, "model {}: {}/config.json not found (not a checkpoint)"),
        (
            lambda tmp: write_config(tmp / "bert", ["BertModel"]),
            "model {}: unsupported architecture (BertModel); expected one of "
            "StableDiffusionSafetyChecker, CLIPModel, CLIPVisionModelWithProjection",
        ),
        (
            lambda tmp: write_config(tmp / "none", None),
            "model {}: unsupported architecture (no architectures)",
        ),
    ],
    ids=["missing-folder", "no-config", "unknown-architecture", "no-architectures"],
)
def test_bad_model_folders_are_named(tmp_path, make, message):
    folder = make(tmp_path)
    with pytest.raises(EncoderError) as info:
        ClipEncoder.from_pretrained(folder)
    assert str(info.value).startswith(message.format(folder, folder))


def test_offline_hub_id_without_cache_is_named():
    from huggingface_hub import constants

    with pytest.raises(EncoderError) as info:
        ClipEncoder.from_pretrained("nobody/no-such-clip")  # conftest sets HF_HUB_OFFLINE=1
    assert str(info.value) == (
        "model nobody/no-such-clip: not a local folder, and not in the Hugging Face cache "
        f"({constants.HF_HUB_CACHE}); HF_HUB_OFFLINE is set, so it cannot be downloaded: "
        "download it once with HF_HUB_OFFLINE unset, or pass --model FOLDER with a local copy "
        "of the checkpoint"
    )


def _offline_env(tmp_path, **extra):
    """The environment of a fresh process with an empty Hugging Face cache under tmp_path."""
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    return {**env, "HF_HOME": str(tmp_path / "hf-home"), "PYTHONPATH": str(root), **extra}


@pytest.mark.slow  # a fresh interpreter imports torch and transformers
def test_offline_hub_id_fails_at_once_from_the_command_line(tmp_path, tiny_clip_dir):
    """HF_HUB_OFFLINE=1 and an empty cache: one line naming it and --model FOLDER, no retries."""
    policy = tmp_path / "p.yaml"
    policy.write_text("policy: p\nconcepts:\n  - {name: a, prompts: [x]}\n")
    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(image)
    done = subprocess.run(
        [sys.executable, "-m", "moderation", "check", str(image), "--policy", str(policy)]
        + ["--no-log", "--model", "org/not-cached"],
        env=_offline_env(tmp_path, HF_HUB_OFFLINE="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1, done.stderr
    cache = tmp_path / "hf-home" / "hub"
    assert done.stderr.strip().splitlines() == [
        f"Error: model org/not-cached: not a local folder, and not in the Hugging Face cache "
        f"({cache}); HF_HUB_OFFLINE is set, so it cannot be downloaded: download it once with "
        "HF_HUB_OFFLINE unset, or pass --model FOLDER with a local copy of the checkpoint"
    ]


UNREACHABLE_SCRIPT = """
import json, sys
from moderation.encoder import ClipEncoder, EncoderError
try:
    ClipEncoder.from_pretrained("org/not-cached")
    error = None
except EncoderError as exc:
    error = str(exc)
cached = ClipEncoder.from_pretrained("org/tiny-clip")  # from the cache, the hub being down
print(json.dumps({"error": error, "kind": cached.kind, "text": cached.has_text_tower}))
"""


@pytest.mark.slow  # a fresh interpreter imports torch and transformers
def test_an_unreachable_hub_is_checked_once_then_the_cache_is_used(tmp_path, tiny_clip_dir):
    """Without HF_HUB_OFFLINE, a hub that cannot be reached is known after one request."""
    import socket

    with socket.socket() as probe:  # a port nothing listens on: connections are refused
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    fake_hub_repo(tmp_path / "hf-home" / "hub", "org/tiny-clip", tiny_clip_dir, ["c" * 40])
    done = subprocess.run(
        [sys.executable, "-c", UNREACHABLE_SCRIPT],
        env=_offline_env(tmp_path, HF_ENDPOINT=endpoint),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "Retrying" not in done.stderr  # huggingface_hub's retry loop never ran
    result = json.loads(done.stdout.strip().splitlines()[-1])
    cache = tmp_path / "hf-home" / "hub"
    assert result["error"] == (
        f"model org/not-cached: not a local folder, and not in the Hugging Face cache ({cache}), "
        f"and the hub ({endpoint}) cannot be reached ([Errno 111] Connection refused): connect "
        "to the network, or pass --model FOLDER with a local copy of the checkpoint "
        "(HF_HUB_OFFLINE=1 uses the cache without trying the network)"
    )
    assert (result["kind"], result["text"]) == ("clip", True)


HUB_SCRIPT = """
import json, sys
from moderation.encoder import ClipEncoder, EncoderError
first = ClipEncoder.from_pretrained("org/tiny-clip")
again = ClipEncoder.from_pretrained("org/tiny-clip")
checker = ClipEncoder.from_pretrained("org/tiny-checker")
open(sys.argv[1] + "/refs/main", "w").write(sys.argv[2])  # a new revision of org/tiny-clip
updated = ClipEncoder.from_pretrained("org/tiny-clip")
try:
    ClipEncoder.from_pretrained("org/not-cached")
    error = None
except EncoderError as exc:
    error = str(exc)
print(json.dumps({
    "kinds": [first.kind, checker.kind],
    "same": first.text_fingerprint == again.text_fingerprint,
    "updated": first.text_fingerprint != updated.text_fingerprint,
    "rows": list(checker.checkpoint_tensor("concept_embeds").shape),
    "error": error,
}))
"""


def fake_hub_repo(cache, repo_id, folder, commits):
    """A Hugging Face cache entry for repo_id holding folder's files at each commit."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    for commit in commits:
        shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commits[0])
    return repo


@pytest.mark.slow
def test_hub_ids_load_offline_from_the_cache(tmp_path, tiny_clip_dir, tiny_checker_dir):
    cache = tmp_path / "hub"
    commits = ["a" * 40, "b" * 40]
    repo = fake_hub_repo(cache, "org/tiny-clip", tiny_clip_dir, commits)
    fake_hub_repo(cache, "org/tiny-checker", tiny_checker_dir, commits[:1])
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(root)}
    done = subprocess.run(
        [sys.executable, "-c", HUB_SCRIPT, str(repo), commits[1]],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["kinds"] == ["clip", "sd-safety-checker"]
    assert result["same"] and result["updated"]
    assert result["rows"] == [17, 32]
    assert result["error"].startswith("model org/not-cached: not a local folder, and not in")


def test_checkpoint_missing_weights_is_an_error(tmp_path, tiny_checker_dir):
    weights = load_file(str(tiny_checker_dir / "model.safetensors"))
    folder = tmp_path / "truncated"
    folder.mkdir()
    shutil.copy(tiny_checker_dir / "config.json", folder / "config.json")
    kept = {k: v for k, v in weights.items() if "layers.1." not in k}
    save_file(kept, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(EncoderError, match="the checkpoint lacks 16 weights of Stable"):
        ClipEncoder.from_pretrained(folder)


def test_checkpoint_without_weights_is_an_error(tmp_path, tiny_checker_dir):
    folder = tmp_path / "config-only"
    folder.mkdir()
    shutil.copy(tiny_checker_dir / "config.json", folder / "config.json")
    with pytest.raises(EncoderError, match=r"model .*config-only: no weights file"):
        ClipEncoder.from_pretrained(folder)


def test_pytorch_bin_checkpoint(tmp_path, tiny_checker_dir, checker_encoder, pixels):
    folder = tmp_path / "bin"
    folder.mkdir()
    shutil.copy(tiny_checker_dir / "config.json", folder / "config.json")
    torch.save(load_file(str(tiny_checker_dir / "model.safetensors")), folder / "pytorch_model.bin")
    enc = ClipEncoder.from_pretrained(folder)
    assert torch.equal(enc.encode_image(pixels), checker_encoder.encode_image(pixels))
    assert torch.equal(
        enc.checkpoint_tensor("concept_embeds"), checker_encoder.checkpoint_tensor("concept_embeds")
    )
