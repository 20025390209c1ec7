"""Errors raised by the moderation engine, its storage and its commands."""


class ModerationError(Exception):
    """Base class: carries a message meant for people."""
