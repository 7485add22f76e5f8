"""`python -m llmserve` runs the CLI."""

from llmserve.cli import main

main()
