"""The model families the engine knows, looked up by config.json's model_type.

A family in the common layout is an entry of vlmstates.extraction.adapters.entries (data, served by
vlmstates.extraction.adapters.declarative.EntryAdapter); a family that truly differs has its own adapter module. This
table is read when Snakemake builds its DAG, so it names modules without importing them (and without
importing torch); a family's conda environment is envs/<family>.yaml.
"""

from __future__ import annotations

from importlib import import_module

from vlmstates.extraction.adapters.entries import ENTRIES
from vlmstates.settings import ConfigError

ENTRY = "entry"  # the adapter of a family that is an entry

# family -> (adapter "module:Class" or ENTRY, the config.json model_type values it serves)
_FAMILIES = {
    **{family: (ENTRY, entry.model_types) for family, entry in ENTRIES.items()},
    "molmo": ("molmo:MolmoAdapter", ("molmo",)),
    # "phi4mm": the hub main branch's remote-code config; the adapter loads the native revision instead
    "phi4_multimodal": ("phi4_multimodal:Phi4MultimodalAdapter", ("phi4_multimodal", "phi4mm")),
}


def families() -> list[str]:
    return list(_FAMILIES)


def adapter_class(family: str):
    if family not in _FAMILIES:
        raise ConfigError(f"unknown model family {family!r}; known: {', '.join(_FAMILIES)}")
    if _FAMILIES[family][0] == ENTRY:
        from vlmstates.extraction.adapters.declarative import entry_adapter_class

        return entry_adapter_class(family)
    module, cls = _FAMILIES[family][0].split(":")
    return getattr(import_module(f"{__name__}.{module}"), cls)


def adapter_for_family(family: str):
    return adapter_class(family)()


def family_of_model_type(model_type: str, where: str = "") -> str:
    for family, (_, model_types) in _FAMILIES.items():
        if model_type in model_types:
            return family
    raise ConfigError(
        f"{where + ': ' if where else ''}model_type {model_type!r} is not supported; "
        f"supported families: {', '.join(_FAMILIES)}"
    )
