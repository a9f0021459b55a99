"""Structured output: regexes, JSON schemas and choices compiled to byte DFAs, seen through the vocabulary."""
