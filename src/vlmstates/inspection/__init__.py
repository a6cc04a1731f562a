"""Inspect and export: reports on an embeddings file (HTML pages shared with the probe reports) and the seed
scripts' per-question layout."""
