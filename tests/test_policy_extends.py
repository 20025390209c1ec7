"""`extends:` policies: flattened by the loader, same decisions as the flat policy, errors named."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from moderation.engine import Moderator
from policy import PolicyError, compile_policy, load_policy
from policy.extends import builtin_folder

ROOT = Path(__file__).resolve().parent.parent
E = [[1.0 if i == k else 0.0 for i in range(32)] for k in range(32)]  # basis vectors

BASE = f"""\
# The base policy.
policy: base
version: 1
model: MODEL
defaults: {{threshold: 0.2, action: blur, severity: medium}}
review_band: 0.01
actions:
  blur: {{radius: 0.1}}
  pixelate: {{block: 0.08}}
categories: [a, b]
concepts:
  - name: nudity
    category: a
    embedding: {E[0]}
    threshold: 0.3
  - name: gore
    category: b
    embedding: {E[1]}
    action: blackout
  - name: weapons
    category: b
    embedding: {E[2]}
special_care:
  adjustment: 0.01
  concepts:
    - name: minor
      embedding: {E[3]}
      threshold: 0.25
"""

CHILD = f"""\
# Stricter on nudity, no weapons concept, one more for drugs.
extends: base.yaml
policy: child
remove: [weapons]
actions:
  blur: {{radius: 0.12}}
concepts:
  - name: nudity
    threshold: 0.22
  - name: drugs
    category: b
    embedding: {E[4]}
    action: pixelate
"""

FLAT = f"""\
policy: child
version: 1
model: MODEL
defaults: {{threshold: 0.2, action: blur, severity: medium}}
review_band: 0.01
actions:
  blur: {{radius: 0.12}}
  pixelate: {{block: 0.08}}
categories: [a, b]
concepts:
  - name: nudity
    category: a
    embedding: {E[0]}
    threshold: 0.22
  - name: gore
    category: b
    embedding: {E[1]}
    action: blackout
  - name: drugs
    category: b
    embedding: {E[4]}
    action: pixelate
special_care:
  adjustment: 0.01
  concepts:
    - name: minor
      embedding: {E[3]}
      threshold: 0.25
"""


def write(folder: Path, name: str, text: str, **fmt) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.replace("MODEL", str(fmt.get("model", "MODEL"))), encoding="utf-8")
    return path


def errors(path: Path) -> str:
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    return str(caught.value)


@pytest.fixture
def family(tmp_path, tiny_clip_dir):
    write(tmp_path, "base.yaml", BASE, model=tiny_clip_dir)
    child = write(tmp_path, "child.yaml", CHILD)
    flat = write(tmp_path, "flat.yaml", FLAT, model=tiny_clip_dir)
    return child, flat


def test_child_compiles_to_the_same_decisions_as_the_flat_policy(family, encoder):
    child, flat = (load_policy(p) for p in family)
    assert child.model_dump() == flat.model_dump()
    compiled = [compile_policy(p, encoder, cache=False) for p in (child, flat)]
    assert compiled[0].digest == compiled[1].digest

    generator = torch.Generator().manual_seed(0)
    embeddings = torch.randn(64, 32, generator=generator)
    embeddings[:, :5] += 0.6 * torch.rand(64, 5, generator=generator)  # some fire, some do not
    results = [Moderator(c).moderate_embeddings(embeddings) for c in compiled]
    assert {d.action for d in results[0]} >= {"allow", "pixelate", "blackout"}
    for ours, theirs in zip(*results, strict=True):
        assert (ours.action, ours.fired, ours.special_hits) == (
            theirs.action,
            theirs.fired,
            theirs.special_hits,
        )
        assert np.array_equal(ours.scores, theirs.scores)


def test_child_and_base_differ_only_where_the_child_says(family, tmp_path):
    """What a policy diff of child against base will show, through the loader."""
    child = load_policy(family[0]).model_dump()
    base = load_policy(tmp_path / "base.yaml").model_dump()
    assert {k for k in base if base[k] != child[k]} == {"policy", "actions", "concepts"}
    assert child["actions"]["blur"]["radius"] == 0.12
    assert child["actions"]["pixelate"]["block"] == 0.08
    by_name = {c["name"]: c for c in base["concepts"]}
    assert [c["name"] for c in child["concepts"]] == ["nudity", "gore", "drugs"]
    assert child["concepts"][0] == {**by_name["nudity"], "threshold": 0.22}
    assert child["concepts"][1] == by_name["gore"]
    assert child["special_care"] == base["special_care"]


def test_the_digest_covers_the_base(family, tmp_path, encoder):
    before = compile_policy(load_policy(family[0]), encoder, cache=False).digest
    base = tmp_path / "base.yaml"
    base.write_text(base.read_text().replace("radius: 0.1}", "radius: 0.11}"), encoding="utf-8")
    unchanged = compile_policy(load_policy(family[0]), encoder, cache=False).digest
    assert unchanged == before  # the child sets the blur radius itself
    base.write_text(base.read_text().replace("action: blackout", "action: blur"))
    assert compile_policy(load_policy(family[0]), encoder, cache=False).digest != before


def test_an_error_inside_the_base_names_the_base(family, tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text(base.read_text().replace("review_band: 0.01", "review_band: 0.7"))
    text = base.read_text().replace(f"    embedding: {E[1]}", "    threshold: 7")
    base.write_text(text)
    # gore is concepts[1] of base.yaml; the message names that file, line and path
    assert errors(family[0]) == (
        f"{tmp_path / 'base.yaml'}:6:14 review_band: must be at least 0 and less than 0.5\n"
        f"{tmp_path / 'base.yaml'}:18:16 concepts[1].threshold: must be between -1 and 1"
    )


def test_an_inherited_value_is_named_by_its_place_in_the_base(tmp_path, tiny_clip_dir):
    write(tmp_path, "base.yaml", BASE.replace("category: b\n    embedding: " + str(E[2]),
          "category: c\n    embedding: " + str(E[2])), model=tiny_clip_dir)  # fmt: skip
    child = write(tmp_path, "child.yaml", CHILD.replace("remove: [weapons]", "remove: [gore]"))
    # weapons is concepts[2] in base.yaml (concepts[1] once gore is removed): the base's path
    assert errors(child) == (
        f"{tmp_path / 'base.yaml'}:21:15 concepts[2].category: "
        "category 'c' is not declared in categories"
    )


@pytest.mark.parametrize(
    ("child", "message"),
    [
        ("extends: missing.yaml\n", "child.yaml:1:10 extends: base policy 'missing.yaml' not found"),
        ("extends: ../outside.yaml\n", "child.yaml:1:10 extends: base policy '../outside.yaml' is outside the policy's folder"),
        ("extends: /etc/passwd\n", "child.yaml:1:10 extends: '/etc/passwd' must be a path relative to this policy's folder, or builtin:NAME"),
        ("extends: [a]\n", "child.yaml:1:10 extends: expected a policy file name or builtin:NAME, got list"),
        ("extends: sub\n", "child.yaml:1:10 extends: base policy 'sub' is not a file"),
        ("extends: builtin:nope\n", "child.yaml:1:10 extends: no shipped policy 'nope' (shipped: default, sd-safety-checker)"),
        ("policy: x\nremove: [a]\n", "child.yaml:2:1 remove: 'remove' applies only to a policy that extends another (add 'extends')"),
        ("extends: base.yaml\nremove: [gore, nope]\n", "child.yaml:2:16 remove[1]: 'nope' is not a concept of the base policy {folder}/base.yaml (it has: nudity, gore, weapons, minor)"),
    ],
)  # fmt: skip
def test_bad_extends(tmp_path, tiny_clip_dir, child, message, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path.parent / "outside.yaml").write_text("policy: out\n")
    write(tmp_path, "base.yaml", BASE, model=tiny_clip_dir)
    write(tmp_path, "child.yaml", child)
    assert errors(Path("child.yaml")) == message.format(folder=".").replace("./base", "base")


def test_cycles_are_named(tmp_path):
    write(tmp_path, "a.yaml", "extends: b/b.yaml\npolicy: a\n")
    write(tmp_path, "b/b.yaml", "extends: ../a.yaml\npolicy: b\n")
    a = tmp_path / "a.yaml"
    assert errors(a) == (
        f"{tmp_path}/b/b.yaml:1:10 extends: extends cycle: {a} -> {tmp_path}/b/b.yaml -> {a}"
    )
    write(tmp_path, "self.yaml", "extends: self.yaml\n")
    assert errors(tmp_path / "self.yaml").endswith(
        f"extends: extends cycle: {tmp_path}/self.yaml -> {tmp_path}/self.yaml"
    )


def test_files_of_a_base_are_read_from_the_base_folder(tmp_path, tiny_clip_dir, encoder):
    vectors = np.eye(32, dtype=np.float32)[5:7]
    (tmp_path / "bases").mkdir()
    np.save(tmp_path / "bases" / "vectors.npy", vectors)
    write(tmp_path, "bases/base.yaml", f"policy: base\nmodel: {tiny_clip_dir}\n"
          "concepts:\n  - name: five\n    embedding: {file: vectors.npy, row: 0}\n")  # fmt: skip
    child = write(tmp_path, "child.yaml", "extends: bases/base.yaml\nconcepts:\n"
                  "  - name: six\n    embedding: {file: bases/vectors.npy, row: 1}\n")  # fmt: skip
    policy = load_policy(child)
    assert [c.name for c in policy.concepts] == ["five", "six"]
    assert np.array_equal(policy.concepts[0].vector, vectors[0])
    assert np.array_equal(policy.concepts[1].vector, vectors[1])
    bad = write(tmp_path, "bad.yaml", "extends: bases/base.yaml\nconcepts:\n"
                "  - name: six\n    embedding: {file: vectors.npy}\n")  # fmt: skip
    assert errors(bad) == f"{bad}:4:23 concepts[0].embedding.file: file 'vectors.npy' not found"


def test_a_child_redefines_merges_and_drops(tmp_path, tiny_clip_dir):
    write(tmp_path, "base.yaml", BASE, model=tiny_clip_dir)
    child = write(tmp_path, "child.yaml", "extends: base.yaml\n"
                  "special_care: {adjustment: 0.02}\n"
                  "defaults: {threshold: 0.25}\n"
                  "remove: [gore]\n"
                  "concepts:\n  - name: gore\n    prompts: [blood]\n"
                  "  - name: nudity\n    prompts: [a nude body]\n")  # fmt: skip
    policy = load_policy(child)
    by_name = {c.name: c for c in policy.concepts}
    # nudity keeps its category and threshold, its definition is replaced
    assert (by_name["nudity"].prompts, by_name["nudity"].embedding) == (["a nude body"], None)
    assert (by_name["nudity"].threshold, by_name["nudity"].category) == (0.3, "a")
    # gore was removed, then defined again from scratch: no category, no action
    assert (by_name["gore"].category, by_name["gore"].action) == (None, None)
    assert [c.name for c in policy.concepts] == ["nudity", "weapons", "gore"]
    assert (policy.defaults.threshold, policy.defaults.action) == (0.25, "blur")
    assert errors(
        write(
            tmp_path,
            "c2.yaml",
            "extends: base.yaml\nremove: [minor]\nspecial_care: {adjustment: 0.02}\n",
        )
    ).endswith(  # fmt: skip
        "special_care.concepts: must not be empty"
    )
    no_care = load_policy(write(tmp_path, "c3.yaml", "extends: base.yaml\nremove: [minor]\n"))
    assert no_care.special_care is None  # every special-care concept removed: none left


def test_builtin_default(tmp_path, tiny_clip_dir, encoder):
    child = write(tmp_path, "mine.yaml", f"extends: builtin:default\npolicy: mine\n"
                  f"model: {tiny_clip_dir}\nremove: [hate-symbols]\n"
                  "concepts:\n  - name: gore\n    threshold: 0.3\n")  # fmt: skip
    policy = load_policy(child)
    default = load_policy(builtin_folder() / "default.yaml")
    assert len(policy.concepts) == len(default.concepts) - 1
    assert {c.name: c.threshold for c in policy.concepts}["gore"] == 0.3
    assert policy.special_care == default.special_care
    compiled = compile_policy(policy, encoder, cache=False)
    assert compiled.model == str(tiny_clip_dir) and compiled.name == "mine"


@pytest.mark.slow
def test_an_installed_package_ships_the_builtin_policies(tmp_path):
    """`pip install .` (not editable) puts policies/ beside the code: builtin:default loads."""
    target = tmp_path / "site"
    source = tmp_path / "src"
    shutil.copytree(
        ROOT, source, ignore=shutil.ignore_patterns(".venv", ".git", "*.db", "__pycache__")
    )
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(source)],
        check=True, capture_output=True,
    )  # fmt: skip
    assert (target / "policies" / "default.yaml").is_file()
    child = tmp_path / "child.yaml"
    child.write_text("extends: builtin:default\npolicy: installed\n", encoding="utf-8")
    code = (
        "import sys, policy; from policy import load_policy;"
        f"p = load_policy({str(child)!r}); print(policy.__file__, p.policy, len(p.concepts))"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, check=True, capture_output=True,
        text=True,
    ).stdout.split()  # fmt: skip
    assert out[0].startswith(str(target)) and out[1:] == ["installed", "8"]
