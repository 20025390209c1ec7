"""Caller metadata (prompt, seed, user, ...): checked to be storable as JSON before any work."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from moderation.errors import ModerationError


class MetadataError(ModerationError):
    """Caller metadata that the decision log could not store."""


def check_metadata(metadata: Mapping[str, Any], where: str = "metadata") -> None:
    """Raise MetadataError, naming the key, unless the log can store `metadata` as JSON.

    The log's own encoder decides (numpy scalars become numbers; NaN, infinity, bytes and other
    objects are refused), and the text must be UTF-8: an unpaired surrogate, as Python makes of
    undecodable bytes in a command line or file name, cannot be written to a database.
    """
    from moderation.storage.db import json_dumps

    try:
        json_dumps(metadata).encode("utf-8")
        return
    except (TypeError, ValueError):  # UnicodeEncodeError is a ValueError
        pass
    for key, value in metadata.items():
        label = f"{where}[{key!r}]"
        try:
            json_dumps({key: None})
        except (TypeError, ValueError) as err:
            raise MetadataError(f"{label}: the key cannot be stored as JSON: {err}") from None
        try:
            json_dumps(value).encode("utf-8")
        except UnicodeEncodeError:
            raise MetadataError(
                f"{label}: the text is not valid UTF-8 (undecodable bytes?), so it cannot be "
                "stored as JSON"
            ) from None
        except (TypeError, ValueError) as err:
            reason = str(err)
            if reason.startswith("Out of range float"):  # the json module's words for NaN/inf
                reason = "NaN and infinity are not JSON numbers"
            raise MetadataError(f"{label} cannot be stored as JSON: {reason}") from None
    raise MetadataError(f"{where} cannot be stored as JSON")  # keys and values alone were fine
