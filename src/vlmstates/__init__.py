"""Hidden-state embeddings of vision-language models for hallucination research."""

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


def _version() -> str:
    """pyproject.toml's version, the one place it is written.

    Read from the file itself in a source tree: the workflow's jobs import the package from src/
    (PYTHONPATH) in conda environments where it is not installed, and an editable install's recorded
    version goes stale when pyproject.toml changes. Elsewhere, the version the installation recorded."""
    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    if pyproject.is_file():
        import tomllib

        project = tomllib.loads(pyproject.read_text(encoding="utf-8")).get("project", {})
        if project.get("name") == "vlmstates":
            return project["version"]
    try:
        return version("vlmstates")
    except PackageNotFoundError:  # neither a source tree nor installed
        return "0+unknown"


__version__ = _version()

#: `vlmstates.load` and friends, imported on first use so that `import vlmstates` (every command's first
#: import) stays free of h5py and pandas.
_LAZY = {name: "vlmstates.vectors" for name in ("load", "iter_chunks", "Vectors", "VectorsError")}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vlmstates' has no attribute {name!r}")
