"""Errors raised by the moderation engine, its storage and its commands."""

from policy.encoding import EncodingError


class ModerationError(Exception):
    """Base class: carries a message meant for people."""


class EncoderError(ModerationError, EncodingError):
    """A model could not be loaded or read, or cannot do what was asked of it."""
