"""Policies shipped with the engine (package data): `extends: builtin:NAME` reads NAME.yaml here."""
