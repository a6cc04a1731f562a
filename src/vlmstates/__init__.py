"""Hidden-state embeddings of vision-language models for hallucination research."""

from importlib.metadata import PackageNotFoundError, version

try:
    # pyproject.toml holds the one version number; installing the package (also -e) records it
    __version__ = version("vlmstates")
except PackageNotFoundError:  # a source tree on sys.path, never installed: no version to report
    __version__ = "0+unknown"
