"""Moderation engine for generated images (placeholder until the lead adds its exports)."""
