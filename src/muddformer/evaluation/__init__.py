"""Scoring a model: sliding-window perplexity (perplexity.py) and lm-evaluation-harness tasks (harness.py)."""
