"""Dialect-neutral building blocks shared by every API and engine."""
