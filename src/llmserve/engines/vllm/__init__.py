"""The vLLM engine: vLLM's in-process AsyncLLM behind the Engine contract (optional extra)."""
