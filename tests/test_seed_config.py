"""config/all-seed-models.yaml, the example that runs the five seed models, is a valid config."""

from __future__ import annotations

import yaml
from helpers import REPO

from vlmstates.settings import ModelSettings
from vlmstates.workflow.config_check import check_config

SEED_MODELS = {
    "Qwen/Qwen2.5-VL-7B-Instruct",
    "google/gemma-3-12b-it",
    "microsoft/Phi-4-multimodal-instruct",
    "allenai/Molmo-7B-O-0924",
    "allenai/MolmoE-1B-0924",
}


def test_the_seed_config_validates_and_names_all_five_models():
    config = yaml.safe_load((REPO / "config" / "all-seed-models.yaml").read_text())
    check_config(config, REPO / "workflow" / "schemas" / "config.schema.yaml")  # as the workflow does (common.smk)
    settings = [ModelSettings.from_config(name, entry) for name, entry in config["models"].items()]
    assert {s.model for s in settings} == SEED_MODELS
    remote = {s.model for s in settings if s.trust_remote_code}
    assert remote == {m for m in SEED_MODELS if m.startswith("allenai/")}, "only Molmo may run remote code"
