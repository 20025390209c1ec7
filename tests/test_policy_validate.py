"""`moderation policy validate`: exact error lines, output shapes and exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import save_file

from moderation.cli import main

REPO = Path(__file__).resolve().parents[1]

GOOD = """\
policy: good
categories: [sexual]
concepts:
  - name: nudity
    category: sexual
    prompts: ["a photo of a naked person"]
  - name: sd-1
    embedding: {file: emb.safetensors, tensor: concept_embeds, row: 1}
special_care:
  concepts:
    - name: young child
      prompts: ["a photo of a young child"]
"""


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_clip_dir) -> Path:
    """cwd = tmp/pol, with embedding files inside, a secret outside and a 32-wide model beside."""
    folder = tmp_path / "pol"
    folder.mkdir()
    np.save(tmp_path / "secret.npy", np.ones(32, np.float32))
    np.save(folder / "w31.npy", np.ones(31, np.float32))
    np.save(folder / "nan.npy", np.array([1.0, 2.0, np.inf], np.float32))
    (folder / "link.npy").symlink_to(tmp_path / "secret.npy")
    matrix = np.random.default_rng(0).standard_normal((3, 32)).astype(np.float32)  # [3, D]
    save_file({"concept_embeds": matrix}, str(folder / "emb.safetensors"))
    # A real (tiny) 32-wide model: `validate --model` compiles with it.
    (tmp_path / "model32").symlink_to(tiny_clip_dir)
    monkeypatch.chdir(folder)
    return folder


def run(*args: str):
    return CliRunner().invoke(main, ["policy", "validate", *args], catch_exceptions=False)


def write(name: str, text: str) -> str:
    Path(name).write_text(textwrap.dedent(text), encoding="utf-8")
    return name


HEAD = "policy: t\nconcepts:\n  - name: a\n"
BAD = [
    ("unknown key", HEAD + "    prompts: [x]\n    colour: red\n", [],
     "p.yaml:5:5 concepts[0].colour: unknown key"),
    ("misspelt key", HEAD + "    prompts: [x]\n    treshold: 0.2\n", [],
     "p.yaml:5:5 concepts[0].treshold: unknown key (did you mean 'threshold'?)"),
    ("string for a number", HEAD + '    prompts: [x]\n    threshold: "0.2"\n', [],
     "p.yaml:5:16 concepts[0].threshold: expected a number, got string"),
    ("bool for a number", HEAD + "    prompts: [x]\n    threshold: true\n", [],
     "p.yaml:5:16 concepts[0].threshold: expected a number, got boolean"),
    ("threshold out of range", HEAD + "    prompts: [x]\n    threshold: 1.5\n", [],
     "p.yaml:5:16 concepts[0].threshold: must be between -1 and 1"),
    ("unknown action", HEAD + "    prompts: [x]\n    action: block\n", [],
     "p.yaml:5:13 concepts[0].action: must be one of 'allow', 'review', 'blur', 'pixelate' or 'blackout', got 'block'"),
    ("wrong width for --model", HEAD + "    embedding: {file: w31.npy}\n", ["--model", "../model32"],
     "p.yaml:4:16 concepts[0].embedding: embedding has 31 values, the model's projection width is 32"),
    ("wrong width for the policy's model", "model: ../model32\n" + HEAD + "    embedding: {file: w31.npy}\n", [],
     "p.yaml:5:16 concepts[0].embedding: embedding has 31 values, the model's projection width is 32"),
    ("widths disagree", HEAD + "    embedding: [1, 2, 3]\n  - name: b\n    embedding: [1, 2]\n", [],
     "p.yaml:6:16 concepts[1].embedding: embedding has 2 values, but concepts[0].embedding has 3"),
    ("NaN inline", HEAD + "    embedding: [1, .nan, 3]\n", [],
     "p.yaml:4:20 concepts[0].embedding[1]: must be a finite number"),
    ("inf in a .npy file", HEAD + "    embedding: {file: nan.npy}\n", [],
     "p.yaml:4:16 concepts[0].embedding: embedding value 2 is not finite (inf)"),
    ("file above the policy folder", HEAD + "    embedding: {file: ../secret.npy}\n", [],
     "p.yaml:4:23 concepts[0].embedding.file: '../secret.npy' is outside the policy's folder"),
    ("symlink out of the policy folder", HEAD + "    embedding: {file: link.npy}\n", [],
     "p.yaml:4:23 concepts[0].embedding.file: 'link.npy' is outside the policy's folder"),
    ("absolute file", HEAD + "    embedding: {file: /etc/passwd.npy}\n", [],
     "p.yaml:4:23 concepts[0].embedding.file: '/etc/passwd.npy' must be a path relative to the policy's folder"),
    ("YAML syntax", HEAD + "    prompts: [x]\n    threshold: 0.2: 3\n", [],
     "p.yaml:5:19 (yaml): mapping values are not allowed here"),
    ("unclosed list", HEAD + "    prompts: [x\n", [],
     "p.yaml:5:1 (yaml): expected ',' or ']', but got '<stream end>' (while parsing a flow sequence on line 4)"),
    ("duplicate key", HEAD + "    prompts: [x]\n    name: b\n", [],
     "p.yaml:5:5 concepts[0].name: duplicate key 'name' (first given on line 3)"),
    ("duplicate concept name", HEAD + "    prompts: [x]\n  - name: a\n    prompts: [y]\n", [],
     "p.yaml:5:11 concepts[1].name: duplicate concept name 'a' (see concepts[0])"),
    ("duplicate special-care name",
     HEAD + "    prompts: [x]\nspecial_care:\n  concepts: [{name: a, prompts: [y]}]\n", [],
     "p.yaml:6:21 special_care.concepts[0].name: duplicate concept name 'a' (see concepts[0])"),
    ("undeclared category", "categories: [sexual]\n" + HEAD + "    category: gore\n    prompts: [x]\n", [],
     "p.yaml:5:15 concepts[0].category: category 'gore' is not declared in categories"),
    ("on_error allow", "on_error: allow\n" + HEAD + "    prompts: [x]\n", [],
     "p.yaml:1:11 on_error: must not be 'allow': an image that could not be checked must not pass unchecked (use review, blur, pixelate or blackout)"),
    ("prompts and embedding", HEAD + "    prompts: [x]\n    embedding: [1, 2]\n", [],
     "p.yaml:5:5 concepts[0].embedding: give either 'prompts' or 'embedding', not both"),
    ("neither prompts nor embedding", HEAD + "    threshold: 0.2\n", [],
     "p.yaml:3:5 concepts[0]: needs 'prompts', 'embedding' or 'examples'"),
    ("missing name", "policy: t\nconcepts:\n  - prompts: [x]\n", [],
     "p.yaml:3:5 concepts[0].name: required key is missing"),
    ("missing policy name", "concepts:\n  - {name: a, prompts: [x]}\n", [],
     "p.yaml:1:1 policy: required key is missing"),
    ("no concepts", "policy: t\nconcepts: []\n", [],
     "p.yaml:2:11 concepts: the policy needs at least one concept"),
    ("diffusers with a review band", "compat: diffusers\nreview_band: 0.01\n" + HEAD + "    prompts: [x]\n", [],
     "p.yaml:2:14 review_band: must be 0 when compat is 'diffusers'"),
    ("special-care action", HEAD + "    prompts: [x]\nspecial_care:\n  concepts: [{name: s, prompts: [y], action: blur}]\n", [],
     "p.yaml:6:46 special_care.concepts[0].action: special-care concepts take no action of their own; set special_care.escalate"),
    ("not a mapping", "- policy: t\n", [],
     "p.yaml:1:1 <root>: expected a mapping, got list"),
    ("custom tag", HEAD + "    prompts: !include other.yaml\n", [],
     "p.yaml:4:14 concepts[0].prompts: unsupported YAML tag !include"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "args", "line"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_policy_gives_one_exact_line(workdir, text, args, line):
    result = run(write("p.yaml", text), *args)
    assert result.exit_code == 1
    assert result.stdout == line + "\n"
    assert result.stderr == "Error: 1 of 1 policy file is invalid\n"


def test_python_tags_are_rejected_and_never_run(workdir):
    marker = workdir / "PWNED_x"
    write("p.yaml", f'policy: t\nconcepts: !!python/object/apply:os.system ["touch {marker}"]\n')
    result = run("p.yaml")
    assert result.exit_code == 1
    assert (
        result.stdout
        == "p.yaml:2:11 concepts: unsupported YAML tag !!python/object/apply:os.system\n"
    )
    assert not marker.exists()


def test_good_policy_is_ok(workdir):
    result = run(write("good.yaml", GOOD), "--model", "../model32")
    assert result.exit_code == 0, result.output
    assert result.stdout == "good.yaml: ok (2 concepts, 1 special-care)\n"
    assert result.stderr == ""


def test_folder_validates_every_yaml_and_lists_all_errors(workdir):
    Path("policies").mkdir()
    (Path("policies") / "a.yaml").write_text(GOOD.replace("emb.safetensors", "../emb.safetensors"))
    (Path("policies") / "b.yml").write_text(
        "policy: b\nconcepts: [{name: x, prompts: [y], z: 1}]\n"
    )
    (Path("policies") / "notes.txt").write_text("not a policy")
    result = run("policies", "missing.yaml")
    assert result.exit_code == 1
    assert result.stdout.splitlines() == [
        "policies/a.yaml:8:23 concepts[1].embedding.file: '../emb.safetensors' is outside the policy's folder",
        "policies/b.yml:2:36 concepts[0].z: unknown key",
        "missing.yaml: file not found",
    ]
    assert result.stderr == "Error: 3 of 3 policy files are invalid\n"


def test_empty_folder_is_invalid(workdir):
    Path("empty").mkdir()
    result = run("empty")
    assert (result.exit_code, result.stdout) == (
        1,
        "empty: no .yaml or .yml files in this folder\n",
    )


def test_json_output(workdir):
    write("good.yaml", GOOD)
    write("bad.yaml", HEAD + "    prompts: [x]\n    threshold: 2\n")
    result = run("good.yaml", "bad.yaml", "--json")
    assert result.exit_code == 1
    assert json.loads(result.stdout) == {
        "ok": False,
        "files": [
            {
                "path": "good.yaml",
                "ok": True,
                "concepts": 2,
                "special_care": 1,
                "issues": [],
                "warnings": [],
            },
            {
                "path": "bad.yaml",
                "ok": False,
                "concepts": None,
                "special_care": None,
                "issues": [
                    {
                        "file": "bad.yaml",
                        "line": 5,
                        "col": 16,
                        "path": "concepts[0].threshold",
                        "message": "must be between -1 and 1",
                    }
                ],
                "warnings": [],
            },
        ],
    }


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "Missing argument 'PATHS...'."),
        (["good.yaml", "--bogus"], "No such option '--bogus'."),
        (["good.yaml", "--model", "../nowhere"], "Invalid value for '--model': cannot find the projection width of '../nowhere'"),
    ],
)  # fmt: skip
def test_usage_errors_exit_2(workdir, args, message):
    write("good.yaml", GOOD)
    result = run(*args)
    assert result.exit_code == 2
    assert message in result.stderr


def test_python_dash_m_exit_codes(workdir):
    write("good.yaml", GOOD)
    write("bad.yaml", "policy: t\n")
    command = [sys.executable, "-m", "moderation", "policy", "validate"]
    env = {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    codes = [
        subprocess.run([*command, *args], cwd=workdir, env=env, capture_output=True).returncode
        for args in (["good.yaml", "bad.yaml"], [])
    ]
    assert codes == [1, 2]


def test_warnings_are_printed_with_their_place_and_listed_in_json(tmp_path, monkeypatch):
    import policy.loader

    monkeypatch.setattr(policy.loader, "INLINE_NUMBERS_WARNING", 8)
    path = tmp_path / "inline.yaml"
    path.write_text(
        "policy: inline\nconcepts:\n"
        "  - {name: a, embedding: [0.1, 0.2, 0.3, 0.4]}\n"
        "  - {name: b, embedding: [0.4, 0.3, 0.2, 0.1]}\n",
        encoding="utf-8",
    )
    runner = CliRunner()
    result = runner.invoke(main, ["policy", "validate", str(path)], catch_exceptions=False)
    assert result.exit_code == 0
    assert result.stdout == f"{path}: ok (2 concepts, 0 special-care)\n"
    assert result.stderr == (
        f"warning: {path}:3:26 concepts[0].embedding: 2 concepts give their embeddings inline"
        " (8 numbers), which is slow to read (YAML parses each number on its own): put them in"
        " a .safetensors or .npy file beside the policy and name rows with"
        " `embedding: {file: F, tensor: T, row: I}`\n"
    )
    result = runner.invoke(main, ["policy", "validate", str(path), "--json"])
    [warning] = json.loads(result.stdout)["files"][0]["warnings"]
    assert (warning["line"], warning["col"], warning["path"]) == (3, 26, "concepts[0].embedding")
