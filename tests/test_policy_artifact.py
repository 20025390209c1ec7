"""Compiled artifacts are validated field by field on load (issue 8 item 7), and every
CompiledPolicy, however it was made, obeys the same fail-closed rules (issue 7)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from moderation.decision import decide, error_decisions
from moderation.engine import Moderator
from moderation.scoring import score
from policy import compile_policy, load_policy
from policy.compiled import CompiledPolicy
from policy.errors import PolicyError

POLICY = """\
policy: artifact
version: 2
review_band: 0.01
concepts:
  - {name: nudity, prompts: ["a photo of a naked person"], action: blackout}
  - {name: gore, prompts: ["a gory photo"], action: blur}
special_care:
  concepts:
    - {name: minor, prompts: ["a photo of a child"], threshold: 0.19}
"""


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, encoder) -> Path:
    """A real artifact written by `CompiledPolicy.save` from a compiled YAML policy."""
    folder = tmp_path_factory.mktemp("artifact")
    (folder / "p.yaml").write_text(POLICY, encoding="utf-8")
    compiled = compile_policy(load_policy(folder / "p.yaml"), encoder, cache=False)
    return compiled.save(folder / "p.compiled.safetensors")


def digest_of(fields: dict, tensors: dict) -> str:
    """The digest a tamperer would write: CompiledPolicy's own algorithm, run without its checks."""
    unchecked = object.__new__(CompiledPolicy)
    for name, value in {**fields, **tensors, "digest": ""}.items():
        object.__setattr__(unchecked, name, tuple(value) if isinstance(value, list) else value)
    return unchecked._compute_digest()


def tamper(artifact: Path, out: Path, edit=None, *, text=None, digest=True) -> str:
    """Copy `artifact` with its JSON fields (and tensors) edited; by default with a digest that
    matches the edit, so only validation can refuse it. Returns the new file's path."""
    with safe_open(str(artifact), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    fields = json.loads(meta["policy"])
    if edit is not None:
        edit(fields, tensors)
    meta["policy"] = text if text is not None else json.dumps(fields)
    if digest and text is None:
        meta["digest"] = digest_of(fields, tensors)
    save_file(tensors, str(out), metadata=meta)
    return str(out)


def refused(path: str) -> list[str]:
    with pytest.raises(PolicyError) as info:
        CompiledPolicy.load(path)
    return str(info.value).splitlines()


def set_field(name, value):
    return lambda fields, tensors: fields.__setitem__(name, value)


def test_a_saved_artifact_loads_back_identically(artifact):
    loaded = CompiledPolicy.load(artifact)
    assert loaded.concept_names == ("nudity", "gore") and loaded.special_names == ("minor",)
    assert (loaded.on_error, loaded.review_placeholder) == ("blackout", "blur")
    # The test's own digest helper computes what the engine computes.
    with safe_open(str(artifact), framework="pt") as f:
        meta = f.metadata()
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    assert digest_of(json.loads(meta["policy"]), tensors) == loaded.digest == meta["digest"]


TAMPERED = [
    ("on_error allow", set_field("on_error", "allow"),
     "on_error must not be 'allow': an image that could not be checked must not pass unchecked"),
    ("placeholder allow", set_field("review_placeholder", "allow"),
     "review_placeholder must be one of 'blur', 'pixelate', 'blackout', got 'allow'"),
    ("blur radius 0", set_field("blur_radius", 0),
     "blur_radius must be at least 0.01 of the image's shorter side: a weaker blur leaves the image almost as it was"),
    ("pixelate block in pixels", set_field("pixelate_block", 16),
     "pixelate_block must be a fraction of the image's shorter side (at most 1), not pixels: 16 px at 512 px is 0.0312"),
    ("unknown action", lambda f, t: f.__setitem__("actions", ["blackout", "nothing"]),
     "actions[1] must be one of 'allow', 'review', 'blur', 'pixelate', 'blackout', got 'nothing'"),
    ("unknown escalate", set_field("escalate", "nuke"),
     "escalate must be one of None, 'allow', 'review', 'blur', 'pixelate', 'blackout', got 'nuke'"),
    ("names shorter than the matrix", lambda f, t: f.__setitem__("concept_names", ["nudity"]),
     "concept_names has 1 name for the 2 rows of concept_matrix"),
    ("actions longer than the matrix", lambda f, t: f["actions"].append("blur"),
     "actions has 3 entries for the 2 rows of concept_matrix"),
    ("special names longer", lambda f, t: f["special_names"].append("teen"),
     "special_names has 2 names for the 1 row of special_matrix"),
    ("thresholds shorter", lambda f, t: t.__setitem__("thresholds", t["thresholds"][:1].clone()),
     "thresholds has shape [1] for 2 concepts"),
    ("NaN threshold", lambda f, t: t["thresholds"].__setitem__(0, float("nan")),
     "thresholds[0] (concept 'nudity') must be between -1 and 1, got nan"),
    ("threshold no cosine reaches", lambda f, t: t["special_thresholds"].__setitem__(0, 5.0),
     "special_thresholds[0] (concept 'minor') must be between -1 and 1, got 5.0"),
    ("row not a unit vector", lambda f, t: t["concept_matrix"][1].mul_(0.5),
     "concept_matrix row 1 (concept 'gore') is not a unit vector (norm 0.5)"),
    ("infinite matrix value", lambda f, t: t["special_matrix"].__setitem__((0, 3), float("inf")),
     "special_matrix row 0 (concept 'minor') has NaN or infinite values"),
    ("negative adjustment", set_field("adjustment", -0.5),
     "adjustment must not be negative: a negative adjustment would loosen every threshold once special care fires"),
    ("review band out of range", set_field("review_band", 0.7),
     "review_band must be at least 0 and less than 0.5, got 0.7"),
    ("diffusers with its own adjustment",
     lambda f, t: f.update(compat="diffusers", views="center", review_band=0.0, adjustment=0.02),
     "adjustment must be 0.01 when compat is 'diffusers' (the safety checker's own), got 0.02"),
    ("diffusers judged on more than its centre crop",
     lambda f, t: f.update(compat="diffusers", review_band=0.0, adjustment=0.01),
     "views must be 'center' when compat is 'diffusers', got 'cover'"),
    ("unknown compat", set_field("compat", "sd"), "compat must be one of None, 'diffusers', got 'sd'"),
    ("a name too long for the database", set_field("name", "x" * 201),
     "name must be at most 200 characters (the database column's size), got 201"),
    ("duplicate concept names", lambda f, t: f.__setitem__("special_names", ["gore"]),
     "concept name 'gore' is given twice"),
    ("a string for a number", set_field("blur_radius", "0.05"),
     "blur_radius must be a number, got string"),
    ("a number for names", set_field("concept_names", 3), "concept_names must be a list of strings"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("edit", "message"), [c[1:] for c in TAMPERED], ids=[c[0] for c in TAMPERED]
)
def test_tampered_fields_are_refused_even_with_a_matching_digest(tmp_path, artifact, edit, message):
    path = tamper(artifact, tmp_path / "t.safetensors", edit)
    assert refused(path) == [f"{path}: {message}"]


def test_every_problem_is_listed(tmp_path, artifact):
    def edit(fields, tensors):
        fields.update(on_error="allow", review_placeholder="allow")

    path = tamper(artifact, tmp_path / "t.safetensors", edit)
    assert refused(path) == [
        f"{path}: on_error must not be 'allow': an image that could not be checked must not"
        " pass unchecked",
        f"{path}: review_placeholder must be one of 'blur', 'pixelate', 'blackout', got 'allow'",
    ]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda f, t: f.__setitem__("extra", 1), "metadata 'policy': unknown key 'extra'"),
        (lambda f, t: f.pop("on_error"), "metadata 'policy': missing key 'on_error'"),
        (lambda f, t: t.pop("thresholds"), "not a compiled policy: missing tensor 'thresholds'"),
        (
            lambda f, t: t.__setitem__("backdoor", torch.zeros(1)),
            "not a compiled policy: unknown tensor 'backdoor'",
        ),
    ],
    ids=["unknown key", "missing key", "missing tensor", "unknown tensor"],
)
def test_unknown_and_missing_keys_and_tensors(tmp_path, artifact, edit, message):
    path = tamper(artifact, tmp_path / "t.safetensors", edit, digest=False)
    assert refused(path) == [f"{path}: {message}"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"name": "artifact",', "metadata 'policy' is not valid JSON: Expecting property name"),
        ("[1, 2]", "metadata 'policy' must be a JSON object"),
        ("[" * 100_000, "metadata 'policy' is not valid JSON: "),
    ],
    ids=["truncated", "not an object", "nested too deeply"],
)
def test_bad_json_is_one_clear_error(tmp_path, artifact, text, message):
    path = tamper(artifact, tmp_path / "t.safetensors", text=text)
    (line,) = refused(path)
    assert line.startswith(f"{path}: {message}")


def test_a_valid_edit_without_its_digest_is_refused(tmp_path, artifact):
    path = tamper(
        artifact, tmp_path / "t.safetensors", set_field("on_error", "review"), digest=False
    )
    assert refused(path) == [f"{path}: digest mismatch: the artifact was modified or is corrupt"]
    # With the digest recomputed the same edit is a valid policy (validation is not the digest).
    path = tamper(artifact, tmp_path / "u.safetensors", set_field("on_error", "review"))
    assert CompiledPolicy.load(path).on_error == "review"


def test_older_formats_and_other_files(tmp_path, artifact):
    with safe_open(str(artifact), framework="pt") as f:
        meta = {**f.metadata(), "format": "1"}
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata=meta)
    assert refused(str(tmp_path / "old.safetensors")) == [
        f"{tmp_path / 'old.safetensors'}: compiled by an older version (format 1, blur and"
        " pixelate in pixels): compile its policy again with `moderation policy compile`"
    ]
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    (line,) = refused(str(tmp_path / "junk.safetensors"))
    assert line.startswith(f"{tmp_path / 'junk.safetensors'}: not a compiled policy: ")


def test_moderator_from_a_tampered_artifact_is_refused(tmp_path, artifact, tiny_clip_dir):
    path = tamper(artifact, tmp_path / "t.safetensors", set_field("on_error", "allow"))
    with pytest.raises(PolicyError, match="on_error must not be 'allow'"):
        Moderator.from_policy(path, model=tiny_clip_dir, device="cpu")


# --- the same rules for policies built in code -------------------------------------------------


def built(**changes) -> CompiledPolicy:
    g = torch.Generator().manual_seed(0)
    fields = dict(
        name="code",
        version="1",
        model="tiny",
        concept_names=("a", "b"),
        categories=(None, "x"),
        severities=("low", "high"),
        actions=("blur", "blackout"),
        concept_matrix=F.normalize(torch.randn(2, 8, generator=g)),
        thresholds=torch.tensor([0.2, 0.3]),
        special_names=("s",),
        special_matrix=F.normalize(torch.randn(1, 8, generator=g)),
        special_thresholds=torch.tensor([0.1]),
        escalate="review",
    )
    return CompiledPolicy(**{**fields, **changes})


IN_CODE = [
    ({"severities": ("low", "urgent")},
     "severities[1] must be one of 'low', 'medium', 'high', 'critical', got 'urgent'"),
    ({"categories": (None,)}, "categories must be a list of 2 entries (a name or null each)"),
    ({"special_matrix": F.normalize(torch.randn(1, 4))},
     "special_matrix is 4 wide but concept_matrix is 8 wide"),
    ({"concept_matrix": torch.ones(2, 8, dtype=torch.int64)},
     "concept_matrix must be a 2-D floating-point tensor, got [2, 8]"),
    ({"version": "v" * 65}, "version must be at most 64 characters (the database column's size), got 65"),
    ({"concept_names": ("a", "b\x1b]0;x")}, "concept_names[1] must not contain control characters (U+001B)"),
    ({"model": ""}, "model must not be empty"),
    ({"adjustment": float("nan")}, "adjustment must be a finite number, got nan"),
    ({"on_error": "explode"}, "on_error must be one of 'review', 'blur', 'pixelate', 'blackout', got 'explode'"),
]  # fmt: skip


@pytest.mark.parametrize(("changes", "message"), IN_CODE, ids=[m for _, m in IN_CODE])
def test_policies_built_in_code_obey_the_same_rules(changes, message):
    with pytest.raises(PolicyError) as info:
        built(**changes)
    assert str(info.value) == f"compiled policy 'code': {message}"


def test_replace_and_to_are_checked_too():
    policy = built()
    with pytest.raises(PolicyError, match="on_error must not be 'allow'"):
        dataclasses.replace(policy, on_error="allow", digest="")
    moved = policy.to("cpu", torch.float16)  # half matrices keep unit rows within tolerance
    assert moved.digest == policy.digest and moved.concept_matrix.dtype == torch.float16


# --- one rule on every path: decide, batch failure, unreadable file ---------------------------


@pytest.mark.parametrize("on_error", ["review", "blur", "pixelate", "blackout"])
def test_every_error_path_uses_the_policys_on_error(on_error, encoder, monkeypatch, tmp_path):
    (tmp_path / "p.yaml").write_text(POLICY + f"on_error: {on_error}\n", encoding="utf-8")
    policy = compile_policy(load_policy(tmp_path / "p.yaml"), encoder, cache=False)
    embeddings = torch.randn(2, encoder.embed_dim)
    embeddings[1, 0] = float("nan")
    (_, bad) = decide(policy, score(policy, embeddings))  # decide(): a non-finite embedding
    assert (bad.verdict, bad.action) == ("error", on_error)
    (failed,) = error_decisions(policy, [{}], "decoder crashed")  # the engine's batch failure
    assert (failed.verdict, failed.action) == ("error", on_error)
    moderator = Moderator(policy, encoder)
    (unread,) = moderator.fail(["cannot read x.png"])  # a file that could not be read
    assert (unread.verdict, unread.action) == ("error", on_error)

    def broken(pixel_values):
        raise RuntimeError("tower failed")

    monkeypatch.setattr(moderator.encoder, "encode_image", broken)
    images = torch.rand(2, 3, 32, 32)
    result = moderator.moderate(images)
    assert [d.action for d in result.decisions] == [on_error, on_error]
    assert not any(
        torch.equal(out, image) for out, image in zip(result.images, images, strict=True)
    )


@pytest.mark.parametrize("n_concepts", [3, 17, 40])
def test_a_loaded_artifact_scores_bit_for_bit_like_the_policy_it_saved(tmp_path, n_concepts):
    """safetensors hands tensors back at any 8-byte offset, and a matrix product over a
    misaligned buffer may round differently: the loaded policy's tensors must be fresh copies."""
    import torch.nn.functional as F

    from moderation.scoring import score

    g = torch.Generator().manual_seed(n_concepts)
    compiled = CompiledPolicy(
        name="bits",
        version="1",
        model="tiny",
        concept_names=tuple(f"c{i}" for i in range(n_concepts)),
        categories=(None,) * n_concepts,
        severities=("medium",) * n_concepts,
        actions=("blur",) * n_concepts,
        concept_matrix=F.normalize(torch.randn(n_concepts, 768, generator=g)),
        thresholds=0.1 * torch.rand(n_concepts, generator=g),
        special_names=("s",),
        special_matrix=F.normalize(torch.randn(1, 768, generator=g)),
        special_thresholds=torch.tensor([0.05]),
    )
    loaded = CompiledPolicy.load(compiled.save(tmp_path / "bits.safetensors"))
    for name in ("concept_matrix", "thresholds", "special_matrix", "special_thresholds"):
        assert getattr(loaded, name).data_ptr() % 64 == 0, name
    embeddings = torch.randn(9, 768, generator=g)
    ours, theirs = score(compiled, embeddings), score(loaded, embeddings)
    assert torch.equal(ours.cosines, theirs.cosines) and torch.equal(ours.scores, theirs.scores)
