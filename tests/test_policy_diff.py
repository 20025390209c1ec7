"""`moderation policy diff OLD NEW`: what changed, and exit 0 only when they decide identically."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from moderation.cli import main
from policy import compile_policy, load_policy

E = [[1.0 if i == k else 0.0 for i in range(32)] for k in range(32)]  # basis vectors, width 32

BASE = f"""\
policy: base
version: 1
model: MODEL
defaults: {{threshold: 0.2, action: blur, severity: medium}}
review_band: 0.01
categories: [a, b]
concepts:
  - {{name: nudity, category: a, embedding: {E[0]}, threshold: 0.3}}
  - {{name: gore, category: b, embedding: {E[1]}, action: blackout}}
  - {{name: weapons, category: b, embedding: {E[2]}}}
special_care:
  adjustment: 0.01
  concepts:
    - {{name: minor, embedding: {E[3]}, threshold: 0.25}}
"""

PROMPTS = """\
policy: prompts
model: MODEL
concepts:
  - {name: cat, prompts: ["a photo of a cat"], threshold: 0.3}
  - {name: car, prompts: ["a red car"], action: blur}
special_care:
  concepts:
    - {name: minor, prompts: ["a photo of a child"], threshold: 0.25}
"""


def write(folder: Path, name: str, text: str, model: str | Path = "some/hub-model") -> Path:
    path = folder / name
    path.write_text(text.replace("MODEL", str(model)), encoding="utf-8")
    return path


def run(*args: object):
    return CliRunner().invoke(main, ["policy", "diff", *map(str, args)])


def run_json(*args: object) -> tuple[int, dict]:
    result = run(*args, "--json")
    assert result.stderr == "", result.stderr
    return result.exit_code, json.loads(result.stdout)


@pytest.fixture
def base(tmp_path: Path) -> Path:
    return write(tmp_path, "base.yaml", BASE)


def edited(base: Path, old: str, new: str, name: str = "new.yaml") -> Path:
    text = base.read_text(encoding="utf-8")
    assert old in text
    return write(base.parent, name, text.replace(old, new, 1))


def test_a_policy_against_itself_is_identical(base):
    result = run(base, base)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[-1] == "identical: the policies decide identically"
    code, data = run_json(base, base)
    assert code == 0
    assert data["identical"] is True
    assert data["concepts"] == {"added": [], "removed": [], "renamed": [], "changed": {}}
    assert data["settings"] == {} and data["not_compared"] == []
    assert data["old"]["digest"] == data["new"]["digest"] and len(data["old"]["digest"]) == 64


def test_a_changed_threshold_differs_naming_the_concept_and_both_values(base):
    new = edited(base, "threshold: 0.3}", "threshold: 0.35}")
    result = run(base, new)
    assert result.exit_code == 1, result.output
    lines = result.stdout.splitlines()
    assert "~ concept nudity" in lines
    assert lines[lines.index("~ concept nudity") + 1] == "    threshold: 0.3 -> 0.35"
    assert lines[-1].startswith("different: the policies can decide differently (1 changed")
    code, data = run_json(base, new)
    assert code == 1 and data["identical"] is False
    assert data["concepts"]["changed"] == {
        "nudity": {"threshold": {"old": 0.3, "new": 0.35, "affects_decisions": True}}
    }
    assert data["old"]["digest"] != data["new"]["digest"]


def test_added_removed_and_renamed_concepts(base):
    text = base.read_text(encoding="utf-8")
    text = text.replace(f"  - {{name: weapons, category: b, embedding: {E[2]}}}\n", "")
    text = text.replace("name: gore,", "name: violence,")  # same embedding: renamed-looking
    text = text.replace("special_care:", f"  - {{name: drugs, embedding: {E[5]}}}\nspecial_care:")
    new = write(base.parent, "new.yaml", text)
    code, data = run_json(base, new)
    assert code == 1
    concepts = data["concepts"]
    assert concepts["added"] == ["drugs"] and concepts["removed"] == ["weapons"]
    assert concepts["renamed"] == [{"old": "gore", "new": "violence", "cosine": 1.0, "changes": {}}]
    assert concepts["changed"] == {}
    lines = run(base, new).stdout.splitlines()
    assert "~ concept gore -> violence (cosine 1.0000)" in lines
    assert any(line.startswith("+ concept drugs: threshold 0.2, action blur,") for line in lines)
    assert any(line.startswith("- concept weapons: threshold 0.2, action blur,") for line in lines)


def test_prompt_concepts_without_a_model_are_renamed_by_their_prompts(tmp_path):
    old = write(tmp_path, "old.yaml", PROMPTS)
    new = write(tmp_path, "new.yaml", PROMPTS.replace("name: car,", "name: vehicle,"))
    code, data = run_json(old, new)
    assert code == 1
    assert data["concepts"]["renamed"] == [
        {"old": "car", "new": "vehicle", "cosine": None, "changes": {}}
    ]
    assert data["new"]["digest"] is None
    assert "digest not compiled (needs a model)" in run(old, new).stdout


@pytest.mark.parametrize(
    ("old", "new", "where", "field", "values"),
    [
        ("action: blackout}", "action: pixelate}", "gore", "action", ["blackout", "pixelate"]),
        ("review_band: 0.01", "review_band: 0.02", None, "review_band", [0.01, 0.02]),
        ("review_band: 0.01", "review_band: 0.01\non_error: review", None, "on_error",
         ["blackout", "review"]),
        ("adjustment: 0.01", "adjustment: 0.02", None, "special_care.adjustment", [0.01, 0.02]),
        ("adjustment: 0.01", "adjustment: 0.01\n  escalate: blackout", None,
         "special_care.escalate", ["review", "blackout"]),
        ("threshold: 0.25}", "threshold: 0.2}", "minor", "threshold", [0.25, 0.2]),
        ("review_band: 0.01", "review_band: 0.01\nactions: {blur: {radius: 0.1}}", None,
         "actions.blur.radius", [0.05, 0.1]),
        ("review_band: 0.01", "review_band: 0.01\nviews: tiles", None, "views", ["cover", "tiles"]),
        (f"{E[1]}, action", f"{E[6]}, action", "gore", "definition", None),
    ],
)  # fmt: skip
def test_each_decisive_change_differs(base, old, new, where, field, values):
    code, data = run_json(base, edited(base, old, new))
    assert code == 1 and data["identical"] is False
    entry = data["concepts"]["changed"][where][field] if where else data["settings"][field]
    assert entry["affects_decisions"] is True
    if values is not None:
        assert [entry["old"], entry["new"]] == values
    else:  # a new embedding: both vectors known, so their cosine is given
        assert entry["cosine"] == 0.0


def test_a_concept_moved_into_special_care_differs(base):
    text = base.read_text(encoding="utf-8")
    line = f"  - {{name: weapons, category: b, embedding: {E[2]}}}\n"
    text = text.replace(line, "") + f"    - {{name: weapons, embedding: {E[2]}}}\n"
    code, data = run_json(base, write(base.parent, "new.yaml", text))
    assert code == 1
    changes = data["concepts"]["changed"]["weapons"]
    assert changes["special_care"] == {"old": False, "new": True, "affects_decisions": True}
    assert changes["action"]["old"] == "blur" and changes["action"]["new"] is None


@pytest.mark.parametrize(
    ("old", "new", "field"),
    [
        ("version: 1", "version: 2", "version"),
        ("policy: base", "policy: renamed", "name"),
        ("severity: medium}", "severity: high}", "defaults.severity"),
    ],
)
def test_descriptive_changes_are_reported_but_decide_nothing(base, old, new, field):
    code, data = run_json(base, edited(base, old, new))
    assert code == 0 and data["identical"] is True
    assert data["settings"][field]["affects_decisions"] is False
    result = run(base, edited(base, old, new))
    assert result.exit_code == 0
    assert f"~ {field}: " in result.stdout and "(decides nothing)" in result.stdout
    assert result.stdout.splitlines()[-1].startswith("identical: the policies decide identically (")


def test_category_and_severity_of_a_concept_decide_nothing(base):
    new = edited(base, "name: gore, category: b,", "name: gore, category: a, severity: low,")
    code, data = run_json(base, new)
    assert code == 0
    assert data["concepts"]["changed"]["gore"] == {
        "category": {"old": "b", "new": "a", "affects_decisions": False},
        "severity": {"old": "medium", "new": "low", "affects_decisions": False},
    }


def test_concept_order_counts(base):
    text = base.read_text(encoding="utf-8")
    nudity = f"  - {{name: nudity, category: a, embedding: {E[0]}, threshold: 0.3}}\n"
    gore = f"  - {{name: gore, category: b, embedding: {E[1]}, action: blackout}}\n"
    new = write(base.parent, "new.yaml", text.replace(nudity + gore, gore + nudity))
    code, data = run_json(base, new)
    assert code == 1 and data["concepts"]["changed"] == {}
    assert data["settings"]["concept_order"] == {
        "old": ["nudity", "gore", "weapons"],
        "new": ["gore", "nudity", "weapons"],
        "affects_decisions": True,
    }


def test_a_child_is_compared_flattened_against_its_base(base):
    child = write(
        base.parent,
        "child.yaml",
        f"""\
extends: base.yaml
remove: [weapons]
concepts:
  - name: nudity
    threshold: 0.21
  - name: drugs
    embedding: {E[4]}
""",
    )
    code, data = run_json(base, child)
    assert code == 1
    assert data["concepts"] == {
        "added": ["drugs"],
        "removed": ["weapons"],
        "renamed": [],
        "changed": {"nudity": {"threshold": {"old": 0.3, "new": 0.21, "affects_decisions": True}}},
    }
    assert data["settings"] == {}  # the child inherits every setting and its name
    lines = run(base, child).stdout.splitlines()
    assert lines[2:] == [
        "+ concept drugs: threshold 0.2, action blur, inline embedding (32 values),"
        f" vector {data_vector(child, 'drugs')}",
        "- concept weapons: threshold 0.2, action blur, inline embedding (32 values),"
        f" vector {data_vector(base, 'weapons')}",
        "~ concept nudity",
        "    threshold: 0.3 -> 0.21",
        "different: the policies can decide differently (1 added, 1 removed, 1 changed)",
    ]


def data_vector(path: Path, name: str) -> str:
    """The logged vector digest of one concept, from the compiled policy (width 32 stub)."""
    from moderation.lifecycle.diff_sides import EmbeddingsOnly

    loaded = load_policy(path)
    compiled = compile_policy(loaded, EmbeddingsOnly(loaded), cache=False)
    digests = compiled.vector_digests[0] + compiled.vector_digests[1]
    return digests[(*compiled.concept_names, *compiled.special_names).index(name)]


def test_examples_are_compared_by_content(tmp_path):
    (tmp_path / "ex").mkdir()
    (tmp_path / "ex" / "a.png").write_bytes(b"first image")
    text = "policy: ex\nconcepts:\n  - {name: logo, examples: ex, threshold: 0.9}\n"
    old = write(tmp_path, "old.yaml", text)
    new = write(tmp_path, "new.yaml", text.replace("logo", "brand"))
    code, data = run_json(old, new)
    assert data["concepts"]["renamed"][0]["old"] == "logo"
    (tmp_path / "ex" / "a.png").write_bytes(b"another image")  # old.yaml's content changes too
    code, data = run_json(old, old)
    assert code == 0
    other = tmp_path / "ex2"
    other.mkdir()
    (other / "a.png").write_bytes(b"first image")
    code, data = run_json(old, write(tmp_path, "new.yaml", text.replace("ex,", "ex2,")))
    assert code == 1
    entry = data["concepts"]["changed"]["logo"]["definition"]
    assert entry["affects_decisions"] is True and entry["old"]["content"] != entry["new"]["content"]


# -- with the tiny model --------------------------------------------------------------------


def test_yaml_and_its_compiled_artifact_are_identical(tmp_path, tiny_clip_dir):
    yaml = write(tmp_path, "p.yaml", PROMPTS, model=tiny_clip_dir)
    artifact = tmp_path / "p.compiled.safetensors"
    compiled = CliRunner().invoke(main, ["policy", "compile", str(yaml), "-o", str(artifact)])
    assert compiled.exit_code == 0, compiled.output
    code, data = run_json(yaml, artifact, "--model", tiny_clip_dir)
    assert code == 0, data
    assert data["old"]["digest"] == data["new"]["digest"]
    assert data["old"]["kind"] == "yaml" and data["new"]["kind"] == "compiled"
    code, data = run_json(artifact, artifact)
    assert code == 0
    # Without a model the prompts cannot be compared with the artifact's vectors: fail closed.
    code, data = run_json(yaml, artifact)
    assert code == 1 and data["not_compared"] == ["cat", "car", "minor"]
    assert data["old"]["digest"] is None
    assert "pass --model to compile them" in run(yaml, artifact).stdout


def test_embedding_yaml_and_its_artifact_are_identical_without_a_model(tmp_path, tiny_clip_dir):
    yaml = write(tmp_path, "base.yaml", BASE, model=tiny_clip_dir)
    artifact = tmp_path / "base.compiled.safetensors"
    assert (
        CliRunner().invoke(main, ["policy", "compile", str(yaml), "-o", str(artifact)]).exit_code
        == 0
    )
    code, data = run_json(yaml, artifact)
    assert code == 0, data
    assert data["old"]["digest"] == data["new"]["digest"]  # the digest `policy compile` gives


def test_with_a_model_a_changed_prompt_reports_the_cosine(tmp_path, tiny_clip_dir, encoder):
    old = write(tmp_path, "old.yaml", PROMPTS, model=tiny_clip_dir)
    new = write(
        tmp_path, "new.yaml", PROMPTS.replace("a photo of a cat", "a dog"), model=tiny_clip_dir
    )
    code, data = run_json(old, new, "--model", tiny_clip_dir)
    assert code == 1
    entry = data["concepts"]["changed"]["cat"]["definition"]
    a, b = (compile_policy(load_policy(p), encoder, cache=False) for p in (old, new))
    expected = float(
        np.dot(a.concept_matrix[0].double().numpy(), b.concept_matrix[0].double().numpy())
    )
    assert entry["cosine"] == pytest.approx(expected, abs=1e-6) and entry["cosine"] < 0.999
    assert entry["old"]["prompts"] == ["a photo of a cat"] and entry["new"]["prompts"] == ["a dog"]
    assert list(data["concepts"]["changed"]) == ["cat"]
    line = next(
        ln
        for ln in run(old, new, "--model", tiny_clip_dir).stdout.splitlines()
        if "definition" in ln
    )
    assert line.startswith('    definition: prompts "a photo of a cat", vector ')
    assert f"(cosine {expected:.4f})" in line


# -- errors and terminal safety -------------------------------------------------------------


def test_an_unusable_policy_is_one_line_and_exit_2(base, tmp_path):
    bad = edited(base, "threshold: 0.3}", "threshold: 3}", name="bad.yaml")
    result = run(base, bad)
    assert result.exit_code == 2 and result.stdout == ""
    assert re.fullmatch(
        rf"Error: {re.escape(str(bad))}:8:\d+ concepts\[0\]\.threshold: must be between -1 and 1\n",
        result.stderr,
    )
    result = run(tmp_path / "missing.yaml", base)
    assert (result.exit_code, result.stderr) == (
        2,
        f"Error: {tmp_path / 'missing.yaml'}: file not found\n",
    )
    corrupt = tmp_path / "x.compiled.safetensors"
    corrupt.write_bytes(b"not safetensors")
    result = run(base, corrupt, "--json")
    assert result.exit_code == 2 and result.stdout == ""
    assert (
        result.stderr.startswith(f"Error: {corrupt}: not a compiled policy")
        and result.stderr.count("\n") == 1
    )
    result = run(base, base, "--model", tmp_path / "no-such-model")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.stderr


def test_control_characters_are_escaped_in_text(tmp_path):
    text = 'policy: p\nconcepts:\n  - {name: "cat\\u202e", prompts: ["a\\x1b[2J cat"]}\n'
    old = write(tmp_path, "old.yaml", text)
    new = write(tmp_path, "new.yaml", text.replace("a\\x1b[2J cat", "a\\x1b]0;pwned\\x07 dog"))
    result = run(old, new)
    assert result.exit_code == 1
    assert "\x1b" not in result.stdout and "\u202e" not in result.stdout
    assert "~ concept cat\\u202e" in result.stdout.splitlines()
    code, data = run_json(old, new)
    assert list(data["concepts"]["changed"]) == ["cat\u202e"]  # JSON keeps the exact name


def test_a_mixed_yaml_without_a_model_compares_its_embeddings_with_the_artifact(
    tmp_path, tiny_clip_dir
):
    text = PROMPTS.replace("special_care:", f"  - {{name: flag, embedding: {E[7]}}}\nspecial_care:")
    yaml = write(tmp_path, "p.yaml", text, model=tiny_clip_dir)
    artifact = tmp_path / "p.compiled.safetensors"
    assert (
        CliRunner().invoke(main, ["policy", "compile", str(yaml), "-o", str(artifact)]).exit_code
        == 0
    )
    code, data = run_json(yaml, artifact)
    assert code == 1
    assert data["not_compared"] == ["cat", "car", "minor"]  # not "flag": its vector is known
    assert "flag" not in data["concepts"]["changed"]


def side(name: str, vector: list[float] | None = None, key: tuple | None = None):
    from moderation.lifecycle.diff_sides import ConceptSide

    unit = (
        None if vector is None else (np.array(vector) / np.linalg.norm(vector)).astype(np.float32)
    )
    return ConceptSide(name, False, 0.2, "blur", None, "medium", {}, key, unit)


def test_renames_need_a_cosine_of_0_999_or_the_same_definition():
    from moderation.lifecycle.diff import match_renames

    removed = [side("a", [1.0, 0.0]), side("b", [0.0, 1.0]), side("c", key=("prompts", ("x",)))]
    added = [
        side("b2", [0.04, 1.0]),  # cosine 0.9992 with b
        side("a2", [1.0, 0.05]),  # cosine 0.9988 with a: not a rename
        side("c2", key=("prompts", ("x",))),
        side("c3", key=("prompts", ("y",))),
    ]
    pairs = [(old.name, new.name) for old, new in match_renames(removed, added)]
    assert pairs == [("c", "c2"), ("b", "b2")]
    # Each concept is in one pair at most, the closest first.
    pairs = match_renames([side("a", [1.0, 0.0])], [side("x", [1.0, 0.04]), side("y", [1.0, 0.0])])
    assert [(o.name, n.name) for o, n in pairs] == [("a", "y")]
