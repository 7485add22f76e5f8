"""Keys as records, per-key limits and usage accounting, in SQLite or PostgreSQL."""
