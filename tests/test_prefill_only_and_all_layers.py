"""Prefill-only extraction (`answers: false`) and `layers: all`, on the tiny Qwen2.5-VL (fp32, CPU).

Prefill-only runs the generating path's prefill and nothing after it: its vectors must equal that path's
bit for bit, with one forward per batch and an empty answer column that the file explains.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pandas as pd
import pytest
import yaml
from helpers import REPO
from test_workflow import default_config, snakemake, workdir_with_config

from vlmstates.analysis.labels import LabelError, label_embeddings
from vlmstates.dataset import read_validated_table
from vlmstates.demo.dataset import write_demo_dataset
from vlmstates.extraction.engine import Extractor, load_model
from vlmstates.extraction.hooks import forward_hooks
from vlmstates.extraction.shards import questions_of
from vlmstates.settings import ConfigError, ModelSettings, read_checkpoint_config
from vlmstates.store import PREFILL_ONLY_ANSWER, SEMANTICS, STATUS_OK, read_embeddings, write_embeddings
from vlmstates.workflow import resources as job_resources
from vlmstates.workflow.config_check import check_config, unlabelled_line, unlabelled_models

SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"
BATCH = 4


def qwen(tiny_checkpoint, **entry) -> ModelSettings:
    values = {
        "model": str(tiny_checkpoint("qwen2_5_vl")),
        "batch_size": BATCH,
        "max_new_tokens": 6,
        "device": "cpu",
        "dtype": "float32",
        "multimodal_representation": True,
        "layers": "all",
    }
    return ModelSettings.from_config("qwen", values | entry)


@pytest.fixture(scope="module")
def runs(tiny_checkpoint, demo):
    """The same questions through the generating path and prefill-only, counting the model's forwards."""
    table, images = demo
    questions = questions_of(read_validated_table(table).head(2 * BATCH + 1))  # a last batch of one
    out = {}
    for answers in (True, False):
        lm = load_model(qwen(tiny_checkpoint, answers=answers))
        extractor = Extractor(lm, progress=False)
        forwards = []
        # a pre-hook: prefill-only's forward ends inside the model (PrefillDone), so it never returns
        with forward_hooks(before=[(lm.model, lambda module, args: forwards.append(1))]):
            results = extractor.extract(questions, images)
        out[answers] = extractor, results, len(forwards)
    return questions, out


def test_prefill_only_vectors_equal_the_generating_paths_exactly(runs):
    questions, out = runs
    (_, answered, _), (_, prefill_only, _) = out[True], out[False]
    assert all(r.status == STATUS_OK for r in answered + prefill_only)
    assert any(r.answer for r in answered) and all(r.answer == "" for r in prefill_only)
    for a, b in zip(answered, prefill_only):
        assert (a.question_id, a.vision_token_position, a.query_token_position, a.num_prompt_tokens) == (
            b.question_id,
            b.vision_token_position,
            b.query_token_position,
            b.num_prompt_tokens,
        )
        assert a.vectors.keys() == b.vectors.keys()
        for key in a.vectors:
            assert np.array_equal(a.vectors[key], b.vectors[key]), (a.question_id, key)


def test_prefill_only_runs_one_forward_per_batch(runs):
    questions, out = runs
    batches = math.ceil(len(questions) / BATCH)
    assert out[False][2] == batches
    assert out[True][2] > batches  # the generating path decodes after its prefill


def test_prefill_only_computes_no_block_past_the_last_recorded_one_and_keeps_no_cache(tiny_checkpoint, demo):
    """Recording block 0 only: prefill-only calls no later block and runs without a KV cache, and its
    vectors still equal the generating path's (which runs every block, and decodes)."""
    table, images = demo
    questions = questions_of(read_validated_table(table).head(BATCH + 1))
    out = {}
    for answers in (True, False):
        lm = load_model(qwen(tiny_checkpoint, answers=answers, layers=[0]))
        blocks = lm.adapter.decoder_blocks(lm.model)
        calls = [0] * len(blocks)
        caches = []

        def count(k):
            return lambda module, args: calls.__setitem__(k, calls[k] + 1)

        def record_cache(module, args, kwargs):
            caches.append((kwargs.get("use_cache"), kwargs.get("past_key_values")))

        handle = lm.model.register_forward_pre_hook(record_cache, with_kwargs=True)
        with forward_hooks(before=[(block, count(k)) for k, block in enumerate(blocks)]):
            results = Extractor(lm, progress=False).extract(questions, images)
        handle.remove()
        out[answers] = results, calls, caches
    (answered, answered_calls, _), (prefill_only, calls, caches) = out[True], out[False]
    assert len(calls) > 1 and calls[0] == math.ceil(len(questions) / BATCH) and not any(calls[1:])
    assert all(n > calls[0] for n in answered_calls)  # the generating path runs every block, then decodes
    assert caches and all(use_cache is False and cache is None for use_cache, cache in caches)
    for a, b in zip(answered, prefill_only):
        assert a.status == b.status == STATUS_OK and a.vectors.keys() == b.vectors.keys()
        for key in a.vectors:
            assert np.array_equal(a.vectors[key], b.vectors[key]), (a.question_id, key)


@pytest.mark.parametrize("answers", [False, True])
def test_extraction_never_writes_the_models_generation_config(tiny_checkpoint, demo, answers):
    """The answer's GenerationConfig (prefill-only's use_cache false included) is built for each call: the
    model's own generation_config is never written, during a batch or while the file's record is made."""
    table, images = demo
    questions = questions_of(read_validated_table(table).head(BATCH + 1))
    lm = load_model(qwen(tiny_checkpoint, answers=answers, layers=[0]))
    own = lm.model.generation_config
    before = own.to_dict()
    writes = []

    class Watched(type(own)):
        def __setattr__(self, name, value):
            if self is own:  # not its copies, which each call builds its config from
                writes.append(name)
            super().__setattr__(name, value)

    own.__class__ = Watched
    extractor = Extractor(lm, progress=False)
    results = extractor.extract(questions, images)
    recorded = extractor.attributes()["generation_config"]
    assert all(r.status == STATUS_OK for r in results)
    assert writes == [] and lm.model.generation_config is own and own.to_dict() == before
    assert recorded["use_cache"] is answers


def test_a_prefill_only_file_says_why_its_answers_are_empty(runs, tmp_path):
    _, out = runs
    extractor, results, _ = out[False]
    path = write_embeddings(tmp_path / "prefill.h5", results, extractor.vector_dims(), extractor.attributes())
    emb = read_embeddings(path)
    assert not emb.attrs["answers"] and emb.attrs["max_new_tokens"] == 0
    assert emb.generation_config["max_new_tokens"] == 1  # what generate() ran with: its prefill, one token
    assert emb.generation_config["use_cache"] is False
    assert json.loads(emb.attrs["semantics"])["answer"] == PREFILL_ONLY_ANSWER
    answered = out[True][0]
    assert (
        answered.attributes()["answers"]
        and answered.attributes()["config_hash"] != extractor.attributes()["config_hash"]
    )
    with pytest.raises(LabelError, match="prefill-only"):
        label_embeddings(path, tmp_path / "labels.csv", "halp_paper")
    labels_file = tmp_path / "mine.csv"
    labels_file.write_text("question_id,hallucinated\n" + "".join(f"{r.question_id},true\n" for r in results))
    assert label_embeddings(path, tmp_path / "labels.csv", "file", labels_file)["n_total"] == len(results)


def test_layers_all_records_every_decoder_block(runs):
    _, out = runs
    extractor = out[True][0]
    assert extractor.layers == tuple(range(extractor.num_layers)) and extractor.num_layers > 1
    assert extractor.attributes()["layers"] == list(range(extractor.num_layers))
    assert len(extractor.vector_dims()) == 1 + 3 * extractor.num_layers  # VF, and VT, QT, MM per block


# -- settings and config -----------------------------------------------------------------------------
def test_answers_true_keeps_the_config_hash_of_entries_without_the_key():
    entry = {"model": "org/model", "layers": [0, 1]}
    plain = ModelSettings.from_config("m", entry)
    assert plain.config_hash() == ModelSettings.from_config("m", entry | {"answers": True}).config_hash()
    assert plain.config_hash() != ModelSettings.from_config("m", entry | {"answers": False}).config_hash()
    assert "answers" not in plain.identity()


def test_layers_setting_accepts_all_and_refuses_other_words():
    assert ModelSettings.from_config("m", {"model": "x", "layers": "all"}).layers == "all"
    with pytest.raises(ConfigError, match=r"models\.m\.layers"):
        ModelSettings.from_config("m", {"model": "x", "layers": "every"})


def config_with(entry: dict, labels: dict | None = None) -> dict:
    config = {"dataset": {"csv": "q.csv", "images": "images"}, "models": {"mine": {"model": "org/model", **entry}}}
    return config | ({"labels": labels} if labels else {})


@pytest.mark.parametrize("method", ["halp_paper", "difflib_lenient", "yesno", "exact"])
def test_label_methods_that_judge_answers_leave_a_prefill_only_model_out_with_one_line(method):
    config = check_config(config_with({"answers": False}, {"method": method}), SCHEMA)
    config["models"]["talker"] = {"model": "org/other"}
    assert unlabelled_models(config) == ["mine"]
    assert unlabelled_line(config) == (
        f"vlmstates: mine: prefill-only (answers: false), so extracted and inspected but left out of labels and "
        f"probes (labels.method {method} judges answers; labels.method: file with a labels file brings it in)"
    )
    config["labels"] = {"method": "file", "file": "l.csv"}
    assert unlabelled_models(config) == [] and unlabelled_line(config) is None


def test_a_prefill_only_model_cannot_be_screened_without_labels():
    config = config_with({"answers": False}) | {"screen": {"csv": "s.csv", "images": "i", "model": "mine"}}
    with pytest.raises(ConfigError, match=r"`screen\.model`: mine is prefill-only \(answers: false\) and labels"):
        check_config(config, SCHEMA)


def planned_commands(output: str, command: str) -> dict[str, str]:
    """model -> the shell command of its `vlmstates COMMAND` job in a dry run's output (-n -p)."""
    found = re.findall(rf"^Shell command: .* -m vlmstates {command} \S+/([\w-]+)/embeddings\.h5 (.*)$", output, re.M)
    return dict(found)


@pytest.mark.parametrize("labels", [{}, {"method": "file", "file": "resources/demo/labels.csv"}])
def test_the_workflow_plans_a_prefill_only_model_without_labels_or_probes(tmp_path, labels):
    """The default label method (halp_paper) judges answers: the prefill-only model is extracted and
    inspected, not labelled or probed, and one line says so; a labels file brings it in."""
    config = default_config()
    config["models"]["tiny-gemma3"]["answers"] = False
    config["labels"] = labels
    result = snakemake(workdir_with_config(tmp_path, config), "-n", "-p")
    output = result.stdout + result.stderr
    models = set(config["models"])
    inspected = planned_commands(output, "inspect")
    assert set(inspected) == set(planned_commands(output, "merge --table \\S+ --out")) == models
    line = "vlmstates: tiny-gemma3: prefill-only (answers: false), so extracted and inspected but left out"
    labelled = models if labels else models - {"tiny-gemma3"}
    assert set(planned_commands(output, "label")) == set(planned_commands(output, "probe")) == labelled
    assert output.count(line) == (0 if labels else 1)
    assert {model for model, options in inspected.items() if "--labels " in options} == labelled
    summary = re.search(r"^Shell command: .* -m vlmstates probe-summary (.*)$", output, re.M).group(1)
    assert set(re.findall(r"/([\w-]+)/probes/metrics\.csv", summary)) == labelled


def test_label_method_file_labels_a_prefill_only_model_and_layers_all_validates():
    config = check_config(config_with({"answers": False, "layers": "all"}, {"method": "file", "file": "l.csv"}), SCHEMA)
    assert config["models"]["mine"]["answers"] is False
    assert check_config(config_with({}), SCHEMA)["models"]["mine"]["answers"] is True  # the default
    with pytest.raises(ConfigError, match=r"`models\.mine\.layers`: 'every' does not match"):
        check_config(config_with({"layers": "every"}), SCHEMA)


def test_the_memory_request_counts_every_block_of_layers_all():
    qwen_7b = {"text_config": {"num_hidden_layers": 28, "hidden_size": 3584}}
    count = job_resources.recorded_layer_count
    assert count("all", qwen_7b) == 28
    assert count("all", {"n_layers": 16}) == 16  # OLMo-style keys (Molmo)
    assert count(None, qwen_7b) == 5 and count([3, 4], qwen_7b) == 2
    every = job_resources.vectors_per_question(count("all", qwen_7b), False)
    assert job_resources.extraction_memory_mb(16 * 10**9, 500, every, 3584) > job_resources.extraction_memory_mb(
        16 * 10**9, 500, job_resources.vectors_per_question(5, False), 3584
    )


# -- the workflow, end to end ------------------------------------------------------------------------
@pytest.mark.slow
def test_a_prefill_only_run_of_every_layer_goes_through_the_workflow(tmp_path):
    """`--configfile` with one tiny model, `answers: false` and `layers: all`: extraction, labels from a
    file, probes for every block; the dry run's memory request counts every block."""
    data = tmp_path / "data"
    csv_path = write_demo_dataset(data)
    config = {
        "results": str(tmp_path / "results"),
        "dataset": {"csv": str(csv_path), "images": str(data / "images"), "limit": 8},
        "models": {
            "mine": {
                "model": "resources/checkpoints/tiny-qwen2_5_vl",
                "batch_size": 4,
                "layers": "all",
                "answers": False,
            }
        },
        "labels": {"method": "file", "file": str(data / "labels.csv")},
        "probes": {"mlp_max_epochs": 2, "bootstrap": 10, "probes": ["logreg"]},
    }
    user_file = tmp_path / "user.yaml"
    user_file.write_text(yaml.safe_dump(config))
    workdir = workdir_with_config(tmp_path / "work", default_config())
    snakemake(workdir, "--cores", "2", "--configfile", str(user_file))
    emb = read_embeddings(tmp_path / "results" / "mine" / "embeddings.h5")
    blocks = emb.attrs["num_decoder_layers"]
    assert emb.layers == list(range(blocks)) and not emb.attrs["answers"]
    assert (emb.table["answer"] == "").all() and (emb.table["status"] == STATUS_OK).all()
    assert json.loads(emb.attrs["semantics"])["answer"] != SEMANTICS["answer"]
    metrics = pd.read_csv(tmp_path / "results" / "mine" / "probes" / "metrics.csv", dtype={"reason": str})
    assert set(metrics.loc[metrics["representation"] == "QT", "layer"]) == set(range(blocks))
    # with the checkpoint built, the dry run's memory request counts its blocks
    dry = snakemake(workdir, "-n", "--forcerun", "extract_shard", "--configfile", str(user_file))
    requested = {int(n) for n in re.findall(r"mem_mb=(\d+)", dry.stdout + dry.stderr)}
    checkpoint = workdir / "resources" / "checkpoints" / "tiny-qwen2_5_vl"
    hidden = job_resources.hidden_size_of(read_checkpoint_config(str(checkpoint)))
    expected = job_resources.extraction_memory_mb(
        job_resources.checkpoint_bytes(str(checkpoint)), 500, job_resources.vectors_per_question(blocks, False), hidden
    )
    assert expected in requested, requested
