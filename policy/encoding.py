"""What the compiler needs from a model: a small protocol any encoder can satisfy.

`moderation.encoder.ClipEncoder` satisfies it; so can a stub in a test or another embedding model.
The policy package never imports the engine: the engine hands an encoder in.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from torch import Tensor


class EncodingError(Exception):
    """An encoder cannot do what the compiler asked (no text tower, no such checkpoint tensor).

    `index` names the input at fault when one of several could not be read (an example image).
    """

    def __init__(self, message: str = "", *, index: int | None = None) -> None:
        super().__init__(message)
        self.index = index


@runtime_checkable
class PolicyEncoder(Protocol):
    """Text, image and checkpoint access of one model, as the compiler uses it."""

    model_id: str  # recorded in the compiled policy when the policy names no model of its own
    embed_dim: int  # projection width: every concept vector must have it
    text_fingerprint: str | None  # identifies the text tower's embeddings (prompt-cache key)
    # The most tokens the text tower reads (start and end tokens included); a longer prompt would
    # be cut off silently, so the compiler refuses it. None: no text tower, or no limit.
    max_text_tokens: int | None

    def encode_text(self, prompts: Sequence[str]) -> Tensor:
        """[N, D] projected text embeddings; raise EncodingError without a text tower."""
        ...

    def count_tokens(self, prompts: Sequence[str]) -> list[int]:
        """Tokens each prompt takes before any truncation, start and end tokens included."""
        ...

    def checkpoint_tensor(self, name: str) -> Tensor:
        """A tensor stored in the model's checkpoint, float32; raise EncodingError if absent."""
        ...

    def encode_image_bytes(self, images: Sequence[bytes]) -> Tensor:
        """[N, D] projected embeddings of encoded image files (PNG, JPEG, ...), float32.

        Each image is decoded and preprocessed exactly as the engine treats an image it judges
        (one view). Raise EncodingError with `index` set for an image that cannot be read.
        """
        ...
