"""The contract every family keeps, one test module for all (the pattern of transformers' ModelTesterMixin).

Adding a family adds a row to CASES (docs/adding-a-family.md): its name, image sizes that make its processor
give different image-token, tile or sub-image counts, and an independent computation of the projector's input
for one sample (the vision tower run alone, as the real model's config says its features are taken). Per
family, on its tiny checkpoint of the real architecture, fp32 on CPU, with 4 questions of different lengths and
images of different sizes:

* every captured vector equals an unbatched forward with output_hidden_states=True at the recorded positions
  (tests/oracle.py; the last block compared before the final norm);
* the vision-only vector equals the independent pooled projector input;
* the vision position holds the image token and is the last one; the query position is the last prompt token;
  the prompt is the processor's own chat-template route;
* a left-padded batch of 4 equals batch 1 (< 1e-4), the answers are identical, and equal unbatched generate();
* prefill-only (`answers: false`: no KV cache, the forward ended after the last recorded block) gives the
  generating path's vectors exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import pytest
import torch
from helpers import watch_the_load
from oracle import assert_decoder_vectors_match, rel_error

from vlmstates.demo.dataset import demo_questions
from vlmstates.extraction.adapters import adapter_class, families, family_of_model_type
from vlmstates.extraction.adapters.base import Adapter
from vlmstates.extraction.adapters.entries import ENTRIES
from vlmstates.extraction.attention import TEXT, choose_attention, loaded_attention
from vlmstates.extraction.engine import Extractor, load_model
from vlmstates.images import load_image, resolve_image_path
from vlmstates.settings import ConfigError, ModelSettings
from vlmstates.store import SEMANTICS, STATUS_OK, VISION_ONLY

N_SAMPLES = 4


# -- independent projector inputs, one sample (batch of 1: no padding tile or image), mean-pooled -------------
def qwen_vision(model, inputs):
    # the patch merger's input: the windowed ViT's output before merging, all patches of the image
    return model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).last_hidden_state.mean(dim=0)


def qwen3_vl_vision(model, inputs):
    """The main merger's input: the ViT's last block output (its recorded hidden state), which the main merger
    (not a deepstack merger) turns into the image embeddings placed at the image tokens."""
    visual = model.model.visual
    out = visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"], output_hidden_states=True)
    last_block = out.hidden_states[-1]
    assert len(out.hidden_states) == model.config.vision_config.depth + 1
    assert torch.allclose(visual.merger(last_block), out.pooler_output, atol=1e-5)
    return last_block.mean(dim=0)


def glm4v_vision(model, inputs):
    """The merger's input: the ViT's last block output after the post-layernorm, each 2x2 group of patches
    (consecutive in the processor's patch order) merged by the downsample convolution. (transformers puts the
    vision model's last_hidden_state, the merged one, last in its hidden_states: the block's own output is hooked.)"""
    visual = model.model.visual
    merge = model.config.vision_config.spatial_merge_size
    blocks = []
    handle = visual.blocks[-1].register_forward_hook(lambda module, args, output: blocks.append(output))
    try:
        out = visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    finally:
        handle.remove()
    normed = visual.post_layernorm(blocks[0])
    groups = normed.reshape(-1, merge, merge, normed.shape[-1]).permute(0, 3, 1, 2)  # [tokens, C, merge, merge]
    weight, bias = visual.downsample.weight, visual.downsample.bias  # [Dout, C, merge, merge], [Dout]
    merged = torch.einsum("nchw,dchw->nd", groups, weight) + bias
    assert torch.allclose(visual.merger(merged), out.pooler_output, atol=1e-5)
    return merged.mean(dim=0)


def gemma_vision(model, inputs):
    return model.model.vision_tower(pixel_values=inputs["pixel_values"]).last_hidden_state[0].mean(dim=0)


def clip_layer_minus_2_without_cls(model, pixels):
    """LLaVA's features: the CLIP tower's second-to-last layer, the CLS position dropped (real config facts:
    vision_feature_layer -2, vision_feature_select_strategy "default")."""
    hidden = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-2]
    return hidden[:, 1:]


def llava_vision(model, inputs):
    return (
        clip_layer_minus_2_without_cls(model, inputs["pixel_values"])
        .reshape(-1, model.config.vision_config.hidden_size)
        .mean(dim=0)
    )


def llava_next_vision(model, inputs):
    tiles = inputs["pixel_values"][0]  # [tiles, C, H, W]: one image, so the processor padded none
    assert (tiles.flatten(1) != 0).any(dim=1).all()
    return clip_layer_minus_2_without_cls(model, tiles).reshape(-1, model.config.vision_config.hidden_size).mean(dim=0)


def smolvlm_vision(model, inputs):
    images = inputs["pixel_values"][0]  # [sub-images + global, C, H, W]: one sample, so no all-zero padding image
    assert (images.flatten(1) != 0).any(dim=1).all() and inputs["pixel_attention_mask"].all()
    return (
        model.model.vision_model(pixel_values=images)
        .last_hidden_state.reshape(-1, model.config.vision_config.hidden_size)
        .mean(dim=0)
    )


def llava_onevision_vision(model, inputs):
    # the real config: vision_feature_layer -1 (the last encoder layer's output, before SigLIP's post_layernorm),
    # strategy "full" (every patch kept; SigLIP has no CLS)
    tiles = inputs["pixel_values"][0]  # [tiles, C, H, W]: one image, so the processor padded none
    assert (tiles.flatten(1) != 0).any(dim=1).all()
    hidden = model.model.vision_tower(tiles, output_hidden_states=True).hidden_states[-1]
    return hidden.reshape(-1, model.config.vision_config.hidden_size).mean(dim=0)


def aya_vision_vision(model, inputs):
    # the projector's module input: SigLIP's last layer (vision_feature_layer -1, before its post_layernorm), every
    # patch (strategy "full"); the pixel shuffle happens inside the projector
    crops = inputs["pixel_values"]  # [crops + global, C, H, W]: one sample's, none padded
    hidden = model.model.vision_tower(crops, output_hidden_states=True).hidden_states[-1]
    return hidden.reshape(-1, model.config.vision_config.hidden_size).mean(dim=0)


def internvl_vision(model, inputs):
    """The projector's module input, pixel-shuffled in get_image_features: its mean over all tokens is, block by
    block of the 4x wide vector, the mean of the patches at one offset (row, column) of every 2x2 block, in the
    order (0, 0), (0, 1), (1, 0), (1, 1); features from InternViT's last layer, CLS dropped (real config:
    vision_feature_layer -1, strategy "default", downsample_ratio 0.5)."""
    crops = inputs["pixel_values"]  # [crops + thumbnail, C, H, W]: one sample's, none padded
    hidden = model.model.vision_tower(pixel_values=crops).last_hidden_state[:, 1:]
    side = int(hidden.shape[1] ** 0.5)
    grid = hidden.reshape(hidden.shape[0], side, side, -1)
    return torch.cat([grid[:, row::2, col::2].mean(dim=(0, 1, 2)) for row in (0, 1) for col in (0, 1)])


def mllama_vision(model, inputs):
    """Llama-3.2-Vision's projector input rebuilt from its encoders' layer outputs (the real model's layout: the global
    encoder's last state, then the local encoder's layers `intermediate_layers_indices` interleaved channel by channel
    (stacked on a last axis, then flattened: channel 0 of each layer, channel 1 of each, ...); per tile the CLS and
    the patch grid, the vision model's padding of each tile to a multiple of 8 positions cut off), mean over the real
    tiles of aspect_ratio_mask only (every image has max_num_tiles tiles, the unused ones all zero)."""
    vision, config = model.model.vision_model, model.config.vision_config
    captured = {}
    hooks = [
        vision.transformer.layers[i].register_forward_hook(lambda m, a, out, i=i: captured.__setitem__(i, out))
        for i in config.intermediate_layers_indices
    ]
    hooks.append(
        vision.global_transformer.register_forward_hook(
            lambda m, a, out: captured.__setitem__("global", out.last_hidden_state)
        )
    )
    try:
        vision(
            pixel_values=inputs["pixel_values"],
            aspect_ratio_ids=inputs["aspect_ratio_ids"],
            aspect_ratio_mask=inputs["aspect_ratio_mask"],
        )
    finally:
        for hook in hooks:
            hook.remove()
    tiles, positions = config.max_num_tiles, (config.image_size // config.patch_size) ** 2 + 1  # CLS + patches
    padded = captured["global"].reshape(tiles, -1, config.hidden_size)
    assert padded.shape[1] % 8 == 0 and padded.shape[1] > positions  # the encoders ran on padded tiles

    def per_tile(h):
        return h.reshape(tiles, -1, config.hidden_size)[:, :positions]

    intermediate = torch.stack([per_tile(captured[i]) for i in config.intermediate_layers_indices], dim=-1).flatten(-2)
    features = torch.cat([per_tile(captured["global"]), intermediate], dim=-1)
    real = inputs["aspect_ratio_mask"][0, 0].bool()  # one sample, one image
    assert 0 < real.sum() and features.shape[-1] == config.vision_output_dim
    return features[real].reshape(-1, config.vision_output_dim).mean(dim=0)


def fast_vlm_vision(model, inputs):
    """FastVLM's features: timm's FastViTHD run alone, its forward_features (the final_conv map [1, C, h, w];
    real config facts: vision_feature_layer -1, strategy "full"), every cell of the map."""
    timm_model = model.model.vision_tower.timm_model
    cells = timm_model.forward_features(inputs["pixel_values"])
    assert cells.shape[1] == model.config.vision_config.hidden_size
    return cells[0].flatten(1).mean(dim=1)


def gemma3n_vision(model, inputs):
    """Gemma 3n's features: timm's MobileNetV5 run alone (forward_features: the msfa map [1, 2048, h, w]), every
    cell, times sqrt(2048) as get_image_features scales it before embed_vision."""
    cells = model.model.vision_tower.timm_model.forward_features(inputs["pixel_values"])
    assert cells.shape[1] == model.config.vision_config.hidden_size
    return cells[0].flatten(1).mean(dim=1) * model.config.vision_config.hidden_size**0.5


def idefics3_vision(model, inputs):
    # SigLIP's last layer (post-layernorm) over every real sub-image and the global one, before the connector's
    # pixel shuffle; one sample, so no all-zero padding image, and no padded pixels (sub-images are full tiles)
    images = inputs["pixel_values"][0]
    assert (images.flatten(1) != 0).any(dim=1).all() and inputs["pixel_attention_mask"].all()
    hidden = model.model.vision_model(pixel_values=images).last_hidden_state
    assert hidden.shape[1] == (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    return hidden.reshape(-1, model.config.vision_config.hidden_size).mean(dim=0)


def paligemma_vision(model, inputs):
    # SigLIP's last layer (post-layernorm, no pooling head: vision_use_head false), every patch of the one square image
    hidden = model.model.vision_tower(pixel_values=inputs["pixel_values"]).last_hidden_state[0]
    assert hidden.shape[0] == model.config.text_config.num_image_tokens
    return hidden.mean(dim=0)


def phi4_vision(model, inputs):
    # the projection MLP's input rebuilt from the vision tower's feature layer (tests/test_phi4_multimodal.py)
    from test_phi4_multimodal import independent_projection_input_mean

    return independent_projection_input_mean(model, inputs)[0]


def mistral3_vision(model, inputs):
    # Pixtral run alone on the image's own pixels (its resized size, no batch padding), the layer the config names
    # (vision_feature_layer -1): the projector's input before its norm and patch merger, all (h/p)*(w/p) patches
    ((height, width),) = inputs["image_sizes"].tolist()
    assert tuple(inputs["pixel_values"].shape[-2:]) == (height, width)
    hidden = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states
    patches = hidden[model.config.vision_feature_layer][0]
    patch = model.config.vision_config.patch_size
    assert patches.shape[0] == (height // patch) * (width // patch)
    return patches.mean(dim=0)


def molmo2_vision(model, inputs):
    """The image projector's input rebuilt: the ViT's two feature layers (adapter_config.vision_feature_layer,
    counted as hidden_states after the embeddings) concatenated, each pooled token's window of patches
    (image_token_pooling, -1 for none) attended by the window's mean through the adapter's pooling attention."""
    adapter = model.config.adapter_config
    hidden = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states
    features = torch.cat([hidden[layer + 1 if layer >= 0 else layer] for layer in adapter.vision_feature_layer], dim=-1)
    features = features.reshape(-1, features.shape[-1])
    index = inputs["image_token_pooling"]
    valid = index >= 0
    window = features[index.clamp(min=0)]  # [tokens, window, D]
    query = (window * valid[..., None]).sum(dim=1) / valid.sum(dim=1, keepdim=True)
    pooling = model.model.multi_modal_projector.image_pooling_2d
    tokens, size, heads, head_dim = index.shape[0], index.shape[1], adapter.num_attention_heads, adapter.head_dim
    assert adapter.num_key_value_heads == heads
    q = pooling.q_proj(query).view(tokens, heads, head_dim)
    k = pooling.k_proj(window).view(tokens, size, heads, head_dim)
    v = pooling.v_proj(window).view(tokens, size, heads, head_dim)
    scores = torch.einsum("thd,tphd->thp", q, k) * head_dim**-0.5
    weights = scores.masked_fill(~valid[:, None, :], float("-inf")).softmax(dim=-1)
    pooled = pooling.o_proj(torch.einsum("thp,tphd->thd", weights, v).reshape(tokens, heads * head_dim))
    assert tokens == int((inputs["input_ids"] == model.config.image_patch_id).sum())
    return pooled.mean(dim=0)


@dataclass(frozen=True)
class Case:
    family: str
    sizes: list[tuple[int, int]]
    vision: Callable
    #: what must differ between the 4 samples, so that the batch is really mixed
    varies: str = "num_image_tokens"
    #: the prompt equals the processor's own apply_chat_template route (Phi-4's processor drops its template:
    #: tests/test_phi4_multimodal.py checks its documented format instead)
    processor_chat_template: bool = True
    #: every hidden_states entry is [streams, B, T, D] (Gemma 3n's AltUp): the stream the vectors hold
    stream: int | None = None
    #: hidden_states[n] has the final norm applied (Gemma 3n's is the last block's raw output)
    last_normed: bool = True
    #: the family has no chat template: the prompt is what its processor makes of the text alone
    #: (processor(text=..., images=...), e.g. PaliGemma's <image>... <bos> text \n)
    processor_text_route: bool = False
    #: the models' `prompt` setting (PaliGemma's mix checkpoints answer a task prefix)
    prompt: str = "{question}"
    #: a prefix-LM: the decoder attends both ways over the prompt (PaliGemma's token_type_ids)
    prefix_lm: bool = False


CASES = [
    Case("qwen2_5_vl", [(96, 64), (640, 480), (64, 128), (300, 200)], qwen_vision),
    Case("qwen2_vl", [(96, 64), (640, 480), (64, 128), (300, 200)], qwen_vision),
    # 6, 20, 8 and 24 image tokens (32-pixel factor: 16-px patches, 2x2 merge)
    Case("qwen3_vl", [(96, 64), (640, 480), (64, 128), (300, 200)], qwen3_vl_vision),
    # 6, 20, 10 and 24 image tokens (28-pixel factor: 14-px patches, 2x2 merge)
    Case("glm4v", [(96, 64), (640, 480), (64, 128), (300, 200)], glm4v_vision),
    Case("gemma3", [(96, 64), (640, 480), (64, 128), (1024, 768)], gemma_vision, varies="num_prompt_tokens"),
    Case("llava", [(96, 64), (640, 480), (64, 128), (300, 200)], llava_vision, varies="num_prompt_tokens"),
    # 1 + 2, 1 + 2, 1 + 4 and 1 + 3 tiles: the batch's pixel_values carry padding tiles
    Case("llava_next", [(96, 64), (64, 128), (200, 200), (300, 100)], llava_next_vision),
    # 12, 8, 16 and 8 sub-images + the global one: the batch carries all-zero padding images
    Case("smolvlm", [(96, 64), (64, 128), (200, 200), (300, 150)], smolvlm_vision),
    # own adapter code (the projection's inputs per image); one to six HD crops, batched by crop count
    Case(
        "phi4_multimodal", [(448, 448), (600, 300), (300, 200), (500, 500)], phi4_vision, processor_chat_template=False
    ),
    # 1 + 12, 1 + 15, 1 + 36 and 1 + 12 tiles (grids over 9 tiles shrunk by anyres_max_9): padding tiles in the batch
    Case("llava_onevision", [(96, 64), (64, 128), (200, 200), (300, 100)], llava_onevision_vision),
    # 6, 8, 9 and 12 crop tiles + the global one, all in one flat list of crops
    Case("aya_vision", [(96, 64), (64, 128), (200, 200), (300, 100)], aya_vision_vision),
    # 6, 8, 9 and 12 crop tiles + the thumbnail, all in one flat list of crops
    Case("internvl", [(96, 64), (64, 128), (200, 200), (300, 100)], internvl_vision),
    # 6x8, 6x6 (44 px rounded up to whole tokens), 8x4 and 8x8 merged tokens: the batch's pixels are padded
    Case("mistral3", [(96, 64), (44, 44), (64, 128), (200, 200)], mistral3_vision),
    # 1 + 8 (2x4), 1 + 4 (2x2), 1 + 7 (1x7) and 1 + 6 (2x3) crops: the batch's crops are concatenated
    Case("molmo2", [(96, 64), (44, 44), (300, 60), (60, 42)], molmo2_vision),
    # one <|image|> each (cross-attention); 2x1, 1x2, 1x3 and 2x2 tiles of the 4 every image has
    Case("mllama", [(64, 128), (128, 64), (300, 100), (96, 64)], mllama_vision, varies="num_prompt_tokens"),
    # one centre crop, 4x4 cells: every image the same 16 <image> tokens
    Case("fast_vlm", [(96, 64), (640, 480), (64, 128), (300, 200)], fast_vlm_vision, varies="num_prompt_tokens"),
    # one resized image, 16 soft tokens (real 256); vectors from AltUp stream 0
    Case(
        "gemma3n",
        [(96, 64), (640, 480), (64, 128), (300, 200)],
        gemma3n_vision,
        varies="num_prompt_tokens",
        stream=0,
        last_normed=False,
    ),
    # SmolVLM's layout: 12, 8, 16 and 8 sub-images + the global one, all-zero padding images in the batch
    Case("idefics3", [(96, 64), (64, 128), (200, 200), (300, 150)], idefics3_vision),
    # one fixed square: the same image tokens whatever the size; a prefix-LM (bidirectional over the prompt)
    Case(
        "paligemma",
        [(96, 64), (640, 480), (64, 128), (1024, 768)],
        paligemma_vision,
        varies="num_prompt_tokens",
        processor_chat_template=False,
        processor_text_route=True,
        prompt="answer en {question}",
        prefix_lm=True,
    ),
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny models' ops are too small to share threads: on a busy machine two run slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=CASES, ids=lambda case: case.family)
def run(request, tiny_checkpoint, tmp_path_factory):
    """A family's tiny model, 4 mixed questions, and their results at batch size 4 and 1."""
    case = request.param
    settings = ModelSettings.from_config(
        case.family,
        {
            "model": str(tiny_checkpoint(case.family)),
            "device": "cpu",
            "dtype": "float32",
            "max_new_tokens": 4,
            "multimodal_representation": True,
            "prompt": case.prompt,
        },
    )
    images = tmp_path_factory.mktemp(f"contract-{case.family}")
    questions = demo_questions(images, N_SAMPLES, case.sizes, seed=3)
    loaded = load_model(settings)
    batched = Extractor(loaded, progress=False, batch_size=4).extract(questions, images)
    singles = Extractor(loaded, progress=False, batch_size=1).extract(questions, images)
    assert all(r.status == STATUS_OK for r in batched + singles), [r.error for r in batched + singles]
    return case, loaded, questions, images, batched, singles


def single_batch(loaded, question, images):
    image = load_image(resolve_image_path(images, question.image_id))
    return loaded.adapter.build_batch(loaded, [loaded.settings.format_prompt(question.question)], [image])


def test_an_entrys_family_serves_its_model_types():
    """(That every family has a case here, or an exemption: tests/test_family_completeness.py.)"""
    for family, entry in ENTRIES.items():
        assert all(family_of_model_type(t) == family for t in entry.model_types)
        assert adapter_class(family).family == family and adapter_class(family).entry is entry


def test_every_family_loads_through_the_one_load():
    """Families differ in the hooks load() calls (revision, check_settings, attention, load_processor, load_model,
    prepare_model), never in load() itself."""
    assert [family for family in families() if adapter_class(family).load is not Adapter.load] == []


@pytest.mark.parametrize("family", [case.family for case in CASES])
def test_the_weights_are_read_straight_onto_the_device(family, tiny_checkpoint, monkeypatch):
    """from_pretrained is given the device (device_map) and nothing moves the model after it: a load never holds
    a whole copy of the weights in host memory on its way to the GPU. (On the CPU both ways give the same model;
    the call's arguments are what tells them apart.)"""
    watch = watch_the_load(monkeypatch)
    settings = ModelSettings.from_config(family, {"model": str(tiny_checkpoint(family)), "device": "cpu"})
    loaded = load_model(settings)
    assert watch.device_maps[0] == torch.device("cpu")
    assert watch.models[0] is loaded.model and watch.later_moves == []
    assert {p.device for p in loaded.model.parameters()} == {torch.device("cpu")}


def test_an_unknown_model_type_names_every_supported_family():
    with pytest.raises(ConfigError) as error:
        family_of_model_type("no_such_vlm", "models.x")
    message = str(error.value)
    assert "models.x: model_type 'no_such_vlm' is not supported" in message
    assert all(family in message for family in families())


def test_loads_as_the_real_classes_with_the_entrys_modules(run):
    case, loaded, _, _, batched, _ = run
    model = loaded.model
    assert family_of_model_type(model.config.model_type) == case.family
    adapter = loaded.adapter
    assert len(adapter.decoder_blocks(model)) == model.config.get_text_config().num_hidden_layers
    # the declared width is the width the projector really receives (Qwen2-VL's is embed_dim, not hidden_size)
    assert batched[0].vectors[VISION_ONLY].shape == (adapter.vision_hidden_size(model),)
    assert sum(p.numel() for p in adapter.vision_tower(model).parameters()) > 0
    # `attn_implementation: auto` on CPU is sdpa, but where the family refuses it (PaliGemma 2's Gemma 2: eager)
    expected = choose_attention(case.family, "auto", "cpu", "models.x.attn_implementation")
    assert loaded_attention(model, case.family) == expected
    assert loaded.attn_implementation == model.config.get_text_config()._attn_implementation == expected[TEXT]


def test_the_batch_is_mixed(run):
    """The comparisons below mean something only if the samples differ where the family's padding lies."""
    case, _, _, _, batched, _ = run
    assert len({getattr(r, case.varies) for r in batched}) > 1
    assert len({r.num_prompt_tokens for r in batched}) > 1


def test_positions_are_the_last_image_token_and_the_last_prompt_token(run):
    _, loaded, questions, images, batched, _ = run
    image_token = loaded.adapter.image_token_id(loaded.model)
    for question, result in zip(questions, batched):
        ids = single_batch(loaded, question, images).input_ids[0].tolist()
        image_positions = [i for i, t in enumerate(ids) if t == image_token]
        assert ids[result.vision_token_position] == image_token
        assert result.vision_token_position == image_positions[-1]
        assert result.num_image_tokens == len(image_positions)
        assert result.query_token_position == len(ids) - 1 == result.num_prompt_tokens - 1


def test_prompt_tokens_equal_the_processors_own_route(run):
    """The prompt is the processor's own: its chat template's (apply_chat_template), or for a family without
    one what its processor makes of the prompt text alone, every input it gives the model (PaliGemma's
    token_type_ids, its prefix) reaching the model, training labels not."""
    case, loaded, questions, images, _, _ = run
    if not (case.processor_chat_template or case.processor_text_route):
        pytest.skip(f"{case.family}: the processor has no chat template of its own")
    processor = loaded.processor
    for question in questions[:2]:
        image = load_image(resolve_image_path(images, question.image_id))
        batch = single_batch(loaded, question, images)
        if case.processor_chat_template:
            messages = [
                {
                    "role": "user",
                    "content": [{"type": "image", "image": image}, {"type": "text", "text": question.question}],
                }
            ]
            expected = processor.apply_chat_template(
                messages, tokenize=True, add_generation_prompt=True, return_dict=True
            )
            assert batch.input_ids[0].tolist() == list(np.asarray(expected["input_ids"]).reshape(-1))
            continue
        text = loaded.settings.format_prompt(question.question)
        expected = processor(text=text, images=image, return_tensors="pt")
        assert batch.input_ids[0].tolist() == expected["input_ids"][0].tolist()
        for name in set(expected) - {"labels"}:
            assert torch.equal(batch.inputs[name].cpu(), expected[name]), name
        assert "labels" not in batch.inputs
        if case.family == "paligemma":  # the documented format: image tokens, <bos>, the text, a newline
            tokenizer = processor.tokenizer
            image_tokens = processor.image_token * processor.image_seq_length
            assert tokenizer.decode(batch.input_ids[0]) == f"{image_tokens}{tokenizer.bos_token}{text}\n"
            assert text.startswith("answer en ") and not batch.inputs["token_type_ids"].any()  # all prefix


def test_vectors_equal_unbatched_output_hidden_states_and_the_independent_vision_features(run):
    case, loaded, questions, images, batched, _ = run
    extractor = Extractor(loaded, progress=False)
    with torch.inference_mode():
        for question, result in zip(questions, batched):
            inputs = single_batch(loaded, question, images).inputs
            hidden = loaded.model(**inputs, output_hidden_states=True).hidden_states
            assert_decoder_vectors_match(
                extractor,
                result,
                hidden,
                (case.family, question.question_id),
                stream=case.stream,
                last_normed=case.last_normed,
            )
            vision = case.vision(loaded.model, inputs)
            assert rel_error(result.vectors[VISION_ONLY], vision) < 1e-4, (case.family, question.question_id)


@pytest.mark.parametrize("run", [case for case in CASES if case.prefix_lm], indirect=True, ids=lambda case: case.family)
def test_a_prefix_lm_has_read_the_whole_prompt_at_the_vision_token(run):
    """The captured prefill is the prefix-LM's: VT, the last image placeholder, equals the forward with the
    processor's token_type_ids (the whole prompt one bidirectional prefix) and differs from a causal forward
    of the same tokens (every token_type_id 1), which a batch that lost the prefix mask would give."""
    from vlmstates.store import layer_key

    case, loaded, questions, images, batched, _ = run
    layer = Extractor(loaded, progress=False).layers[1]
    with torch.inference_mode():
        for question, result in zip(questions[:2], batched[:2]):
            inputs = single_batch(loaded, question, images).inputs
            assert not inputs["token_type_ids"].any()
            causal = dict(inputs, token_type_ids=torch.ones_like(inputs["token_type_ids"]))
            prefix = loaded.model(**inputs, output_hidden_states=True).hidden_states[layer + 1][
                0, result.vision_token_position
            ]
            causal = loaded.model(**causal, output_hidden_states=True).hidden_states[layer + 1][
                0, result.vision_token_position
            ]
            captured = result.vectors[layer_key("vision_token_representation", layer)]
            assert rel_error(captured, prefix) < 1e-4 and rel_error(captured, causal) > 1e-2, (
                case.family,
                question.question_id,
            )


def test_batch_of_four_equals_batch_of_one(run):
    case, _, _, _, batched, singles = run
    for a, b in zip(batched, singles):
        assert (a.answer, a.vision_token_position, a.query_token_position) == (
            b.answer,
            b.vision_token_position,
            b.query_token_position,
        )
        assert a.vectors.keys() == b.vectors.keys()
        for key, value in b.vectors.items():
            assert rel_error(a.vectors[key], value) < 1e-4, (case.family, a.question_id, key)


def test_prefill_only_gives_the_generating_paths_vectors_exactly(run):
    case, loaded, questions, images, batched, _ = run
    prefill_only = replace(loaded, settings=replace(loaded.settings, answers=False))
    results = Extractor(prefill_only, progress=False, batch_size=4).extract(questions, images)
    for a, b in zip(batched, results):
        assert b.status == STATUS_OK and b.answer == "" and a.vectors.keys() == b.vectors.keys()
        for key, value in a.vectors.items():
            assert np.array_equal(value, b.vectors[key]), (case.family, a.question_id, key)


def test_answers_equal_unbatched_generate(run):
    _, loaded, questions, images, batched, _ = run
    tokenizer = loaded.processor.tokenizer
    with torch.inference_mode():
        for question, result in zip(questions, batched):
            batch = single_batch(loaded, question, images)
            out = loaded.model.generate(**batch.inputs, do_sample=False, max_new_tokens=loaded.settings.max_new_tokens)
            assert (
                result.answer == tokenizer.decode(out[0, batch.input_ids.shape[1] :], skip_special_tokens=True).strip()
            )


def test_the_file_says_what_vt_and_vf_hold_in_the_family(run):
    _, loaded, _, _, _, _ = run
    semantics = Extractor(loaded, progress=False).attributes()["semantics"]
    assert semantics["family"] == loaded.adapter.semantics
    assert "VT: " in semantics["family"] and "VF: " in semantics["family"]
    assert semantics["vision_token_position"] == SEMANTICS["vision_token_position"]


def test_pooling_never_averages_padding(run):
    """Where a padded batch carries padding tiles or images, the adapter's row counts leave them out: the
    counts differ between samples, and sum to what the projector saw."""
    case, loaded, questions, images, _, _ = run
    from vlmstates.extraction.adapters.declarative import ROW_COUNTS, EntryAdapter

    if not isinstance(loaded.adapter, EntryAdapter):
        pytest.skip(f"{case.family} pools in its own code")

    pictures = [load_image(resolve_image_path(images, q.image_id)) for q in questions]
    batch = loaded.adapter.build_batch(loaded, [q.question for q in questions], pictures)
    seen = []
    handle = loaded.adapter.projector(loaded.model).register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        with torch.inference_mode():
            loaded.model(**batch.inputs)
    finally:
        handle.remove()
    assert batch.projector_rows == ROW_COUNTS[loaded.adapter.entry.pooling](loaded, batch.inputs)
    if batch.projector_select is not None:  # Mllama: the padding tiles reach the projector, masked; they are left out
        select = batch.projector_select
        assert select.shape == seen[0].shape[: select.dim()] and not select.all()
        assert len(set(batch.projector_rows)) > 1 and sum(batch.projector_rows) == int(select.sum()) < select.numel()
        seen[0] = seen[0][select]
    assert sum(batch.projector_rows) == seen[0].shape[0]
    if loaded.adapter.entry.pooling in ("tile_counts", "real_images"):
        assert len(set(batch.projector_rows)) > 1
        assert sum(batch.projector_rows) < batch.inputs["pixel_values"].shape[0] * batch.inputs["pixel_values"].shape[1]
    if loaded.adapter.entry.pooling == "crops_by_image_tokens":  # one flat list of crops, none of them padding
        assert len(set(batch.projector_rows)) > 1 and sum(batch.projector_rows) == batch.inputs["pixel_values"].shape[0]
    if loaded.adapter.entry.pooling == "image_sizes":  # the batch's pixel_values are padded to its largest image
        patch = loaded.model.config.vision_config.patch_size
        count, _, height, width = batch.inputs["pixel_values"].shape
        assert len(set(batch.projector_rows)) > 1 and sum(batch.projector_rows) < count * (height // patch) * (
            width // patch
        )


@pytest.mark.parametrize(
    "run", [case for case in CASES if case.family == "mllama"], indirect=True, ids=lambda case: case.family
)
def test_cross_attention_mask_follows_the_left_padding(run):
    """Llama-3.2-Vision batches exactly because its processor builds cross_attention_mask on the left-padded rows:
    each row attends to its own image's real tiles from its <|image|> on, its padding and the tokens before to none."""
    _, loaded, questions, images, _, _ = run
    pictures = [load_image(resolve_image_path(images, q.image_id)) for q in questions]
    batch = loaded.adapter.build_batch(loaded, [loaded.settings.format_prompt(q.question) for q in questions], pictures)
    mask, tiles = batch.inputs["cross_attention_mask"], batch.inputs["aspect_ratio_mask"]  # [B, L, 1, 4], [B, 1, 4]
    assert len({int(n) for n in batch.attention_mask.sum(dim=1)}) > 1  # rows of different padding
    for row, image_position in enumerate(
        batch.input_ids.eq(loaded.adapter.image_token_id(loaded.model)).int().argmax(dim=1)
    ):
        assert not mask[row, :image_position].any()
        assert mask[row, image_position:, 0].eq(tiles[row, 0]).all()


def test_the_all_families_config_validates():
    """config/all-families.yaml is a valid config (that it names every family once: test_family_completeness.py)."""
    import yaml
    from helpers import REPO

    from vlmstates.workflow.config_check import check_config

    config = yaml.safe_load((REPO / "config" / "all-families.yaml").read_text())
    check_config(config, REPO / "workflow" / "schemas" / "config.schema.yaml")  # as the workflow does (common.smk)
