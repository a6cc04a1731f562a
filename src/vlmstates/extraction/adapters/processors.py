"""Loading a checkpoint's processor when its image-processor config names a class transformers lacks.

Some fine-tunes name a class in ``image_processor_type`` that transformers 5.23 does not have
(Qwen2.5-VL ones, e.g., ``Qwen2_5_VLImageProcessor``), and ``AutoProcessor`` stops with "Unrecognized
image processor": ``AutoImageProcessor`` looks the name up and, finding no class, does not fall back to
the model type's processor (it only does when the file names none). A family adapter lists the legacy
names it knows and the class each now is; such a checkpoint's processor is loaded through its own
processor class with that image-processor class pinned, for this one load (nothing in transformers
is changed). An unknown name stops with an error naming the file, the field and the fix.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

from vlmstates.settings import ConfigError

log = logging.getLogger(__name__)

# Where transformers reads the image processor's settings, in its own order of priority: the nested
# "image_processor" of processor_config.json (transformers >= 5 layout), else preprocessor_config.json.
PROCESSOR_FILE = "processor_config.json"
IMAGE_PROCESSOR_FILE = "preprocessor_config.json"
TYPE_FIELD = "image_processor_type"


def _read_json(model: str, filename: str, revision: str | None) -> dict | None:
    """A json file of the checkpoint (local folder, or hub cache/hub), None if it has none."""
    from transformers.utils import cached_file

    try:
        path = cached_file(model, filename, revision=revision, _raise_exceptions_for_missing_entries=False)
    except OSError:  # unreachable or gated: AutoProcessor reports that better than we can
        return None
    if path is None:
        return None
    with open(path) as f:
        return json.load(f)


def file_of(model: str, filename: str, revision: str | None) -> str:
    """A checkpoint file as a user finds it: its path in a local folder, else its name in the hub repo."""
    if Path(model).expanduser().is_dir():
        return str(Path(model).expanduser() / filename)
    return f"{filename} of {model} (revision {revision or 'main'})"


def declared_image_processor(model: str, revision: str | None) -> tuple[dict, str] | None:
    """The image processor's config dict and the file it is in, as transformers will read it (or None)."""
    processor = _read_json(model, PROCESSOR_FILE, revision)
    if processor is not None and isinstance(processor.get("image_processor"), dict):
        return processor["image_processor"], PROCESSOR_FILE
    image_processor = _read_json(model, IMAGE_PROCESSOR_FILE, revision)
    if image_processor is not None:
        return image_processor, IMAGE_PROCESSOR_FILE
    return None


def transformers_has_image_processor(name: str) -> bool:
    """Whether transformers resolves this ``image_processor_type`` (a legacy "...Fast" name included)."""
    from transformers.models.auto.image_processing_auto import get_image_processor_class_from_name

    candidates = [name] + ([name.removesuffix("Fast")] if name.endswith("Fast") else [])
    return any(get_image_processor_class_from_name(candidate) is not None for candidate in candidates)


def family_image_processor(model: str, revision: str | None) -> str | None:
    """The image processor class transformers gives this checkpoint's model type (for the error's fix)."""
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES

    config = _read_json(model, "config.json", revision) or {}
    names = IMAGE_PROCESSOR_MAPPING_NAMES.get(config.get("model_type"), {})
    return names.get("torchvision") or names.get("pil")


def checkpoint_processor_class(model: str, revision: str | None, config: dict, trust_remote_code: bool):
    """The checkpoint's processor class: named in its processor files, else its model type's."""
    from transformers import AutoConfig
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING, processor_class_from_name

    processor = _read_json(model, PROCESSOR_FILE, revision) or {}
    name = processor.get("processor_class") or config.get("processor_class")
    if name:
        found = processor_class_from_name(name)
        if found is not None:
            return found
    model_config = AutoConfig.from_pretrained(model, revision=revision, trust_remote_code=trust_remote_code)
    return PROCESSOR_MAPPING[type(model_config)]


def with_image_processor_class(processor_class, image_processor_class: str):
    """The processor class with its image processor's class named, as transformers' processors may do
    (``<attribute>_class``): ``from_pretrained`` then loads that class instead of asking
    AutoImageProcessor. A subclass, so the pin holds for this load only."""
    return type(
        processor_class.__name__,  # what save_pretrained writes as processor_class
        (processor_class,),
        {"image_processor_class": image_processor_class, "__module__": processor_class.__module__},
    )


def load_processor(
    model: str,
    revision: str | None,
    trust_remote_code: bool,
    legacy_image_processors: Mapping[str, str],
    where: str,
):
    """The checkpoint's processor, through AutoProcessor unless its ``image_processor_type`` is a name
    transformers lacks: then mapped by ``legacy_image_processors`` or refused (ConfigError)."""
    from transformers import AutoProcessor

    common = dict(revision=revision, trust_remote_code=trust_remote_code)
    declared = declared_image_processor(model, revision)
    name = declared[0].get(TYPE_FIELD) if declared else None
    remote = declared is not None and "AutoImageProcessor" in declared[0].get("auto_map", {})
    if not isinstance(name, str) or remote or transformers_has_image_processor(name):
        return AutoProcessor.from_pretrained(model, **common)
    config, filename = declared
    replacement = legacy_image_processors.get(name)
    if replacement is None:
        import transformers

        known = family_image_processor(model, revision)
        fix = (
            f'set "{TYPE_FIELD}": "{known}" there (the class transformers uses for this model type)'
            if known
            else (f"set {TYPE_FIELD} there to an image processor class of transformers {transformers.__version__}")
        )
        raise ConfigError(
            f"{where}: {file_of(model, filename, revision)} has {TYPE_FIELD} {name!r}, an image processor class "
            f"that transformers {transformers.__version__} does not have, and no mapping of that name is known; {fix}"
        )
    log.warning(
        "%s: %s has the legacy %s %r; loading it as %s",
        where,
        file_of(model, filename, revision),
        TYPE_FIELD,
        name,
        replacement,
    )
    processor_class = checkpoint_processor_class(model, revision, config, trust_remote_code)
    return with_image_processor_class(processor_class, replacement).from_pretrained(model, **common)
