"""Policies that would switch moderation off, or could not be stored, do not validate
(issue 8 items 6 and 8, the policy language's side), each at FILE:LINE:COL."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from moderation.encoder import ClipEncoder
from moderation.synthetic import build_safety_checker
from policy import compile_policy, load_policy
from policy.errors import PolicyError

REPO = Path(__file__).resolve().parents[1]
HEAD = "policy: t\nconcepts:\n  - name: a\n    prompts: [x]\n"


def errors_of(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "p.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    return [line.removeprefix(f"{path}:") for line in str(info.value).splitlines()]


LONG = "n" * 201
BAD = [
    ("negative adjustment",
     HEAD + "special_care:\n  adjustment: -0.01\n  concepts: [{name: s, prompts: [y]}]\n",
     "6:15 special_care.adjustment: must not be negative: a negative adjustment would loosen every threshold once special care fires"),
    ("diffusers with another adjustment",
     "compat: diffusers\n" + HEAD + "special_care:\n  adjustment: 0.02\n  concepts: [{name: s, prompts: [y]}]\n",
     "7:15 special_care.adjustment: must be 0.01 when compat is 'diffusers' (the safety checker's own adjustment, which its arithmetic hard-codes)"),
    ("blur that changes nothing", HEAD + "actions: {blur: {radius: 0.001}}\n",
     "5:26 actions.blur.radius: must be at least 0.01 of the image's shorter side: a weaker blur leaves the image almost as it was"),
    ("blur radius zero", HEAD + "actions: {blur: {radius: 0}}\n",
     "5:26 actions.blur.radius: must be at least 0.01 of the image's shorter side: a weaker blur leaves the image almost as it was"),
    ("blur radius in pixels", HEAD + "actions: {blur: {radius: 24}}\n",
     "5:26 actions.blur.radius: must be a fraction of the image's shorter side (at most 1), not pixels: 24 px at 512 px is 0.0469"),
    ("pixelate block too small", HEAD + "actions: {pixelate: {block: 0.002}}\n",
     "5:29 actions.pixelate.block: must be at least 0.02 of the image's shorter side: a weaker pixelation leaves the image almost as it was"),
    ("pixelate block in pixels", HEAD + "actions: {pixelate: {block: 16}}\n",
     "5:29 actions.pixelate.block: must be a fraction of the image's shorter side (at most 1), not pixels: 16 px at 512 px is 0.0312"),
    ("policy name too long", f"policy: {LONG}\nconcepts: [{{name: a, prompts: [x]}}]\n",
     "1:9 policy: must be at most 200 characters (the database column's size), got 201"),
    ("version too long", f"version: {'v' * 65}\n" + HEAD,
     "1:10 version: must be at most 64 characters (the database column's size), got 65"),
    ("concept name too long", f"policy: t\nconcepts: [{{name: {LONG}, prompts: [x]}}]\n",
     "2:19 concepts[0].name: must be at most 200 characters (the database column's size), got 201"),
    ("special-care name too long", HEAD + f"special_care:\n  concepts: [{{name: {LONG}, prompts: [y]}}]\n",
     "6:21 special_care.concepts[0].name: must be at most 200 characters (the database column's size), got 201"),
    ("control character in a name", 'policy: t\nconcepts: [{name: "a\\eb", prompts: [x]}]\n',
     "2:19 concepts[0].name: must not contain control characters (U+001B)"),
    ("category too long", f"policy: t\ncategories: [{LONG}]\nconcepts: [{{name: a, prompts: [x]}}]\n",
     "2:14 categories[0]: must be at most 200 characters (the database column's size), got 201"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "line"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_policies_that_switch_moderation_off_do_not_validate(tmp_path, text, line):
    assert errors_of(tmp_path, text) == [line]


def test_names_at_the_column_size_and_diffusers_default_adjustment_are_fine(tmp_path):
    name = "n" * 200
    text = (
        f"policy: {name}\nversion: {'v' * 64}\ncompat: diffusers\n"
        f"concepts: [{{name: {name}, prompts: [x]}}]\n"
        "special_care: {concepts: [{name: s, prompts: [y]}]}\n"  # adjustment: 0.01 by default
        "actions: {blur: {radius: 0.01}, pixelate: {block: 1}}\n"
    )
    path = tmp_path / "p.yaml"
    path.write_text(text, encoding="utf-8")
    policy = load_policy(path)
    assert policy.special_care.adjustment == 0.01 and policy.actions.pixelate.block == 1


# --- compile time: what only the model knows --------------------------------------------------


def test_prompts_the_text_tower_would_truncate_are_errors(tmp_path, encoder):
    # The tiny tokenizer reads one token per character; 77 tokens include start and end.
    first, second = "a" * 80 + " cat", "a" * 80 + " dog"
    truncated = encoder.encode_text([first, second])
    assert torch.equal(truncated[0], truncated[1])  # the bug: two concepts, one vector
    assert encoder.max_text_tokens == 77 and encoder.count_tokens(["a" * 75, "a" * 76]) == [77, 78]
    text = (
        f'policy: t\nconcepts:\n  - name: a\n    prompts: ["{"b" * 75}", "{first}", "{second}"]\n'
    )
    path = tmp_path / "p.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(PolicyError) as info:
        compile_policy(load_policy(path), encoder, cache=False)
    assert str(info.value).splitlines() == [
        f"{path}:4:{col} concepts[0].prompts[{i}]: concept 'a': prompt has 85 tokens, but the"
        f" text tower of {encoder.model_id} reads at most 77 (start and end included) and would"
        " cut the rest off: shorten it or split it into several prompts"
        for i, col in ((1, 94), (2, 182))
    ]


def test_a_checkpoint_threshold_out_of_range_is_an_error(tmp_path):
    checker = build_safety_checker(n_concepts=3, n_special=1)
    with torch.no_grad():
        checker.concept_embeds_weights[2] = 5.0  # no cosine ever reaches it: moderation off
    checker.save_pretrained(tmp_path / "checker")
    text = (
        f"policy: sd\nmodel: {tmp_path / 'checker'}\nconcepts:\n"
        "  - name: fine\n"
        "    embedding: {checkpoint: concept_embeds, row: 1}\n"
        "    threshold: {checkpoint: concept_embeds_weights, row: 1}\n"
        "  - name: off\n"
        "    embedding: {checkpoint: concept_embeds, row: 2}\n"
        "    threshold: {checkpoint: concept_embeds_weights, row: 2}\n"
    )
    path = tmp_path / "sd.yaml"
    path.write_text(text, encoding="utf-8")
    policy = load_policy(path)  # the schema cannot know the checkpoint's numbers
    with pytest.raises(PolicyError) as info:
        compile_policy(policy, ClipEncoder.from_pretrained(tmp_path / "checker"), cache=False)
    assert str(info.value) == (
        f"{path}:9:16 concepts[1].threshold: concept 'off': threshold 5 read from checkpoint"
        " tensor 'concept_embeds_weights' row 2 must be between -1 and 1"
    )


def test_shipped_policies_compile_with_relative_strengths(encoder, tiny_checker_dir):
    default = load_policy(REPO / "policies" / "default.yaml")
    assert (default.actions.blur.radius, default.actions.pixelate.block) == (0.05, 0.05)
    compiled = compile_policy(default, encoder, cache=False)  # its prompts fit the token limit
    assert (compiled.blur_radius, compiled.pixelate_block) == (0.05, 0.05)
    checker = load_policy(REPO / "policies" / "sd-safety-checker.yaml")
    compiled = compile_policy(checker, ClipEncoder.from_pretrained(tiny_checker_dir), cache=False)
    assert compiled.compat == "diffusers" and compiled.adjustment == 0.01


def test_the_reference_example_validates(tmp_path):
    # docs/policy-language.md's first example, with its embeddings file beside it.
    doc = (REPO / "docs" / "policy-language.md").read_text(encoding="utf-8")
    example = doc.split("```yaml\n", 1)[1].split("```", 1)[0]
    save_file({"concept_embeds": torch.randn(4, 8)}, str(tmp_path / "concepts.safetensors"))
    (tmp_path / "p.yaml").write_text(example, encoding="utf-8")
    policy = load_policy(tmp_path / "p.yaml")
    assert [c.name for _, c in policy.iter_concepts()] == ["gore", "sd-3", "minor"]
    assert (policy.actions.blur.radius, policy.actions.pixelate.block) == (0.05, 0.05)
