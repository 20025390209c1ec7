"""Drop-in integrations with other libraries (diffusers)."""
