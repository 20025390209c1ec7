"""Library notices that are not the user's news, silenced once, where the engine is imported.

transformers 5 prints "`CLIPImageProcessor` requires torchvision (not installed); falling back
to `CLIPImageProcessorPil`" whenever a CLIP image processor is built without torchvision (the
CPU install has none). The engine preprocesses in torch itself; the PIL processor diffusers
pipelines and checkpoints carry is what transformers 4 always used. Only that notice is
dropped: every other warning of transformers is shown as before.
"""

from __future__ import annotations

import logging

_LOGGER = "transformers.utils.import_utils"  # where transformers logs the fallback


class _TorchvisionFallback(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "requires torchvision (not installed); falling back to" not in message


_FILTER = _TorchvisionFallback()


def silence_torchvision_fallback() -> None:
    """Drop transformers' torchvision fallback notice (idempotent)."""
    logger = logging.getLogger(_LOGGER)
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)
