"""What llama.cpp's server suite needs to run against llmserve instead of `llama-server`."""
