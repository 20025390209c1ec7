"""What `moderation policy validate` checks beyond the schema, still without loading a model:
that example images decode, that a model folder is there, and (when the model's tokenizer is
on this machine) that no prompt is longer than the text tower reads. Each would otherwise only
fail when the policy is compiled."""

from __future__ import annotations

import json
from pathlib import Path

from policy.errors import PolicyIssue
from policy.schema import Policy


def offline_issues(policy: Policy) -> list[PolicyIssue]:
    """Problems that compiling `policy` would hit, found without its model's weights."""
    return [*_example_issues(policy), *_model_issues(policy), *_prompt_issues(policy)]


def _example_issues(policy: Policy) -> list[PolicyIssue]:
    from PIL import Image, UnidentifiedImageError

    issues = []
    for path, concept in policy.iter_concepts():
        for shown, file in concept.example_files or ():
            try:
                with Image.open(file) as image:
                    image.verify()
            except UnidentifiedImageError:
                reason = "cannot identify image file"
            except (OSError, ValueError, SyntaxError) as exc:  # truncated or damaged files
                reason = str(exc) or type(exc).__name__
            else:
                continue
            message = f"concept '{concept.name}': cannot read example image '{shown}': {reason}"
            issues.append(policy.issue((*path, "examples"), message, key=True))
    return issues


def is_relative_folder(model: str) -> bool:
    """A `model:` that can only be a folder relative to the policy file (never a hub `org/name`)."""
    if Path(model).expanduser().is_absolute():
        return False
    return model.startswith((".", "~")) or "\\" in model or model.count("/") != 1


def _cached(model: str, name: str) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(model, name)
    except Exception:  # not a valid repo id
        return None
    return Path(found) if isinstance(found, str) else None


def _model_issues(policy: Policy) -> list[PolicyIssue]:
    resolved = policy.resolved_model
    if Path(resolved).is_dir() or not is_relative_folder(policy.model):
        return []  # a folder that is there, or a hub id (downloaded when compiled, if online)
    if _cached(policy.model, "config.json") is not None:
        return []
    looked = (policy.folder_of(("model",)) / policy.model).resolve()
    message = (
        f"model '{policy.model}': no folder {looked} (a relative model folder is read from the"
        " policy file's folder), and no such model in the Hugging Face cache"
    )
    return [policy.issue(("model",), message)]


def _tokenizer_folder(policy: Policy) -> Path | None:
    folder = Path(policy.resolved_model)
    if folder.is_dir():
        return folder if (folder / "vocab.json").is_file() else None
    vocab = _cached(policy.model, "vocab.json")
    return vocab.parent if vocab is not None and (vocab.parent / "merges.txt").is_file() else None


def _prompt_issues(policy: Policy) -> list[PolicyIssue]:
    users = [(p, c) for p, c in policy.iter_concepts() if c.prompts]
    folder = _tokenizer_folder(policy) if users else None
    if folder is None:
        return []  # without the tokenizer, compiling checks it
    from transformers import CLIPTokenizer

    try:
        tokenizer = CLIPTokenizer.from_pretrained(str(folder))
    except Exception:  # a folder without a usable tokenizer: compiling reports it
        return []
    limit = int(tokenizer.model_max_length)
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        positions = config.get("text_config", config).get("max_position_embeddings")
        limit = min(limit, int(positions)) if positions else limit
    except (OSError, ValueError, AttributeError, TypeError):
        pass
    issues = []
    for path, concept in users:
        for i, prompt in enumerate(concept.prompts):
            count = len(tokenizer(prompt, truncation=False, verbose=False)["input_ids"])
            if count > limit:
                message = (
                    f"concept '{concept.name}': prompt has {count} tokens, but the text tower of"
                    f" {policy.model} reads at most {limit} (start and end included) and would"
                    " cut the rest off: shorten it or split it into several prompts"
                )
                issues.append(policy.issue((*path, "prompts", i), message))
    return issues
