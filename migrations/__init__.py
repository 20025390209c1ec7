"""Alembic migrations of the moderation database (run them with `moderation db upgrade`)."""
