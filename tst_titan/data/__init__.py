"""Data: document sources, the embedded default corpus, tokenizers and the
phase-aware packing dataloader."""
