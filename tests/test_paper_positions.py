"""The HALP paper code's vision positions (`paper_positions: true`), recorded beside the exact VT.

The rules against hand-computed positions; extraction on the tiny Qwen2.5-VL, Gemma 3 and Phi-4-multimodal
(fp32, CPU): positions equal the rule applied to the batch-1 prompt, batches of mixed prompt lengths give
batch 1's, and the vectors equal an unbatched forward's output_hidden_states at that index (Molmo's, on its
stand-in, in tests/test_molmo.py); the file, merge and probe summary carry them; other families refuse the
key when the workflow starts.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from oracle import assert_decoder_vectors_match, rel_error
from test_family_contract import single_batch
from test_workflow import default_config, snakemake, workdir_with_config

from vlmstates.analysis.summary import summarise_models
from vlmstates.demo.dataset import demo_questions
from vlmstates.extraction.engine import Extractor, load_model
from vlmstates.extraction.paper_positions import PAPER_VISION_RULES, check_paper_positions, paper_vision_positions
from vlmstates.extraction.positions import Positions
from vlmstates.settings import ConfigError, ModelSettings
from vlmstates.store import (
    PAPER_POSITIONS_ATTR,
    PAPER_VISION_POSITION,
    PAPER_VISION_TOKEN,
    STATUS_OK,
    SampleResult,
    layer_key,
    merge_shards,
    read_embeddings,
    read_results,
    write_embeddings,
)
from vlmstates.workflow import resources as job_resources

N_SAMPLES = 4
# mixed image sizes, so that a batch of 4 pads rows of different prompt lengths
SIZES = [(96, 64), (640, 480), (64, 128), (300, 200)]
# the paper's positions, from the rules of its scripts applied to one sample's own input_ids (batch 1)
HAND = {
    "qwen2_5_vl": lambda inputs, exact: min(int(inputs["image_grid_thw"][0].prod()), inputs["input_ids"].shape[1] // 2),
    "gemma3": lambda inputs, exact: min(255, inputs["input_ids"].shape[1] // 2),
    "phi4_multimodal": lambda inputs, exact: exact,
}


def rows(vision: list[int], lengths: list[int], padded_width: int | None = None) -> Positions:
    """Positions of a left-padded batch of rows with these own-prompt vision positions and lengths."""
    width = padded_width or max(lengths)
    padding = [width - n for n in lengths]
    return Positions(
        vision_padded=torch.tensor([v + p for v, p in zip(vision, padding)]),
        query_padded=torch.full((len(lengths),), width - 1),
        vision=vision,
        query=[n - 1 for n in lengths],
        num_prompt_tokens=lengths,
        num_image_tokens=[1] * len(lengths),
    )


# -- the rules, by hand --------------------------------------------------------------------------------
def test_qwen_takes_the_patch_count_before_the_merge_capped_at_half_the_own_prompt():
    # 1x8x8 = 64 patches (16 <|image_pad|> after the 2x2 merge): capped at 40 // 2 = 20 in a 40-token prompt,
    # uncapped (64) in a 300-token one; 1x4x6 = 24 patches in a 100-token prompt: 24
    grid = torch.tensor([[1, 8, 8], [1, 8, 8], [1, 4, 6]])
    positions = rows([18, 18, 9], [40, 300, 100])
    assert paper_vision_positions("qwen2_5_vl", positions, {"image_grid_thw": grid}) == [20, 64, 24]


def test_gemma_takes_255_capped_at_half_the_own_prompt():
    positions = rows([270, 20, 270], [600, 41, 512])
    assert paper_vision_positions("gemma3", positions, {}) == [255, 20, 255]


def test_molmo_takes_one_past_the_largest_image_input_idx_and_phi4_the_exact_position():
    positions = rows([57, 120], [80, 140])
    assert paper_vision_positions("molmo", positions, {}) == [58, 121]
    assert paper_vision_positions("phi4_multimodal", positions, {}) == [57, 120]


def test_the_rules_count_the_own_prompt_not_the_padded_batch():
    # the same row alone and padded to 400 columns in a batch: seq_len is its own 40 tokens either way
    alone, padded = rows([18], [40]), rows([18, 18], [40, 400])
    assert paper_vision_positions("gemma3", alone, {}) == paper_vision_positions("gemma3", padded, {})[:1] == [20]


def test_a_position_outside_the_prompt_is_refused():
    with pytest.raises(ValueError, match=r"outside the prompt of batch row\(s\) \[1\]"):
        paper_vision_positions("molmo", rows([10, 29], [40, 30]), {})


def test_a_family_the_paper_did_not_cover_refuses_the_key():
    settings = ModelSettings.from_config("mine", {"model": "owner/name", "paper_positions": True})
    with pytest.raises(ConfigError, match=r"models\.mine\.paper_positions: the HALP paper's code covered no llava"):
        check_paper_positions(settings, "llava")
    check_paper_positions(settings, "gemma3")  # covered
    check_paper_positions(ModelSettings.from_config("mine", {"model": "owner/name"}), "llava")  # off: nothing to refuse


def test_the_memory_request_counts_the_paper_vectors():
    assert job_resources.vectors_per_question(5, multimodal=False, paper_positions=True) == 16
    assert job_resources.vectors_per_question(5, multimodal=True, paper_positions=True) == 21


def test_the_key_off_keeps_the_config_hash_of_entries_without_it():
    entry = {"model": "owner/name"}
    plain = ModelSettings.from_config("m", entry).config_hash()
    assert ModelSettings.from_config("m", entry | {"paper_positions": False}).config_hash() == plain
    assert ModelSettings.from_config("m", entry | {"paper_positions": True}).config_hash() != plain


# -- extraction on tiny checkpoints ---------------------------------------------------------------------
@pytest.fixture(scope="module", params=sorted(HAND))
def run(request, tiny_checkpoint, tmp_path_factory):
    """A family's tiny model with paper positions: 4 questions of mixed prompt lengths at batch 4 and 1."""
    family = request.param
    settings = ModelSettings.from_config(family, {
        "model": str(tiny_checkpoint(family)), "device": "cpu", "dtype": "float32", "max_new_tokens": 2,
        "multimodal_representation": True, "paper_positions": True,  # the oracle checks MM too
    })  # fmt: skip
    images = tmp_path_factory.mktemp(f"paper-{family}")
    # seed 10: prompt lengths at which neither tiny Qwen's nor tiny Gemma 3's n // 2 lands on the exact VT by chance
    questions = demo_questions(images, N_SAMPLES, SIZES, seed=10)
    loaded = load_model(settings)
    extractor = Extractor(loaded, progress=False, batch_size=4)
    batched = extractor.extract(questions, images)
    singles = Extractor(loaded, progress=False, batch_size=1).extract(questions, images)
    assert all(r.status == STATUS_OK for r in batched + singles), [r.error for r in batched + singles]
    return family, extractor, questions, images, batched, singles


def test_positions_are_the_scripts_rule_on_the_batch_one_prompt(run):
    family, extractor, questions, images, batched, singles = run
    assert len({r.num_prompt_tokens for r in batched}) > 1  # the batch was padded
    for question, result, single in zip(questions, batched, singles):
        inputs = single_batch(extractor.loaded, question, images).inputs
        expected = HAND[family](inputs, result.vision_token_position)
        assert result.paper_vision_token_position == single.paper_vision_token_position == expected, (
            question.question_id
        )
    moved = [r.paper_vision_token_position != r.vision_token_position for r in batched]
    assert all(moved) if family != "phi4_multimodal" else not any(moved)  # the estimate misses the exact token


def test_vectors_equal_unbatched_output_hidden_states_at_the_paper_position(run):
    _, extractor, questions, images, batched, singles = run
    with torch.inference_mode():
        for question, result, single in zip(questions, batched, singles):
            inputs = single_batch(extractor.loaded, question, images).inputs
            hidden = extractor.loaded.model(**inputs, output_hidden_states=True).hidden_states
            assert_decoder_vectors_match(extractor, result, hidden, question.question_id)
            for k in extractor.layers:
                key = layer_key(PAPER_VISION_TOKEN, k)
                assert rel_error(result.vectors[key], single.vectors[key]) < 1e-4, (question.question_id, key)


def test_the_file_and_the_merge_carry_the_paper_vectors_and_positions(run, tmp_path):
    _, extractor, _, _, batched, _ = run
    attrs = extractor.attributes()
    assert attrs[PAPER_POSITIONS_ATTR] is True
    assert PAPER_VISION_POSITION in attrs["semantics"]
    failed = SampleResult.failed("qX", "x.png", "?", "yes", "image: unreadable")
    shards = [
        write_embeddings(tmp_path / "a.h5", batched[:2], extractor.vector_dims(), attrs),
        write_embeddings(tmp_path / "b.h5", batched[2:] + [failed], extractor.vector_dims(), attrs),
    ]
    ids = [r.question_id for r in batched] + ["qX"]
    merged = read_embeddings(merge_shards(shards, ids, tmp_path / "merged.h5"))
    expected = [r.paper_vision_token_position for r in batched] + [-1]
    assert merged.table[PAPER_VISION_POSITION].tolist() == expected
    assert [layer_key(PAPER_VISION_TOKEN, k) for k in extractor.layers] == [
        key for key in merged.representation_keys() if key.startswith(PAPER_VISION_TOKEN)
    ]
    back = read_results(tmp_path / "merged.h5")
    assert [r.paper_vision_token_position for r in back] == [r.paper_vision_token_position for r in batched] + [None]


def test_a_run_without_the_key_writes_no_paper_column_or_attribute(tiny_checkpoint, tmp_path):
    settings = ModelSettings.from_config(
        "q", {"model": str(tiny_checkpoint("qwen2_5_vl")), "device": "cpu", "dtype": "float32"}
    )
    extractor = Extractor(load_model(settings), progress=False)
    attrs = extractor.attributes()
    assert PAPER_POSITIONS_ATTR not in attrs and PAPER_VISION_POSITION not in attrs["semantics"]
    assert not any(key.startswith(PAPER_VISION_TOKEN) for key in extractor.vector_dims())
    path = write_embeddings(tmp_path / "plain.h5", [], extractor.vector_dims(), attrs)
    assert PAPER_VISION_POSITION not in read_embeddings(path).table


def test_every_family_of_the_rules_is_one_the_paper_published():
    from vlmstates.analysis.summary import published_auroc

    assert set(PAPER_VISION_RULES) <= set(published_auroc()["family"])


# -- the probe summary -------------------------------------------------------------------------------------
def metrics_row(representation: str, layer, auroc: float) -> dict:
    return {
        "model": "Qwen/Qwen2.5-VL-7B-Instruct", "representation": representation, "layer": layer, "probe": "mlp",
        "auroc": auroc, "auroc_ci_low": auroc - 0.05, "auroc_ci_high": auroc + 0.05, "control_auroc": 0.5,
        "val_auroc": auroc, "split": "grouped", "n_test": 100, "selected": "", "reason": "",
    }  # fmt: skip


def test_the_summary_shows_the_paper_position_row_beside_the_exact_one_against_the_published_vt(tmp_path):
    metrics = pd.DataFrame(
        [metrics_row("VF", None, 0.6)]
        + [metrics_row("VT", k, 0.70 + 0.01 * k) for k in range(3)]
        + [metrics_row("QT", k, 0.80) for k in range(3)]
        + [metrics_row("VT_paper", k, 0.65 + 0.01 * k) for k in range(3)]
    )
    folder = tmp_path / "qwen" / "probes"
    folder.mkdir(parents=True)
    metrics.to_csv(folder / "metrics.csv", index=False)
    # on the paper's labels: only those are set beside its numbers
    (folder / "metrics.json").write_text(json.dumps({"family": "qwen2_5_vl", "label_method": "halp_paper"}))
    # the packaged table has no VT values yet, so a table of the same format with one
    published = tmp_path / "published.csv"
    published_vt = 0.69
    published.write_text(
        "model,family,representation,probe,protocol,auroc,citation\n"
        "Qwen2.5-VL-7B,qwen2_5_vl,QT,mlp,halp,0.915,HALP\n"
        f"Qwen2.5-VL-7B,qwen2_5_vl,VT,mlp,halp,{published_vt},HALP\n"
    )
    summary = summarise_models(
        {"qwen": folder / "metrics.csv"}, tmp_path / "probes.csv", tmp_path / "probes.png", published
    )
    ours = summary[summary["source"] == "ours"]
    assert ours["representation"].tolist() == ["VF", "VT", "VT_paper", "QT"]
    for code, best in (("VT", 0.72), ("VT_paper", 0.67)):
        row = ours[ours["representation"] == code].iloc[0]
        assert row["published_auroc"] == published_vt and row["layer"] == 2
        assert row["difference"] == pytest.approx(best - published_vt)
    assert (tmp_path / "probes.png").stat().st_size > 0


# -- the workflow ------------------------------------------------------------------------------------------
def test_the_workflow_refuses_the_key_for_a_family_the_paper_did_not_cover(tmp_path):
    config = default_config()
    config["models"] = {"tiny_llava": {"model": "resources/checkpoints/tiny-llava", "paper_positions": True}}
    result = snakemake(workdir_with_config(tmp_path / "llava", config), "-n", check=False)
    assert result.returncode != 0
    assert (
        "models.tiny_llava.paper_positions: the HALP paper's code covered no llava model"
        in result.stdout + result.stderr
    )
    config["models"] = {"tiny_qwen": {"model": "resources/checkpoints/tiny-qwen2_5_vl", "paper_positions": True}}
    snakemake(workdir_with_config(tmp_path / "qwen", config), "-n")  # a covered family plans its jobs
