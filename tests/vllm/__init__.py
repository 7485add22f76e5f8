"""The vLLM engine: its own tests and the runner of the suite's vLLM half."""
