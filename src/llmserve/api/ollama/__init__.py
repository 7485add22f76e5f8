"""Ollama's native API (/api/chat, /api/generate, /api/tags, ...) for Ollama clients."""
