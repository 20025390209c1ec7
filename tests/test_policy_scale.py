"""Large policies load and compile in linear time (issue 8 item 17), checked by structure, not
by the clock: each embedding file is opened once, list items take no dict entry each, libyaml
composes what the pure-Python composer would, and the warning points at embedding files.
Measured figures live in BENCHMARKS.md (`tests/large_policy.py` reproduces them)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import safetensors
import yaml

import policy.loader
from policy import compile_policy, load_policy
from policy.embedding_files import WHOLE_TENSOR_AFTER
from policy.errors import PolicyError
from policy.yaml_loader import PolicyYamlLoader, _FastComposer, _load, load_yaml
from tests.large_policy import VectorEncoder, vectors, write_inline, write_with_file

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not yaml.__with_libyaml__, reason="PyYAML without libyaml")


def test_one_open_per_embedding_file_and_rows_bit_for_bit(tmp_path, monkeypatch):
    opened = []
    real = safetensors.safe_open

    def counting(path, *args, **kwargs):
        opened.append(Path(path).name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(safetensors, "safe_open", counting)
    n = 3 * WHOLE_TENSOR_AFTER  # rows read one by one, then the whole tensor at once
    loaded = load_policy(write_with_file(tmp_path, n, 8))
    assert opened == ["large.safetensors"]
    expected = vectors(n, 8)
    for i, concept in enumerate(loaded.concepts):
        assert concept.vector.dtype == np.float32
        assert concept.vector.tobytes() == expected[i].tobytes()


def test_inline_list_items_take_no_position_entry_each(tmp_path):
    narrow = load_yaml(write_inline(tmp_path, 50, 4).read_text(), "narrow.yaml")
    wide = load_yaml(write_inline(tmp_path, 50, 64).read_text(), "wide.yaml")
    assert len(wide.values) == len(narrow.values)  # grows with concepts, not with numbers


def test_a_bad_number_deep_in_a_large_inline_policy_is_located(tmp_path):
    path = write_inline(tmp_path, 50, 64)
    lines = path.read_text().splitlines()
    head, numbers = lines[33].split("[", 1)  # concepts[30]
    items = numbers.split(", ")
    col = len(head) + 1 + len(", ".join(items[:40])) + 3  # 1-based, after "[" and ", "
    items[40] = ".nan"
    lines[33] = head + "[" + ", ".join(items)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert str(info.value) == f"{path}:34:{col} concepts[30].embedding[40]: must be a finite number"


def test_libyaml_and_pure_python_composers_agree(tmp_path):
    texts = [
        (REPO / "policies" / "default.yaml").read_text(encoding="utf-8"),
        (REPO / "policies" / "sd-safety-checker.yaml").read_text(encoding="utf-8"),
        write_inline(tmp_path, 20, 5).read_text(),
        write_with_file(tmp_path, 20, 5).read_text(),
        'policy: "ünï 😀"\nconcepts:\n  - name: ü😀\n    prompts: ["😀😀", \'ä\', b]\n'
        "    description: |\n      multi\n      line 😀\n"
        "  - {name: x, embedding: [1, 2.5, .inf, 1_000.5, 0x1F, 017, -3, +.5, 1e3]}\n"
        "flags: [yes, no, on, true, null, ~, 2024-01-01, '1']\nkeys: {1: a, yes: b, 0.5: c}\n",
    ]
    for text in texts:
        fast = _load(text, "f.yaml", _FastComposer)
        slow = _load(text, "f.yaml", PolicyYamlLoader)
        assert (fast.data, fast.values, fast.keys) == (slow.data, slow.values, slow.keys)
        assert fast.scalar_items == slow.scalar_items


@pytest.mark.parametrize(
    ("text", "issue"),
    [
        ("a: &x [1]\nb: *x\n", "2:4 (yaml): YAML aliases (*x) are not supported"),
        ("a: [1, 2\n", "2:1 (yaml): expected ',' or ']', but got '<stream end>' (while parsing a"
         " flow sequence on line 1)"),
    ],
)  # fmt: skip
def test_what_libyaml_would_say_differently_is_said_by_the_pure_python_composer(text, issue):
    with pytest.raises(PolicyError) as info:
        load_yaml(text, "f.yaml")
    assert str(info.value) == f"f.yaml:{issue}"


def test_many_inline_numbers_warn_and_point_at_embedding_files(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(policy.loader, "INLINE_NUMBERS_WARNING", 40)
    path = write_inline(tmp_path, 5, 8)  # 40 numbers
    with caplog.at_level(logging.WARNING, logger="policy.loader"):
        loaded = load_policy(path)
    message = (
        f"{path}:4:27 concepts[0].embedding: 5 concepts give their embeddings inline (40 numbers),"
        " which is slow to read (YAML parses each number on its own): put them in a .safetensors"
        " or .npy file beside the policy and name rows with `embedding: {file: F, tensor: T, row: I}`"
    )
    assert [str(w) for w in loaded.warnings] == [message]
    assert caplog.messages == [message]
    assert load_policy(write_inline(tmp_path, 4, 8)).warnings == []  # 32 numbers: no warning


def test_compile_reports_every_bad_vector_in_file_order(tmp_path):
    folder = tmp_path / "p"
    folder.mkdir()
    path = write_with_file(folder, 100, 8)
    loaded = load_policy(path)
    loaded.concepts[70]._vector = np.zeros(8, np.float32)  # past the loader's own checks
    loaded.concepts[20]._vector = np.full(8, np.nan, np.float32)
    loaded.concepts[90]._vector = np.ones(5, np.float32)
    with pytest.raises(PolicyError) as info:
        compile_policy(loaded, VectorEncoder(8), cache=False)
    assert [line.split(" ", 2)[1:] for line in str(info.value).splitlines()] == [
        ["concepts[20].embedding:", "concept 'c20': embedding has non-finite values (NaN or inf)"],
        ["concepts[70].embedding:", "concept 'c70': embedding is all zeros"],
        [
            "concepts[90].embedding:",
            "concept 'c90': embedding has shape [5], the model vectors-only projects to 8 values",
        ],
    ]


@pytest.mark.slow
@pytest.mark.parametrize("write", [write_inline, write_with_file], ids=["inline", "file"])
def test_twenty_thousand_concepts_load_and_compile(tmp_path, write):
    n = 20_000  # tests/large_policy.py times 100,000 (BENCHMARKS.md)
    compiled = compile_policy(load_policy(write(tmp_path, n, 32)), VectorEncoder(32), cache=False)
    assert compiled.concept_matrix.shape == (n, 32) and compiled.concept_names[-1] == f"c{n - 1}"
    expected = vectors(n, 32)
    if write is write_inline:
        expected = np.round(expected, 6)  # the YAML holds 6 decimals
    unit = expected / np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(compiled.concept_matrix.numpy(), unit, atol=1e-6)
