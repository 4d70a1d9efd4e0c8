"""Downstream scores of an exported model with lm-evaluation-harness (``titan-objectives
evaluate``), and the small local tasks bundled for machines with no dataset hub."""
