"""compile_policy: matrices, thresholds, every CompiledPolicy field, the digest and the prompt cache."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from moderation.encoder import ClipEncoder
from moderation.synthetic import make_tiny_clip
from policy.compiled import CompiledPolicy
from policy.compiler import compile_policy
from policy.errors import PolicyError
from policy.loader import load_policy
from policy.prompt_cache import CACHE_ENV, PromptCache, default_cache_dir

EMBEDDING = [round(0.1 * ((i * 7) % 11) - 0.5, 2) for i in range(32)]  # a raw [32] vector

POLICY = """\
# A policy exercising every field the compiler fills.
policy: test
version: 3
model: {model}
defaults: {{threshold: 0.21, action: blackout, severity: medium}}
review_band: 0
on_error: blackout
actions:
  blur: {{radius: 0.05}}
  pixelate: {{block: 0.03}}
  review: {{placeholder: blur}}
categories: [sexual, violence]
concepts:
  - {{name: nudity, category: sexual, prompts: ["a photo of a naked person", "nude body"], threshold: 0.2, action: blackout, severity: high}}
  - {{name: gore, category: violence, prompts: ["a gory photo with blood and wounds"], action: blur}}
  - {{name: raw, embedding: {embedding}, threshold: 0.1865}}
  - {{name: from-file, embedding: {{file: vectors.safetensors, tensor: concepts, row: 1}}}}
special_care:
  adjustment: 0.01
  escalate: review
  concepts:
    - name: young child
      prompts: ["a photo of a young child"]
      threshold: 0.19
"""


@pytest.fixture(scope="module")
def second_clip_dir(tmp_path_factory):
    """The same weights as tiny_clip_dir (same seed) in another folder: only the model id differs."""
    return make_tiny_clip(tmp_path_factory.mktemp("tiny-clip-copy"))


@functools.cache
def encoder_for(model: str) -> ClipEncoder:
    return ClipEncoder.from_pretrained(model)


@pytest.fixture(scope="module")
def encoder(tiny_clip_dir):
    return encoder_for(str(tiny_clip_dir))


def policy_text(model) -> str:
    return POLICY.format(model=model, embedding=EMBEDDING)


def write_policy(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(7)
    save_file({"concepts": torch.randn(3, 32)}, str(folder / "vectors.safetensors"))
    path = folder / "policy.yaml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def policy_path(tmp_path, tiny_clip_dir):
    return write_policy(tmp_path / "policies", policy_text(tiny_clip_dir))


def test_every_field_is_filled(policy_path, encoder, tiny_clip_dir):
    compiled = compile_policy(load_policy(policy_path), encoder, cache=False)
    assert (compiled.name, compiled.version, compiled.model) == ("test", "3", str(tiny_clip_dir))
    assert compiled.concept_names == ("nudity", "gore", "raw", "from-file")
    assert compiled.categories == ("sexual", "violence", None, None)
    assert compiled.severities == ("high", "medium", "medium", "medium")
    assert compiled.actions == ("blackout", "blur", "blackout", "blackout")
    assert compiled.special_names == ("young child",)
    assert (compiled.adjustment, compiled.escalate) == (0.01, "review")
    assert (compiled.review_band, compiled.on_error, compiled.compat) == (0.0, "blackout", None)
    assert (compiled.blur_radius, compiled.pixelate_block) == (0.05, 0.03)
    assert compiled.review_placeholder == "blur"
    assert compiled.source == policy_path.read_text(encoding="utf-8")
    assert compiled.concept_matrix.shape == (4, 32) and compiled.special_matrix.shape == (1, 32)
    for matrix in (compiled.concept_matrix, compiled.special_matrix):
        assert matrix.dtype == torch.float32
        assert torch.allclose(matrix.norm(dim=1), torch.ones(len(matrix)))
    expected = torch.tensor([0.2, 0.21, 0.1865, 0.21], dtype=torch.float32)
    assert compiled.thresholds.dtype == torch.float32
    assert torch.equal(compiled.thresholds, expected)
    assert torch.equal(compiled.special_thresholds, torch.tensor([0.19], dtype=torch.float32))
    assert len(compiled.digest) == 64


def test_matrix_is_the_prompt_ensemble_and_raw_vectors_normalised_at_once(policy_path, encoder):
    policy = load_policy(policy_path)
    compiled = compile_policy(policy, encoder, cache=False)

    def ensemble(prompts):
        units = F.normalize(encoder.encode_text(prompts), dim=-1)
        return F.normalize(units.mean(0), dim=0)

    raw = torch.stack(
        [
            ensemble(["a photo of a naked person", "nude body"]),
            ensemble(["a gory photo with blood and wounds"]),
            torch.tensor(EMBEDDING, dtype=torch.float32),
            torch.from_numpy(policy.concepts[3].vector),
        ]
    )
    assert torch.equal(compiled.concept_matrix, F.normalize(raw))
    assert torch.equal(
        compiled.special_matrix, F.normalize(ensemble(["a photo of a young child"])[None])
    )


def checkpoint_yaml(model, rows: list[int], special_rows: list[int]) -> str:
    """A policy whose every embedding and threshold is a `{checkpoint: NAME, row: N}` reference."""
    lines = ["policy: sd", f"model: {model}", "compat: diffusers", "concepts:"]
    for i, row in enumerate(rows):
        lines += [
            f"  - name: c{i}",
            f"    embedding: {{checkpoint: concept_embeds, row: {row}}}",
            f"    threshold: {{checkpoint: concept_embeds_weights, row: {row}}}",
        ]
    lines += ["special_care:", "  concepts:"]
    for i, row in enumerate(special_rows):
        lines += [
            f"    - name: s{i}",
            f"      embedding: {{checkpoint: special_care_embeds, row: {row}}}",
            f"      threshold: {{checkpoint: special_care_embeds_weights, row: {row}}}",
        ]
    return "\n".join(lines) + "\n"


def checkpoint_policy(folder: Path, model, rows=range(17), special_rows=range(3), *, edit=None):
    """Write checkpoint_yaml (optionally edited: (old, new) replaced once) and load it."""
    text = checkpoint_yaml(model, list(rows), list(special_rows))
    if edit is not None:
        assert edit[0] in text
        text = text.replace(*edit, 1)
    path = folder / "sd.yaml"
    path.write_text(text, encoding="utf-8")
    return load_policy(path)


@pytest.fixture(scope="module")
def checker(tiny_checker_dir):
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    return StableDiffusionSafetyChecker.from_pretrained(
        tiny_checker_dir, attn_implementation="eager"
    )


def test_checkpoint_references_compile_to_the_checkpoints_rows(tmp_path, tiny_checker_dir, checker):
    encoder = ClipEncoder.from_pretrained(tiny_checker_dir)
    # Rows in another order than the concepts: each concept must read the row it names.
    rows, special_rows = [16 - i for i in range(17)], [2, 0, 1]
    policy = checkpoint_policy(tmp_path, tiny_checker_dir, rows, special_rows)
    compiled = compile_policy(policy, encoder, cache=False)
    assert compiled.concept_names == tuple(f"c{i}" for i in range(17))
    assert torch.equal(compiled.concept_matrix, F.normalize(checker.concept_embeds[rows]))
    assert torch.equal(compiled.thresholds, checker.concept_embeds_weights[rows])
    assert torch.equal(
        compiled.special_matrix, F.normalize(checker.special_care_embeds[special_rows])
    )
    assert torch.equal(
        compiled.special_thresholds, checker.special_care_embeds_weights[special_rows]
    )
    assert compiled.compat == "diffusers" and compiled.model == str(tiny_checker_dir)


def test_checkpoint_concepts_give_diffusers_cosines_bit_for_bit(
    tmp_path, tiny_checker_dir, checker
):
    from diffusers.pipelines.stable_diffusion.safety_checker import cosine_distance

    encoder = ClipEncoder.from_pretrained(tiny_checker_dir)
    compiled = compile_policy(checkpoint_policy(tmp_path, tiny_checker_dir), encoder, cache=False)
    assert torch.equal(compiled.thresholds, checker.concept_embeds_weights)
    assert torch.equal(compiled.special_thresholds, checker.special_care_embeds_weights)
    torch.manual_seed(0)
    embeds = encoder.encode_image(torch.randn(4, 3, 224, 224))  # [B, D]
    ours = F.normalize(embeds) @ compiled.concept_matrix.T  # [B, C]
    assert torch.equal(ours, cosine_distance(embeds, checker.concept_embeds))
    special = F.normalize(embeds) @ compiled.special_matrix.T
    assert torch.equal(special, cosine_distance(embeds, checker.special_care_embeds))


@pytest.mark.parametrize(
    ("edit", "where", "message"),
    [
        (
            ("row: 3}\n    threshold", "row: 17}\n    threshold"),
            "15:50 concepts[3].embedding.row",
            "concept 'c3': row 17 is out of range: checkpoint tensor 'concept_embeds' of "
            "{model} has 17 rows",
        ),
        (
            ("concept_embeds_weights, row: 5}", "concept_embeds_weights, row: 20}"),
            "22:58 concepts[5].threshold.row",
            "concept 'c5': row 20 is out of range: checkpoint tensor 'concept_embeds_weights' "
            "of {model} has 17 rows",
        ),
        (
            ("special_care_embeds, row: 1}", "special_embeds, row: 1}"),
            "62:31 special_care.concepts[1].embedding.checkpoint",
            "concept 's1': model {model} has no tensor 'special_embeds'; it has: "
            "concept_embeds, concept_embeds_weights, special_care_embeds, "
            "special_care_embeds_weights",
        ),
    ],
    ids=["row", "threshold-row", "tensor"],
)
def test_bad_checkpoint_references_name_file_line_and_column(
    tmp_path, tiny_checker_dir, edit, where, message
):
    encoder = ClipEncoder.from_pretrained(tiny_checker_dir)
    policy = checkpoint_policy(tmp_path, tiny_checker_dir, edit=edit)
    with pytest.raises(PolicyError) as info:
        compile_policy(policy, encoder, cache=False)
    model = str(tiny_checker_dir)
    assert str(info.value) == f"{tmp_path / 'sd.yaml'}:{where}: {message.format(model=model)}"


def test_width_must_match_the_model(tmp_path, encoder, tiny_clip_dir):
    text = policy_text(tiny_clip_dir).replace(str(EMBEDDING), str(EMBEDDING[:16]))
    text = text.replace(
        "  - {name: from-file, embedding: {file: vectors.safetensors, tensor: concepts, row: 1}}\n",
        "",
    )
    policy = load_policy(write_policy(tmp_path, text))
    with pytest.raises(PolicyError) as info:
        compile_policy(policy, encoder, cache=False)
    assert str(info.value) == (
        f"{tmp_path / 'policy.yaml'}:16:28 concepts[2].embedding: concept 'raw': embedding has "
        f"shape [16], the model {tiny_clip_dir} projects to 32 values"
    )


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_embeddings_are_errors(policy_path, encoder, bad):
    policy = load_policy(policy_path)
    vector = np.array(EMBEDDING, dtype=np.float32)
    vector[5] = bad
    policy.concepts[2]._vector = vector
    with pytest.raises(
        PolicyError, match=r"concepts\[2\].embedding: concept 'raw': embedding has non-finite"
    ):
        compile_policy(policy, encoder, cache=False)


def test_prompts_without_text_tower_point_at_the_concept(tmp_path, tiny_checker_dir, tiny_clip_dir):
    policy = load_policy(write_policy(tmp_path, policy_text(tiny_clip_dir)))
    encoder = ClipEncoder.from_pretrained(tiny_checker_dir)
    with pytest.raises(PolicyError) as info:
        compile_policy(policy, encoder, cache=False)
    message = str(info.value)
    assert message.startswith(
        f"{tmp_path / 'policy.yaml'}:14:47 concepts[0].prompts: concept 'nudity' "
        "(and 2 more with prompts): model "
    )
    assert "has no text tower" in message and "text_model=" in message


def test_model_override_is_recorded(policy_path, second_clip_dir):
    compiled = compile_policy(
        load_policy(policy_path), encoder_for(str(second_clip_dir)), cache=False
    )
    assert compiled.model == str(second_clip_dir)


def test_relative_model_folder_is_recorded_as_written(tmp_path, tiny_clip_dir, encoder):
    folder = tmp_path / "policies"
    (folder / "models").mkdir(parents=True)
    (folder / "models" / "clip").symlink_to(tiny_clip_dir, target_is_directory=True)
    policy = load_policy(write_policy(folder, policy_text("models/clip")))
    assert compile_policy(policy, encoder, cache=False).model == "models/clip"


# One edit each that can change a decision: each must change the digest.
DECISION_EDITS = {
    "policy-name": ("policy: test", "policy: test2"),
    "version": ("version: 3", "version: 4"),
    "concept-threshold": ("threshold: 0.2, action", "threshold: 0.25, action"),
    "default-threshold": ("defaults: {threshold: 0.21", "defaults: {threshold: 0.22"),
    "concept-action": ("action: blur}", "action: pixelate}"),
    "default-action": ("action: blackout, severity", "action: blur, severity"),
    "severity": ("action: blackout, severity: high", "action: blackout, severity: low"),
    "concept-name": ("name: gore,", "name: blood,"),
    "prompt-text": ('"nude body"', '"nude bodies"'),
    "extra-prompt": ('"nude body"]', '"nude body", "naked"]'),
    "raw-embedding": (str(EMBEDDING), str([*EMBEDDING[:-1], 0.31])),
    "embedding-row": ("row: 1", "row: 2"),
    "adjustment": ("adjustment: 0.01", "adjustment: 0.02"),
    "escalate": ("escalate: review", "escalate: blur"),
    "special-threshold": ("threshold: 0.19", "threshold: 0.18"),
    "special-prompt": ("a young child", "a small child"),
    "review-band": ("review_band: 0", "review_band: 0.015"),
    "compat": ("review_band: 0", "review_band: 0\ncompat: diffusers"),
    "on-error": ("on_error: blackout", "on_error: review"),
    "blur-radius": ("radius: 0.05", "radius: 0.1"),
    "pixelate-block": ("block: 0.03", "block: 0.06"),
    "review-placeholder": ("placeholder: blur", "placeholder: blackout"),
    "model": ("TINY", "COPY"),  # the same weights in another folder
}
SAME_DECISION_EDITS = {
    "comment": ("# A policy", "# Another comment on a policy"),
    "added-comment": ("review_band: 0", "review_band: 0  # stricter soon"),
    "blank-lines": ("on_error: blackout\n", "\n\non_error: blackout\n\n"),
    "spacing": ("{radius: 0.05}", "{ radius:   0.05 }"),
}


def swap_first_concepts(text: str) -> str:
    lines = text.splitlines(keepends=True)
    i = next(n for n, line in enumerate(lines) if "name: nudity" in line)
    lines[i], lines[i + 1] = lines[i + 1], lines[i]
    return "".join(lines)


@pytest.fixture(scope="module")
def compile_text(tmp_path_factory):
    """text -> CompiledPolicy, each text compiled once per module (the base text is in every case)."""

    @functools.cache
    def compile_once(text: str) -> CompiledPolicy:
        policy = load_policy(write_policy(tmp_path_factory.mktemp("policy"), text))
        return compile_policy(policy, encoder_for(policy.resolved_model), cache=False)

    return compile_once


@pytest.mark.parametrize(
    "edit", [*DECISION_EDITS, "concept-order"], ids=[*DECISION_EDITS, "concept-order"]
)
def test_every_decision_edit_changes_the_digest(compile_text, tiny_clip_dir, second_clip_dir, edit):
    base = policy_text(tiny_clip_dir)
    if edit == "concept-order":
        edited = swap_first_concepts(base)
    else:
        old, new = DECISION_EDITS[edit]
        if edit == "model":
            old, new = str(tiny_clip_dir), str(second_clip_dir)
        assert base.count(old) >= 1, old
        edited = base.replace(old, new, 1)
    assert edited != base
    assert compile_text(edited).digest != compile_text(base).digest


@pytest.mark.parametrize("edit", SAME_DECISION_EDITS)
def test_comment_and_whitespace_edits_keep_the_digest(compile_text, tiny_clip_dir, edit):
    base = policy_text(tiny_clip_dir)
    old, new = SAME_DECISION_EDITS[edit]
    assert old in base
    before = compile_text(base)
    after = compile_text(base.replace(old, new, 1))
    assert after.source != before.source
    assert after.digest == before.digest


def scores(compiled: CompiledPolicy, embeds: torch.Tensor) -> torch.Tensor:
    """cos - threshold: [B, C], the part of scoring that depends on the compiled tensors."""
    cosines = F.normalize(embeds.float()) @ compiled.concept_matrix.T
    return cosines - compiled.thresholds


def test_saved_then_loaded_scores_identically(tmp_path, policy_path, encoder):
    compiled = compile_policy(load_policy(policy_path), encoder, cache=False)
    loaded = CompiledPolicy.load(compiled.save(tmp_path / "test.policy.safetensors"))
    assert loaded.digest == compiled.digest and loaded.source == compiled.source
    torch.manual_seed(0)
    embeds = encoder.encode_image(torch.randn(3, 3, 224, 224))
    assert torch.equal(scores(loaded, embeds), scores(compiled, embeds))


def test_vision_only_worker_uses_a_compiled_artifact(tmp_path, tiny_checker_dir, tiny_clip_dir):
    """Compile once with a text tower; workers load the artifact with only the checker's vision tower."""
    compiler = ClipEncoder.from_pretrained(tiny_checker_dir, text_model=tiny_clip_dir)
    policy = load_policy(write_policy(tmp_path / "p", policy_text(tiny_checker_dir)))
    artifact = compile_policy(policy, compiler, cache=False).save(tmp_path / "sd.safetensors")

    worker = ClipEncoder.from_pretrained(tiny_checker_dir)
    assert not worker.has_text_tower
    loaded = CompiledPolicy.load(artifact, device=worker.device)
    assert loaded.model == str(tiny_checker_dir) and loaded.embed_dim == worker.embed_dim
    torch.manual_seed(0)
    pixels = torch.randn(2, 3, 224, 224)
    got = scores(loaded, worker.encode_image(pixels))
    assert got.shape == (2, 4) and bool(torch.isfinite(got).all())
    assert torch.equal(got, scores(loaded, compiler.encode_image(pixels)))


# --- prompt cache -------------------------------------------------------------------------------


class CountingEncoder:
    """Wraps an encoder and records which prompts reached its text tower."""

    def __init__(self, encoder: ClipEncoder) -> None:
        self.inner = encoder
        self.encoded: list[str] = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def encode_text(self, prompts):
        self.encoded += list(prompts)
        return self.inner.encode_text(prompts)


def cache_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.safetensors"))


ALL_PROMPTS = [
    "a photo of a naked person",
    "nude body",
    "a gory photo with blood and wounds",
    "a photo of a young child",
]


def test_cache_hits_are_bit_identical_and_skip_the_text_tower(tmp_path, policy_path, encoder):
    policy = load_policy(policy_path)
    uncached = compile_policy(policy, encoder, cache=False)
    cold = CountingEncoder(encoder)
    first = compile_policy(policy, cold, cache=tmp_path / "cache")
    assert cold.encoded == ALL_PROMPTS
    assert len(cache_files(tmp_path / "cache")) == 4
    warm = CountingEncoder(encoder)
    second = compile_policy(policy, warm, cache=tmp_path / "cache")
    assert warm.encoded == []
    assert first.digest == second.digest == uncached.digest
    assert torch.equal(second.concept_matrix, uncached.concept_matrix)
    assert torch.equal(second.special_matrix, uncached.special_matrix)
    stored = PromptCache(tmp_path / "cache").get(encoder.text_fingerprint, "nude body", 32)
    assert torch.equal(stored, encoder.encode_text(["nude body"])[0])


def test_cache_misses_encode_only_new_prompts(tmp_path, tiny_clip_dir, encoder):
    cache = PromptCache(tmp_path / "cache")
    compile_policy(
        load_policy(write_policy(tmp_path / "a", policy_text(tiny_clip_dir))), encoder, cache=cache
    )
    edited = policy_text(tiny_clip_dir).replace('"nude body"', '"nude bodies"')
    counting = CountingEncoder(encoder)
    compiled = compile_policy(
        load_policy(write_policy(tmp_path / "b", edited)), counting, cache=cache
    )
    assert counting.encoded == ["nude bodies"]
    fresh = compile_policy(load_policy(tmp_path / "b" / "policy.yaml"), encoder, cache=False)
    assert compiled.digest == fresh.digest


def test_a_different_model_does_not_reuse_entries(tmp_path, policy_path, encoder):
    other_dir = make_tiny_clip(tmp_path / "other", seed=1)
    cache = tmp_path / "cache"
    compile_policy(load_policy(policy_path), encoder, cache=cache)
    other = CountingEncoder(ClipEncoder.from_pretrained(other_dir))
    assert other.text_fingerprint != encoder.text_fingerprint
    compile_policy(load_policy(policy_path), other, cache=cache)
    assert other.encoded == ALL_PROMPTS
    assert len(cache_files(cache)) == 8


def test_rewritten_weights_change_the_fingerprint(tmp_path):
    folder = make_tiny_clip(tmp_path / "clip")
    before = ClipEncoder.from_pretrained(folder).text_fingerprint
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes())  # same bytes, new mtime: a new identity
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert ClipEncoder.from_pretrained(folder).text_fingerprint != before


@pytest.mark.parametrize("damage", ["garbage", "truncated", "other-prompt", "wrong-shape", "nan"])
def test_damaged_entries_are_ignored_and_rewritten(tmp_path, policy_path, encoder, damage):
    cache = PromptCache(tmp_path / "cache")
    policy = load_policy(policy_path)
    expected = compile_policy(policy, encoder, cache=cache)
    fingerprint = encoder.text_fingerprint
    entry = cache.path(fingerprint, "nude body")
    good = entry.read_bytes()  # a valid entry
    if damage == "garbage":
        entry.write_bytes(b"not a safetensors file")
    elif damage == "truncated":
        entry.write_bytes(good[: len(good) // 2])
    elif damage == "other-prompt":
        entry.write_bytes(cache.path(fingerprint, "a photo of a young child").read_bytes())
    elif damage == "wrong-shape":
        save_file(
            {"embedding": torch.zeros(16)},
            str(entry),
            metadata={"format": "1", "fingerprint": fingerprint, "prompt": "nude body"},
        )
    else:
        save_file(
            {"embedding": torch.full((32,), float("nan"))},
            str(entry),
            metadata={"format": "1", "fingerprint": fingerprint, "prompt": "nude body"},
        )
    assert cache.get(fingerprint, "nude body", 32) is None
    counting = CountingEncoder(encoder)
    again = compile_policy(policy, counting, cache=cache)
    assert counting.encoded == ["nude body"]
    assert again.digest == expected.digest
    # Rewritten: a fresh read trusts it again (bytes may differ: metadata order is not fixed).
    assert torch.equal(
        cache.get(fingerprint, "nude body", 32), encoder.encode_text(["nude body"])[0]
    )


def test_default_cache_folder_and_env_override(tmp_path, policy_path, encoder, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv(CACHE_ENV, raising=False)
    assert default_cache_dir() == tmp_path / "xdg" / "moderation" / "prompts"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "moderation" / "prompts"
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "env-cache"))
    assert default_cache_dir() == tmp_path / "env-cache"
    compile_policy(load_policy(policy_path), encoder)  # cache=True: the default folder
    assert len(cache_files(tmp_path / "env-cache" / encoder.text_fingerprint)) == 4


def test_unwritable_cache_is_not_fatal(tmp_path, policy_path, encoder):
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache folder should be")
    compiled = compile_policy(load_policy(policy_path), encoder, cache=blocker)
    assert compiled.digest == compile_policy(load_policy(policy_path), encoder, cache=False).digest
