"""Request bodies of the two moderation endpoints, and how their images are found.

`/v1/moderations` is OpenAI's: `input` is a string, a list of strings, or a list of parts
(`{"type": "text", "text": ...}`, `{"type": "image_url", "image_url": {"url": ...}}`). The
parts are read here by hand, not by the schema, so that an unknown part type is a 400 naming it
(as OpenAI answers) while a body of the wrong shape is a 422.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from moderation.server.errors import APIError

MAX_TOP = 10_000


class ModerationsRequest(BaseModel):
    """OpenAI's moderation request (other keys are ignored, as OpenAI's clients may add some)."""

    input: str | list[Any] = Field(description="A string, strings, or text / image_url parts.")
    model: str | None = Field(
        None, description="Ignored: the service's one policy judges every request."
    )


class ModerateRequest(BaseModel):
    """Our own request: several images, caller metadata, the full decisions back."""

    model_config = ConfigDict(extra="forbid")

    images: list[str] = Field(
        min_length=1,
        description="data: URLs or bare base64 (http(s) URLs only from --fetch-urls hosts).",
    )
    metadata: dict[str, Any] = Field(
        default_factory=dict,
        description="Logged with every image's decision: prompt, seed, user and any other keys.",
    )
    return_images: bool = Field(
        False, description="Also return each moderated image (PNG data URL, action applied)."
    )
    top: int = Field(5, ge=0, le=MAX_TOP, description="Concepts listed per decision (0: all).")


def openai_images(body: ModerationsRequest) -> tuple[list[tuple[str, str]], int]:
    """(field, url) of every image part, and how many text inputs there were (not judged)."""
    if isinstance(body.input, str):
        return [], 1
    images, texts = [], 0
    for i, part in enumerate(body.input):
        where = f"input[{i}]"
        if isinstance(part, str):
            texts += 1
            continue
        if not isinstance(part, dict):
            raise APIError(
                400, f"{where}: expected a string or a part object", code="invalid_input",
                param=where,
            )  # fmt: skip
        kind = part.get("type")
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise APIError(400, f"{where}.text: expected a string", param=f"{where}.text")
            texts += 1
        elif kind == "image_url":
            image_url = part.get("image_url")
            url = image_url.get("url") if isinstance(image_url, dict) else image_url
            if not isinstance(url, str):
                raise APIError(
                    400, f"{where}.image_url.url: expected a string",
                    code="invalid_image_url", param=f"{where}.image_url.url",
                )  # fmt: skip
            images.append((f"{where}.image_url.url", url))
        else:
            raise APIError(
                400,
                f"{where}.type: unsupported part type {str(kind)[:50]!r} (text, image_url)",
                code="unsupported_input_type",
                param=f"{where}.type",
            )
    return images, texts
