"""Anthropic's Messages API (what Claude Code and the `anthropic` SDK speak)."""
