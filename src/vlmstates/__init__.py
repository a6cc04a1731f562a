"""Hidden-state embeddings of vision-language models for hallucination research."""

__version__ = "0.1.0"
