"""The memory and time an extraction job asks a scheduler for, from the model's size and the shard size."""

from vlmstates.settings import DEFAULT_LAYER_COUNT, default_layers
from vlmstates.workflow import resources as job_resources
from vlmstates.workflow.resources import checkpoint_bytes, extraction_memory_mb, extraction_runtime_minutes


def test_checkpoint_bytes_counts_the_weight_files_of_a_local_folder(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"\0" * 1000)
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"\0" * 500)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "adapter_model.safetensors").write_bytes(b"\0" * 25)
    assert checkpoint_bytes(str(tmp_path)) == 1525


def test_a_hub_id_outside_the_cache_is_taken_as_the_largest_seed_model(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    assert checkpoint_bytes("nobody/not-cached") == job_resources.UNKNOWN_CHECKPOINT_BYTES


def test_memory_grows_with_the_weights_and_the_shard():
    seven_b = 16 * 10**9
    base = extraction_memory_mb(seven_b, 500, 11, 3584)
    # 4000 + 1.5 x 16000 + 3 x (500 x 11 x 3584 x 4 B) = 28000 + 236.5 MB
    assert base == 4000 + 24000 + 237
    assert extraction_memory_mb(seven_b, 1000, 11, 3584) > base
    assert extraction_memory_mb(2 * seven_b, 500, 11, 3584) > base + 20000


def test_runtime_is_twice_loading_plus_the_shard():
    # 7B in bf16, 500 questions, 32 new tokens, batch 16: 0.2 + 32 x 0.032 / 16 = 0.264 s a question
    assert extraction_runtime_minutes(16 * 10**9, 500, 32, 16) == 25  # 2 x (10 + 500 x 0.264 / 60) = 24.4
    assert extraction_runtime_minutes(16 * 10**9, 500, 32, 1) > extraction_runtime_minutes(16 * 10**9, 500, 32, 16)


def test_vectors_and_hidden_size():
    assert job_resources.vectors_per_question(5, multimodal=False) == 11
    assert job_resources.vectors_per_question(5, multimodal=True) == 16
    assert job_resources.hidden_size_of({"text_config": {"hidden_size": 3840}, "hidden_size": 1}) == 3840
    assert job_resources.hidden_size_of({"d_model": 4096}) == 4096


def test_the_planned_layer_count_is_what_default_layers_picks():
    """The workflow plans a job's memory for DEFAULT_LAYER_COUNT layers when the config names none."""
    assert {len(default_layers(n)) for n in (8, 28, 48, 80)} == {DEFAULT_LAYER_COUNT}
