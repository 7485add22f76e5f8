"""Peers' own test suites, run against llmserve."""
