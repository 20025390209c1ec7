"""`moderation bench`: the engine measured against diffusers' safety checker, on one device."""
