"""Datasets (synthetic corpus, tokenizers) and batching."""
