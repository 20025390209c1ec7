"""Policy language v1: YAML positions, schema rules, embedding files, model widths."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from policy import (
    ACTION_RANK,
    Policy,
    PolicyError,
    PolicyIssue,
    check_embed_dim,
    load_policy,
    model_embed_dim,
)
from policy.errors import format_path
from policy.yaml_loader import load_yaml

REPO = Path(__file__).resolve().parents[1]

DESIGN_EXAMPLE = """\
policy: default
version: 1
model: openai/clip-vit-large-patch14
defaults: {threshold: 0.21, action: blackout}
review_band: 0.015
on_error: blackout
actions:
  blur: {radius: 0.05}
  review: {placeholder: blur}
categories: [sexual, violence, self-harm]
concepts:
  - name: nudity
    category: sexual
    prompts: ["a photo of a naked person", "nude body"]
    threshold: 0.2
    action: blackout
  - name: gore
    category: violence
    severity: high
    prompts: ["a gory photo with blood and wounds"]
    action: blur
  - name: sd-3
    embedding: {file: sd_concepts.safetensors, tensor: concept_embeds, row: 3}
    threshold: 0.1865
special_care:
  adjustment: 0.01
  escalate: review
  concepts:
    - name: young child
      prompts: ["a photo of a young child"]
      threshold: 0.19
"""


def write(folder: Path, text: str, name: str = "p.yaml") -> str:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return str(path)


def errors_of(path: str, **kwargs) -> list[str]:
    with pytest.raises(PolicyError) as caught:
        load_policy(path, **kwargs)
    return str(caught.value).splitlines()


def one_concept(embedding: str) -> str:
    return f"policy: t\nconcepts:\n  - name: a\n    embedding: {embedding}\n"


@pytest.fixture
def concept_file(tmp_path: Path) -> np.ndarray:
    """sd_concepts.safetensors next to the policies: concept_embeds [5, 8], special [2, 8]."""
    rng = np.random.default_rng(0)
    concept_embeds = rng.standard_normal((5, 8)).astype(np.float32)  # [C, D]
    special = rng.standard_normal((2, 8)).astype(np.float32)  # [S, D]
    save_file(
        {"concept_embeds": concept_embeds, "special_care_embeds": special},
        str(tmp_path / "sd_concepts.safetensors"),
    )
    return concept_embeds


def test_design_example_loads_with_effective_values(tmp_path, concept_file):
    policy = load_policy(write(tmp_path, DESIGN_EXAMPLE))
    nudity, gore, sd3 = policy.concepts
    assert [policy.effective_threshold(c) for c in policy.concepts] == [0.2, 0.21, 0.1865]
    assert [policy.effective_action(c) for c in policy.concepts] == ["blackout", "blur", "blackout"]
    assert [policy.effective_severity(c) for c in policy.concepts] == ["medium", "high", "medium"]
    assert nudity.vector is None and nudity.prompts == ["a photo of a naked person", "nude body"]
    assert sd3.vector.dtype == np.float32 and sd3.vector.shape == (8,)
    np.testing.assert_array_equal(sd3.vector, concept_file[3])
    assert policy.review_band == 0.015 and policy.actions.blur.radius == 0.05
    assert [c.name for c in policy.special_concepts] == ["young child"]
    assert policy.special_care.adjustment == 0.01 and policy.special_care.escalate == "review"
    assert policy.source_text == DESIGN_EXAMPLE
    assert policy.source_path == tmp_path / "p.yaml"
    assert policy.resolved_model == "openai/clip-vit-large-patch14"  # no such folder: a hub id
    assert gore.category == "violence"


def test_defaults_fill_everything_left_out(tmp_path):
    policy = load_policy(write(tmp_path, "policy: t\nconcepts: [{name: a, prompts: [x]}]\n"))
    (concept,) = policy.concepts
    assert (policy.version, policy.model, policy.compat) == (
        1,
        "openai/clip-vit-large-patch14",
        None,
    )
    assert (policy.on_error, policy.review_band, policy.special_care) == ("blackout", 0.0, None)
    assert policy.effective_threshold(concept) == 0.2
    assert policy.effective_action(concept) == "blackout"
    assert policy.effective_severity(concept) == "medium"
    assert policy.actions.pixelate.block == 0.03 and policy.actions.review.placeholder == "blur"
    assert policy.special_concepts == [] and ACTION_RANK["blackout"] == 4


def test_only_special_care_concepts_is_a_policy(tmp_path):
    text = "policy: t\nspecial_care:\n  concepts: [{name: s, prompts: [x]}]\n"
    policy = load_policy(write(tmp_path, text))
    assert policy.concepts == [] and [p for p, _ in policy.iter_concepts()] == [
        ("special_care", "concepts", 0)
    ]


def test_every_issue_is_reported_in_file_order(tmp_path):
    path = write(
        tmp_path,
        """\
        policy: t
        review_band: -0.1
        concepts:
          - name: a
            prompts: []
            threshold: .inf
          - name: 3
            embedding: [1, "2"]
            severity: huge
        special_care: {adjustment: 2, concepts: [{name: s, prompts: [x]}]}
        """,
    )
    assert errors_of(path) == [
        f"{path}:2:14 review_band: must be at least 0 and less than 0.5",
        f"{path}:5:14 concepts[0].prompts: must not be empty",
        f"{path}:6:16 concepts[0].threshold: must be between -1 and 1",
        f"{path}:7:11 concepts[1].name: expected a string, got integer",
        f"{path}:8:20 concepts[1].embedding[1]: expected a number, got string",
        f"{path}:9:15 concepts[1].severity: must be one of 'low', 'medium', 'high' or 'critical', got 'huge'",
        f"{path}:10:28 special_care.adjustment: must be between 0 and 1",
    ]


def test_policy_error_carries_structured_issues(tmp_path):
    path = write(tmp_path, "policy: t\nconcepts: [{name: a, prompts: [x], colour: red}]\n")
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    (issue,) = caught.value.issues
    assert issue == PolicyIssue(path, 2, 36, "concepts[0].colour", "unknown key")
    assert issue.file == path and issue.line == 2 and issue.col == 36


def test_issue_lines_escape_control_characters():
    issue = PolicyIssue("p.yaml", 1, 2, "a", "bad '\x1b[31m'\nnext")
    assert str(issue) == "p.yaml:1:2 a: bad '\\x1b[31m'\\nnext"


@pytest.mark.parametrize(
    ("path", "text"),
    [
        ((), "<root>"),
        (("concepts", 2, "threshold"), "concepts[2].threshold"),
        (("special_care", "concepts", 0), "special_care.concepts[0]"),
        (("concepts", 0, "my key"), 'concepts[0]["my key"]'),
    ],
)
def test_format_path(path, text):
    assert format_path(path) == text


def test_missing_file_and_folder_and_binary_are_named(tmp_path):
    missing = str(tmp_path / "nope.yaml")
    assert errors_of(missing) == [f"{missing}: file not found"]
    assert errors_of(str(tmp_path)) == [f"{tmp_path}: is a folder, not a policy file"]
    binary = tmp_path / "b.yaml"
    binary.write_bytes(b"policy: \xff\n")
    assert errors_of(str(binary)) == [
        f"{binary}:1:9 (yaml): byte 0xFF is not UTF-8 text (invalid start byte); save the file"
        " as UTF-8"
    ]


@pytest.mark.parametrize(
    ("raw", "where", "reason"),
    [
        # Regression: reported as "(byte 58)", with no line or column.
        (
            b"policy: x\nversion: 1\nconcepts:\n  - name: caf\xe9\n",
            "4:14",
            "0xE9 is not UTF-8 text (invalid",
        ),
        # The column counts characters, not bytes; a BOM is not a character of the file.
        (
            b"\xef\xbb\xbfpolicy: x\n# \xc3\xa9\xc3\xa9 \xc3\n",
            "2:6",
            "0xC3 is not UTF-8 text (invalid",
        ),
        (b"policy: x\r\nversion: \x80\r\n", "2:10", "0x80 is not UTF-8 text (invalid start"),
    ],
)
def test_a_bad_utf8_byte_is_named_at_its_line_and_column(tmp_path, raw, where, reason):
    path = tmp_path / "bad.yaml"
    path.write_bytes(raw)
    (error,) = errors_of(str(path))
    assert error.startswith(f"{path}:{where} (yaml): byte {reason}"), error
    assert error.endswith("; save the file as UTF-8")


# --- YAML loading -------------------------------------------------------------------------------


def test_yaml_positions_of_keys_values_and_items():
    loaded = load_yaml(
        "policy: t\nconcepts:\n  - {name: a}\n  - name: b\n    threshold: 0.3\n", "f"
    )
    assert loaded.values[("concepts", 1, "threshold")] == (5, 16)
    assert loaded.keys[("concepts", 1, "threshold")] == (5, 5)
    assert loaded.values[("concepts", 0)] == (3, 5)
    assert loaded.values[("concepts", 0, "name")] == (3, 12)
    assert loaded.locate(("concepts", 1, "nope")) == (4, 5)  # nearest ancestor
    assert loaded.locate(("concepts", 1, "threshold"), key=True) == (5, 5)


def test_yaml_scalars_follow_yaml_1_2_core():
    loaded = load_yaml("a: [1e-3, .5, -2., 7, .nan, yes, off, 2024-01-01, true, '3', 0x1f]\n", "f")
    values = loaded.data["a"]
    assert values[:4] == [0.001, 0.5, -2.0, 7] and np.isnan(values[4])
    assert values[5:] == ["yes", "off", "2024-01-01", True, "3", 31]


@pytest.mark.parametrize(
    ("text", "line"),
    [
        (
            "a: !!python/object/new:os.system [x]\n",
            "f:1:4 a: unsupported YAML tag !!python/object/new:os.system",
        ),
        ("a: !!python/name:os.system\n", "f:1:4 a: unsupported YAML tag !!python/name:os.system"),
        ("a: !!binary aGVsbG8=\n", "f:1:4 a: unsupported YAML tag !!binary"),
        ("a: !custom {x: 1}\n", "f:1:4 a: unsupported YAML tag !custom"),
        (
            "? !!python/tuple [1]\n: 2\n",
            "f:1:3 <root>: a key must be a plain name, not a list or mapping",
        ),
        ("a: &x [1]\nb: *x\n", "f:2:4 (yaml): YAML aliases (*x) are not supported"),
        (
            "a: 1\n---\nb: 2\n",
            "f:2:1 (yaml): expected a single document in the stream, but found another document",
        ),
        ("a: !!int abc\n", "f:1:4 a: cannot read 'abc' as !!int"),
        ("a: 1\nb: \x07\n", "f:2:4 (yaml): character U+0007 is not allowed in YAML"),
        ("", "f:1:1 <root>: the file is empty"),
    ],
)
def test_yaml_rejects_what_is_not_plain_data(text, line):
    with pytest.raises(PolicyError) as caught:
        load_yaml(text, "f")
    assert str(caught.value) == line


def test_yaml_python_tags_are_never_executed(tmp_path):
    marker = tmp_path / "PWNED_x"
    path = write(tmp_path, f'policy: !!python/object/apply:os.system ["touch {marker}"]\n')
    assert errors_of(path) == [
        f"{path}:1:9 policy: unsupported YAML tag !!python/object/apply:os.system"
    ]
    assert not marker.exists()


# --- embeddings in files -----------------------------------------------------------------------


def test_safetensors_rows_and_single_tensors(tmp_path, concept_file):
    save_file({"v": np.arange(1, 9, dtype=np.float16)}, str(tmp_path / "one.safetensors"))
    text = """\
    policy: t
    concepts:
      - {name: r0, embedding: {file: sd_concepts.safetensors, tensor: concept_embeds, row: 0}}
      - {name: r4, embedding: {file: ./sd_concepts.safetensors, tensor: concept_embeds, row: 4}}
      - {name: one, embedding: {file: one.safetensors}}
    special_care:
      concepts:
        - {name: s1, embedding: {file: sd_concepts.safetensors, tensor: special_care_embeds, row: 1}}
    """
    policy = load_policy(write(tmp_path, text), embed_dim=8)
    r0, r4, one = (c.vector for c in policy.concepts)
    np.testing.assert_array_equal(r0, concept_file[0])
    np.testing.assert_array_equal(r4, concept_file[4])
    np.testing.assert_array_equal(one, np.arange(1, 9, dtype=np.float32))
    assert one.dtype == np.float32
    assert policy.special_concepts[0].vector.shape == (8,)


def test_npy_rows(tmp_path):
    matrix = np.arange(1, 13, dtype=np.float64).reshape(3, 4)  # [3, 4]
    np.save(tmp_path / "m.npy", matrix)
    np.save(tmp_path / "v.npy", matrix[0])
    text = one_concept("{file: m.npy, row: 2}") + "  - {name: b, embedding: {file: v.npy}}\n"
    a, b = load_policy(write(tmp_path, text)).concepts
    np.testing.assert_array_equal(a.vector, matrix[2].astype(np.float32))
    np.testing.assert_array_equal(b.vector, matrix[0].astype(np.float32))


@pytest.mark.parametrize(
    ("embedding", "line"),
    [
        ("{file: sd_concepts.safetensors, tensor: nope, row: 0}",
         "4:56 concepts[0].embedding.tensor: tensor 'nope' not found in 'sd_concepts.safetensors' (it has: concept_embeds, special_care_embeds)"),
        ("{file: sd_concepts.safetensors, tensor: concept_embeds, row: 5}",
         "4:77 concepts[0].embedding.row: row 5 is out of range: tensor 'concept_embeds' has 5 rows"),
        ("{file: sd_concepts.safetensors, tensor: concept_embeds}",
         "4:16 concepts[0].embedding: tensor 'concept_embeds' has 5 rows; say which with 'row'"),
        ("{file: sd_concepts.safetensors}",
         "4:16 concepts[0].embedding: 'sd_concepts.safetensors' holds 2 tensors (concept_embeds, special_care_embeds); say which with 'tensor'"),
        ("{file: sd_concepts.safetensors, tensor: concept_embeds, row: -1}",
         "4:77 concepts[0].embedding.row: must be at least 0"),
        ("{file: v.npy, row: 0}", "4:35 concepts[0].embedding.row: 'v.npy' is 1-D, so it has no row 0"),
        ("{file: v.npy, tensor: t}", "4:38 concepts[0].embedding.tensor: 'tensor' applies only to .safetensors files"),
        ("{file: zeros.npy}", "4:16 concepts[0].embedding: embedding is all zeros"),
        ("{file: obj.npy}", "4:23 concepts[0].embedding.file: cannot read 'obj.npy': Array can't be memory-mapped: Python objects in dtype."),
        ("{file: archive.npy}", "4:23 concepts[0].embedding.file: 'archive.npy' is not a .npy array"),
        ("{file: broken.safetensors}", "4:23 concepts[0].embedding.file: cannot read 'broken.safetensors': Error while deserializing header: header too small"),
        ("{file: w.pt}", "4:23 concepts[0].embedding.file: 'w.pt' is not a .safetensors or .npy file"),
        ("{file: nope.npy}", "4:23 concepts[0].embedding.file: file 'nope.npy' not found"),
        ("[0, 0, 0]", "4:16 concepts[0].embedding: embedding is all zeros"),
        ("[1e39, 1]", "4:16 concepts[0].embedding: embedding value 0 is not finite (inf)"),
        ("[]", "4:16 concepts[0].embedding: must not be empty"),
        ('{file: "a\\0b.npy"}', "4:23 concepts[0].embedding.file: 'a\\x00b.npy' is not a usable file name (embedded null byte)"),
    ],
)  # fmt: skip
def test_bad_embedding_files(tmp_path, concept_file, embedding, line):
    np.save(tmp_path / "v.npy", np.ones(8, np.float32))
    np.save(tmp_path / "zeros.npy", np.zeros(8, np.float32))
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with open(tmp_path / "archive.npy", "wb") as handle:  # an .npz archive under a .npy name
        np.savez(handle, x=np.ones(3))
    (tmp_path / "broken.safetensors").write_bytes(b"garbage")
    (tmp_path / "w.pt").write_bytes(b"x")
    path = write(tmp_path, one_concept(embedding))
    assert errors_of(path) == [f"{path}:{line}"]


def test_embedding_files_must_stay_in_the_policy_folder(tmp_path):
    np.save(tmp_path / "secret.npy", np.ones(4, np.float32))
    (tmp_path / "pol").mkdir()
    (tmp_path / "pol" / "link.npy").symlink_to(tmp_path / "secret.npy")
    absolute = tmp_path / "secret.npy"
    for name, message in [
        ("../secret.npy", "'../secret.npy' is outside the policy's folder"),
        ("sub/../../secret.npy", "'sub/../../secret.npy' is outside the policy's folder"),
        ("link.npy", "'link.npy' is outside the policy's folder"),
        (str(absolute), f"'{absolute}' must be a path relative to the policy's folder"),
    ]:
        path = write(tmp_path / "pol", one_concept(f"{{file: '{name}'}}"))
        assert errors_of(path) == [f"{path}:4:23 concepts[0].embedding.file: {message}"]


def test_widths_must_agree_and_match_the_model(tmp_path):
    np.save(tmp_path / "w31.npy", np.ones(31, np.float32))
    text = one_concept("{file: w31.npy}") + "  - {name: b, embedding: [1, 2]}\n"
    path = write(tmp_path, text)
    assert errors_of(path) == [
        f"{path}:5:26 concepts[1].embedding: embedding has 2 values, but concepts[0].embedding has 31"
    ]
    assert errors_of(path, embed_dim=32) == [
        f"{path}:4:16 concepts[0].embedding: embedding has 31 values, the model's projection width is 32",
        f"{path}:5:26 concepts[1].embedding: embedding has 2 values, the model's projection width is 32",
    ]
    single = load_policy(write(tmp_path, one_concept("{file: w31.npy}"), "q.yaml"))
    check_embed_dim(single, 31)
    with pytest.raises(PolicyError, match="has 31 values, the model's projection width is 32"):
        check_embed_dim(single, 32)


def test_later_issues_name_the_file_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, one_concept("[1, 2]") + "  - {name: b, embedding: [1]}\n")
    assert errors_of("./p.yaml") == [
        "./p.yaml:5:26 concepts[1].embedding: embedding has 1 value, but concepts[0].embedding has 2"
    ]


def test_nan_in_npy_names_the_concept(tmp_path):
    np.save(tmp_path / "nan.npy", np.array([0.5, np.nan, 1.0], np.float32))
    path = write(tmp_path, one_concept("{file: nan.npy}"))
    assert errors_of(path) == [
        f"{path}:4:16 concepts[0].embedding: embedding value 1 is not finite (nan)"
    ]


# --- model ------------------------------------------------------------------------------------


def test_model_folder_next_to_the_policy_is_resolved(tmp_path):
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    text = "policy: t\nmodel: models/tiny\nconcepts: [{name: a, prompts: [x]}]\n"
    policy = load_policy(write(tmp_path / "pol", text.replace("models/", "../models/")))
    assert policy.model == "../models/tiny"
    assert policy.resolved_model == str((tmp_path / "models" / "tiny").resolve())
    policy = load_policy(write(tmp_path, text.replace("models/tiny", "org/not-here")))
    assert policy.resolved_model == "org/not-here"


def test_model_embed_dim_reads_config_without_downloading(tmp_path, monkeypatch):
    import huggingface_hub.constants

    folder = tmp_path / "clip"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"projection_dim": 32}))
    assert model_embed_dim(folder) == 32 and model_embed_dim(str(folder)) == 32
    assert model_embed_dim(tmp_path / "absent") is None
    (folder / "config.json").write_text(json.dumps({"projection_dim": "32"}))
    assert model_embed_dim(folder) is None

    cache = tmp_path / "hub"
    snapshot = cache / "models--org--tiny-clip" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps({"projection_dim": 48}))
    (cache / "models--org--tiny-clip" / "refs").mkdir()
    (cache / "models--org--tiny-clip" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    assert model_embed_dim("org/tiny-clip") == 48
    assert model_embed_dim("org/not-cached") is None
    assert model_embed_dim("not a repo id!") is None


def test_policy_from_python_reports_without_a_file():
    policy = Policy.model_validate({"policy": "p", "concepts": [{"name": "a", "prompts": ["x"]}]})
    assert str(policy.issue(("concepts", 0), "too long")) == "<policy p>: too long"


def test_importing_policy_does_not_import_torch():
    code = "import sys, policy; print('torch' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"


def test_checkpoint_references_for_embeddings_and_thresholds(tmp_path):
    """A policy may take a concept's embedding and threshold from its model checkpoint's tensors."""
    from policy import CheckpointRef

    path = tmp_path / "p.yaml"
    path.write_text(
        "policy: sd\nmodel: some/checker\ncompat: diffusers\nconcepts:\n"
        "  - name: sd-0\n"
        "    embedding: {checkpoint: concept_embeds, row: 0}\n"
        "    threshold: {checkpoint: concept_embeds_weights, row: 0}\n"
    )
    loaded = load_policy(path)
    concept = loaded.concepts[0]
    assert concept.embedding == CheckpointRef(checkpoint="concept_embeds", row=0)
    assert loaded.effective_threshold(concept) == CheckpointRef(
        checkpoint="concept_embeds_weights", row=0
    )
    assert concept.vector is None  # read by the compiler, from the model


@pytest.mark.parametrize(
    ("threshold", "message"),
    [
        (
            "{checkpoint: w, rows: 0}",
            "5:32 concepts[0].threshold.rows: unknown key (did you mean 'row'?)",
        ),
        ('"0.2"', "5:16 concepts[0].threshold: expected a number, got string"),
        ("{checkpoint: w, row: -1}", "5:37 concepts[0].threshold.row: must be at least 0"),
    ],
)
def test_bad_threshold_references(tmp_path, threshold, message):
    path = tmp_path / "p.yaml"
    path.write_text(
        f"policy: p\nconcepts:\n  - name: a\n    prompts: [x]\n    threshold: {threshold}\n"
    )
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert str(info.value) == f"{path}:{message}"
