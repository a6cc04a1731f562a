import json
import re
import shlex
import sys
import time
from pathlib import Path

# The package lives in src/; the DAG imports it through sys.path, and every job runs its command line
# with PYTHONPATH set to it. Jobs use shell:, not script:, because script: would also put Snakemake's
# own site-packages on sys.path, and a job must import only what its conda environment holds
# (PYTHONPATH is replaced, not extended, and -s leaves out the user's ~/.local site-packages).
PACKAGE_SRC = str(Path(workflow.basedir) / "src")
if PACKAGE_SRC not in sys.path:
    sys.path.insert(0, PACKAGE_SRC)
VLMSTATES = f"PYTHONPATH={shlex.quote(PACKAGE_SRC)} python -s -m vlmstates"
# An extraction job's command line, run so that an error a retry would repeat (a missing package, a bad
# checkpoint) is not retried: vlmstates.workflow.retry_guard.
VLMSTATES_NO_REPEAT = (
    f"PYTHONPATH={shlex.quote(PACKAGE_SRC)} python -s -m vlmstates.workflow.retry_guard"
)

from vlmstates.extraction.adapters import (
    adapter_for_family,
    families,
    family_of_model_type,
)
from vlmstates.extraction.adapters.base import check_decoding
from vlmstates.workflow.config_check import (
    check_config,
    unlabelled_line,
    unlabelled_models,
)
from vlmstates.analysis.probes.settings import PROBE_OUTPUTS
from vlmstates.dataset import read_validated_table
from vlmstates.extraction.paper_positions import check_paper_positions
from vlmstates.extraction.attention import check_attention
from vlmstates.extraction.image_budget import check_image_budget, has_pixel_budget
from vlmstates.workflow import resources as job_resources
from vlmstates.settings import (
    ConfigError,
    ExtractionSettings,
    ModelSettings,
    model_type_of,
    read_checkpoint_config,
)
from vlmstates.workflow.run_summary import run_summary
from vlmstates.extraction.shards import BATCH_SIZE_RECORD, count_shards

# Logs written from here on are this run's: run_summary tells this run's failed steps by them.
RUN_STARTED = time.time()

# Not snakemake.utils.validate: that prints the whole schema with an error; this names the key, says what is
# wrong and suggests the key meant (vlmstates.workflow.config_check). Defaults are filled in the same way.
check_config(
    config,
    Path(workflow.basedir) / "workflow" / "schemas" / "config.schema.yaml",
    source=", ".join(map(str, workflow.overwrite_configfiles)) or "config/config.yaml",
)

# Prefill-only models whose answers the label method would judge: extracted and inspected, not labelled or
# probed; one line says so when the run starts (not again in the jobs a cluster runs).
LABELLED_MODELS = [
    name for name in config["models"] if name not in unlabelled_models(config)
]
if unlabelled_line(config) and workflow.is_main_process:
    print(unlabelled_line(config), file=sys.stderr)

RESULTS = str(Path(config["results"]))  # "results/" -> "results", "" -> "."
EXTRACTION = ExtractionSettings(**config["extraction"])


def results_path(path):
    """A path under the results folder (config key `results`)."""
    return f"{RESULTS}/{path}"


VALIDATED_TABLE = results_path("dataset/questions.csv")
# A dataset source (config key dataset.source) is materialised here, as CSV + images, by validate_dataset.
MATERIALISED_SOURCE = results_path("dataset/source")
TINY_CHECKPOINTS = "resources/checkpoints/tiny-"


def model_settings(name):
    return ModelSettings.from_config(name, config["models"][name])


def tiny_family(model_ref):
    """The family of a tiny checkpoint that rule tiny_checkpoint builds, or None."""
    if model_ref.startswith(TINY_CHECKPOINTS):
        family = model_ref.removeprefix(TINY_CHECKPOINTS)
        return family if family in families() else None
    return None


def resolve_family(name):
    """Read from the checkpoint's config.json; fails here, before any job, naming the key."""
    settings = model_settings(name)
    family = tiny_family(settings.model)
    if family and not Path(settings.model).exists():
        return family
    where = f"models.{name}.model ({settings.model})"
    try:
        model_type = model_type_of(settings.model, settings.revision)
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from error
    return family_of_model_type(model_type, where)


MODEL_FAMILIES = {name: resolve_family(name) for name in config["models"]}
for name, family in MODEL_FAMILIES.items():
    check_paper_positions(model_settings(name), family)
    # an implementation that would give the family other states than eager stops the run before any job
    check_attention(
        family,
        model_settings(name).attn_implementation,
        f"models.{name}.attn_implementation",
    )
    check_image_budget(family, model_settings(name))
    check_decoding(adapter_for_family(family), model_settings(name))


wildcard_constraints:
    model="|".join(map(re.escape, MODEL_FAMILIES)),
    shard=r"\d{4}",
    family="|".join(families()),


def dataset_images():
    """The images folder extraction reads: the config's, or the materialised source's."""
    if "source" in config["dataset"]:
        return f"{MATERIALISED_SOURCE}/images"
    return config["dataset"]["images"]


def dataset_inputs(wildcards):
    """The local files validation reads, so that a changed one validates again (a Hub source has none)."""
    dataset = config["dataset"]
    if "source" not in dataset:
        return [dataset["csv"], dataset["images"]]
    sources = (
        dataset["source"]
        if isinstance(dataset["source"], list)
        else [dataset["source"]]
    )
    return [s[key] for s in sources for key in ("path", "images") if s.get(key)]


def dataset_arguments():
    """validate's dataset arguments: CSV IMAGES, or the source (as JSON) and where to materialise it."""
    dataset = config["dataset"]
    if "source" not in dataset:
        return " ".join(map(shlex.quote, (dataset["csv"], dataset["images"])))
    source = shlex.quote(json.dumps(dataset["source"]))
    return f"--source {source} --materialise-dir {shlex.quote(MATERIALISED_SOURCE)}"


def validation_options():
    dataset = config["dataset"]
    options = ["--lenient"] if dataset["validation"] == "lenient" else []
    if dataset["limit"]:
        options.append(f"--limit {dataset['limit']}")
    return " ".join(options)


def built_weights(wildcards):
    """The tiny checkpoint's folder when the workflow builds it (rule tiny_checkpoint), so extraction waits for it."""
    model_ref = config["models"][wildcards.model]["model"]
    return [model_ref] if tiny_family(model_ref) else []


def image_budget_report(wildcards):
    """The image budget report of a model whose family has a pixel budget, so its extraction waits for it."""
    if has_pixel_budget(MODEL_FAMILIES[wildcards.model]):
        return [results_path(f"{wildcards.model}/image_budget.json")]
    return []


def family_environment(wildcards):
    return f"../../envs/{MODEL_FAMILIES[wildcards.model]}.yaml"


def settings_json(wildcards):
    entry = dict(config["models"][wildcards.model])
    return json.dumps({"name": wildcards.model, **entry})


def extraction_footprint(name):
    """(weights in bytes, vectors per question, hidden size) of a model, for its jobs' requests."""
    settings = model_settings(name)
    if tiny_family(settings.model) and not Path(settings.model).exists():
        # a tiny checkpoint, still to be built, weighs a few MB
        layers = job_resources.recorded_layer_count(settings.layers, None)
        vectors = job_resources.vectors_per_question(
            layers, settings.multimodal_representation, settings.paper_positions
        )
        return 0, vectors, 64
    checkpoint_config = read_checkpoint_config(settings.model, settings.revision)
    layers = job_resources.recorded_layer_count(settings.layers, checkpoint_config)
    vectors = job_resources.vectors_per_question(
        layers, settings.multimodal_representation, settings.paper_positions
    )
    weights = job_resources.checkpoint_bytes(settings.model, settings.revision)
    return weights, vectors, job_resources.hidden_size_of(checkpoint_config)


EXTRACTION_FOOTPRINTS = {name: extraction_footprint(name) for name in MODEL_FAMILIES}


def extraction_memory_mb(wildcards, attempt):
    """Host memory from the model's size and the shard size, doubled and tripled on retries."""
    weights, vectors, hidden = EXTRACTION_FOOTPRINTS[wildcards.model]
    return attempt * job_resources.extraction_memory_mb(
        weights, EXTRACTION.shard_size, vectors, hidden
    )


def extraction_runtime(wildcards, attempt):
    """Time limit (minutes) from the model's size and the shard size, longer on retries."""
    weights = EXTRACTION_FOOTPRINTS[wildcards.model][0]
    entry = model_settings(wildcards.model)
    # batch_size auto finds its size in the job; until then, plan for the default size
    batch = (
        entry.batch_size
        if isinstance(entry.batch_size, int)
        else ModelSettings.batch_size
    )
    decoded = entry.max_new_tokens if entry.answers else 0  # prefill-only decodes none
    return attempt * job_resources.extraction_runtime_minutes(
        weights, EXTRACTION.shard_size, decoded, batch
    )


def shard_ids():
    table = checkpoints.validate_dataset.get().output.table
    rows = len(read_validated_table(table))
    return [f"{k:04d}" for k in range(count_shards(rows, EXTRACTION.shard_size))]


def model_shards(wildcards):
    return expand(
        results_path("{model}/shards/shard_{shard}.h5"),
        model=wildcards.model,
        shard=shard_ids(),
    )


def label_inputs(wildcards):
    """The embeddings, plus the user's labels file for method `file` ({model} in its path is filled in)."""
    inputs = {"embeddings": results_path(f"{wildcards.model}/embeddings.h5")}
    settings = config["labels"]
    if settings["method"] == "file":
        if not settings["file"]:
            raise ValueError("labels.method is 'file' but labels.file is not set")
        inputs["labels_file"] = settings["file"].replace("{model}", wildcards.model)
    return inputs


def inspection_inputs(wildcards):
    """The embeddings and the dataset's validation, plus the labels of a model that is labelled."""
    inputs = {
        "embeddings": results_path(f"{wildcards.model}/embeddings.h5"),
        "validation": results_path("dataset/validation.json"),
    }
    if wildcards.model in LABELLED_MODELS:
        inputs["labels"] = results_path(f"{wildcards.model}/labels.csv")
        inputs["labels_summary"] = results_path(
            f"{wildcards.model}/labels.summary.json"
        )
    return inputs


def all_targets():
    targets = []
    for model in MODEL_FAMILIES:
        targets += [
            results_path(f"{model}/embeddings.h5"),
            results_path(f"{model}/inspection/summary.html"),
            results_path(f"{model}/inspection/norms.png"),
        ]
        if model in LABELLED_MODELS:
            targets.append(results_path(f"{model}/probes/{PROBE_OUTPUTS.metrics_csv}"))
        if config["export"]["seed_layout"]:
            targets.append(results_path(f"{model}/seed_layout"))
        if config["export"]["hf_dataset"]:
            targets.append(results_path(f"{model}/hf_dataset"))
    if config["screen"]:
        targets.append(results_path(f"{config['screen']['model']}/screen/scores.csv"))
    if LABELLED_MODELS:
        targets.append(results_path("summary/probes.csv"))
    return targets
