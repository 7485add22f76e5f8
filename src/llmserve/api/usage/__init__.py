"""Keys and usage over HTTP: /v1/keys (admin) and /v1/usage (admin, or a key's own)."""
