"""The default engine: llama.cpp through llama-cpp-python's low-level API, continuous batching.

Importing this package loads nothing of llama.cpp: its settings, config and factory are read by
the server before any engine runs; `engine` (and what it imports) is the part that needs it.
"""
