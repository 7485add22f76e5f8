"""The default engine: llama.cpp through llama-cpp-python's low-level API, continuous batching."""

from llmserve.engines.llamacpp.engine import LlamaCppConfig, LlamaCppEngine

__all__ = ["LlamaCppConfig", "LlamaCppEngine"]
