"""The attention table (vlmstates.extraction.attention) against what each implementation computes, every family.

flash-attention cannot run here, so its CUDA kernel is replaced by a reference kernel with flash-attn's documented
semantics (causal aligned bottom right, window_size, softcap, grouped heads) while everything transformers does
around it runs as on a GPU: the mask it builds for the implementation (only the padding mask), the unpadding, the
varlen and packed-sequence paths, cu_seqlens of the vision towers. flex_attention runs uncompiled (slow: on a few
families). On each family's tiny checkpoint, a left-padded batch of two samples runs one forward per implementation
and sub-model: the decoder blocks' outputs at real tokens and the recorded vision-only vector must equal eager's
where the table allows the implementation, and differ where the table refuses it for its mask.
"""

from __future__ import annotations

import pytest
import torch
from oracle import rel_error
from PIL import Image

from vlmstates.extraction import attention
from vlmstates.extraction.attention import (
    ATTENTION,
    AUTO,
    EAGER,
    FLASH_2,
    FLASH_3,
    FLEX,
    MASK_REASONS,
    SDPA,
    TEXT,
    VISION,
    check_attention,
    choose_attention,
)
from vlmstates.extraction.engine import load_model
from vlmstates.extraction.hooks import forward_hooks
from vlmstates.settings import ConfigError, ModelSettings

#: below this the states are eager's (fp32: sdpa and the reference kernels differ by ~1e-6)
SAME = 1e-4
QUESTIONS = ["what is it?", "is there a big red dog sitting in the picture, next to the tree?"]
SIZES = [(64, 48), (40, 80)]
TABLE_FAMILIES = [family for family, table in ATTENTION.items() if not table.remote_code]


# -- reference kernels with flash-attn's interface -------------------------------------------------------------
def _attend(q, k, v, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0):
    """q [B, Lq, H, D], k/v [B, Lk, Hk, D] -> [B, Lq, H, D], as flash-attn defines it."""
    lq, heads, lk = q.shape[1], q.shape[2], k.shape[1]
    k, v = (x.repeat_interleave(heads // x.shape[2], dim=2) for x in (k, v))
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * (softmax_scale or q.shape[-1] ** -0.5)
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    diagonal = torch.arange(lq)[:, None] + (lk - lq)  # the bottom-right aligned diagonal
    keys = torch.arange(lk)[None, :]
    allowed = torch.ones(lq, lk, dtype=torch.bool)
    if causal:
        allowed &= keys <= diagonal
    left, right = window_size
    if left >= 0:
        allowed &= keys >= diagonal - left
    if right >= 0:
        allowed &= keys <= diagonal + right
    probabilities = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", probabilities, v)


def reference_flash(
    q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, deterministic=False
):
    return _attend(q, k, v, softmax_scale, causal, window_size, softcap)


def reference_flash_varlen(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q=None,
    max_seqlen_k=None,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    deterministic=False,
):
    out = torch.empty_like(q)
    for i in range(len(cu_seqlens_q) - 1):
        qs, qe, ks, ke = int(cu_seqlens_q[i]), int(cu_seqlens_q[i + 1]), int(cu_seqlens_k[i]), int(cu_seqlens_k[i + 1])
        out[qs:qe] = _attend(
            q[None, qs:qe], k[None, ks:ke], v[None, ks:ke], softmax_scale, causal, window_size, softcap
        )[0]
    return out


@pytest.fixture
def kernels(monkeypatch):
    """transformers' flash-attention path with the reference kernels, flex_attention uncompiled."""
    from torch.nn.attention.flex_attention import flex_attention
    from transformers import modeling_flash_attention_utils as fa
    from transformers.integrations import flex_attention as hf_flex

    def lazy_imports(implementation, attention_wrapper=None, allow_all_kernels=False):
        return reference_flash, reference_flash_varlen, None, fa._pad_input, fa._unpad_input

    monkeypatch.setattr(fa, "_lazy_imports", lazy_imports)
    monkeypatch.setattr(fa, "_loaded_implementation", None)
    monkeypatch.setattr(
        hf_flex, "compile_friendly_flex_attention", lambda q, k, v, training=False, **kw: flex_attention(q, k, v, **kw)
    )


# -- one forward per implementation ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def eager_models(tiny_checkpoint):
    """family -> (loaded model with eager everywhere, a left-padded batch of two samples of different lengths)."""
    cache = {}

    def get(family):
        if family not in cache:
            settings = ModelSettings.from_config(
                family,
                {
                    "model": str(tiny_checkpoint(family)),
                    "device": "cpu",
                    "dtype": "float32",
                    "attn_implementation": EAGER,
                },
            )
            loaded = load_model(settings)
            images = [Image.new("RGB", size, (40 * i + 90, 200 - 60 * i, 30)) for i, size in enumerate(SIZES)]
            batch = loaded.adapter.build_batch(loaded, [settings.format_prompt(q) for q in QUESTIONS], images)
            assert batch.attention_mask.sum(dim=1).unique().numel() == 2  # left padding in one row
            cache[family] = (loaded, batch)
        return cache[family]

    return get


def set_attention(model, family: str, sub_model: str, implementation: str) -> None:
    """What from_pretrained would set for this sub-model, with no availability check (flash is emulated)."""
    table = ATTENTION[family]
    for key in table.text_configs if sub_model == TEXT else table.vision_configs:
        if key == "":  # the top-level config alone: its setter would pass a plain value on to every sub-config
            model.config._attn_implementation_internal = implementation
        else:
            getattr(model.config, key)._attn_implementation = implementation


def states(loaded, batch) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The decoder blocks' outputs at real tokens and the projector's input, from one prefill forward."""
    adapter, model = loaded.adapter, loaded.model
    blocks, projector_inputs = [], []
    hooks = dict(
        after=[
            (block, lambda m, a, out: blocks.append(adapter.block_hidden_states(out)))
            for block in adapter.decoder_blocks(model)
        ],
        before=[(adapter.projector(model), lambda m, args: projector_inputs.append(args[0]))],
    )
    with torch.no_grad(), forward_hooks(**hooks):
        model(**batch.inputs)
    real = batch.attention_mask.bool()
    return [b[real] for b in blocks], adapter.pool_projector_input(projector_inputs[0], batch)


def differs(a, b) -> float:
    blocks_a, vision_a = a
    blocks_b, vision_b = b
    return max([rel_error(x, y) for x, y in zip(blocks_a, blocks_b)] + [rel_error(vision_a, vision_b)])


#: flex_attention, slow uncompiled, on the decoders with a mask that is not plain causal and on one that is; its
#: BlockMask comes from the same mask function as sdpa's and eager's masks (transformers' masking_utils)
FLEX_CHECKED = ("gemma3", "paligemma", "molmo2", "llava")


def test_flash_attention_3_takes_flash_attention_2s_path():
    """transformers 5.23 builds the same mask and runs the same code for both (only the kernel differs), so the
    flash_attention_2 rows below stand for flash_attention_3 too; the table refuses them together."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    assert ALL_MASK_ATTENTION_FUNCTIONS[FLASH_3] is ALL_MASK_ATTENTION_FUNCTIONS[FLASH_2]
    assert ALL_ATTENTION_FUNCTIONS[FLASH_3] is ALL_ATTENTION_FUNCTIONS[FLASH_2]
    for table in ATTENTION.values():
        for sub_model in (TEXT, VISION):
            assert table.refused(sub_model).get(FLASH_3) == table.refused(sub_model).get(FLASH_2)


@pytest.mark.parametrize("family", TABLE_FAMILIES)
def test_an_implementation_is_allowed_exactly_where_it_gives_eagers_states(family, eager_models, kernels):
    loaded, batch = eager_models(family)
    reference = states(loaded, batch)
    table = ATTENTION[family]
    checked = []
    for sub_model in (TEXT, VISION):
        for implementation in (SDPA, FLASH_2, FLEX) if family in FLEX_CHECKED else (SDPA, FLASH_2):
            reason = table.refused(sub_model).get(implementation)
            if reason is not None and reason not in MASK_REASONS:
                continue  # one transformers cannot load (its own refusal), not a mask that differs
            set_attention(loaded.model, family, sub_model, implementation)
            try:
                error = differs(states(loaded, batch), reference)
            finally:
                set_attention(loaded.model, family, sub_model, EAGER)
            checked.append((sub_model, implementation, error))
            if reason is None:
                assert error < SAME, f"{family} {sub_model}: {implementation} is allowed but differs by {error:.2e}"
            else:
                assert error > 100 * SAME, f"{family} {sub_model}: {implementation} is refused but gives eager's states"
    assert checked


def test_the_table_matches_what_transformers_can_load(tiny_checkpoint):
    """An implementation is refused for a reason other than its mask exactly where the model class lacks it."""
    import transformers

    from vlmstates.extraction.adapters import adapter_class

    flags = {
        SDPA: "_supports_sdpa",
        FLASH_2: "_supports_flash_attn",
        FLASH_3: "_supports_flash_attn",
        FLEX: "_supports_flex_attn",
    }
    for family in ("qwen2_5_vl", "glm4v", "mllama", "gemma3", "llava"):
        model_class = getattr(transformers, adapter_class(family).entry.auto_class)
        config = transformers.AutoConfig.from_pretrained(tiny_checkpoint(family))
        concrete = model_class._model_mapping[type(config)]
        for implementation, flag in flags.items():
            unsupported = not getattr(concrete, flag)
            refused = ATTENTION[family].text.get(implementation)
            assert unsupported == (refused is not None and refused not in MASK_REASONS), (family, implementation)


# -- the choice -------------------------------------------------------------------------------------------------
@pytest.fixture
def flash_installed(monkeypatch):
    """transformers' own checks say flash-attn 2 is there (and flash-attn 3 is not)."""

    def available(implementation, device_type):
        return implementation in (EAGER, SDPA) or (implementation == FLASH_2 and device_type == "cuda")

    monkeypatch.setattr(attention, "available", available)


@pytest.mark.parametrize(
    "family, text, vision",
    [
        ("gemma3", SDPA, FLASH_2),  # image blocks: flash would drop them
        ("paligemma", EAGER, FLASH_2),  # prefix-LM, and Gemma 2's softcap has no sdpa
        ("molmo2", SDPA, FLASH_2),
        ("mllama", SDPA, SDPA),  # no flash-attention in transformers
        ("fast_vlm", FLASH_2, SDPA),  # timm tower
        ("qwen2_5_vl", FLASH_2, FLASH_2),
    ],
)
def test_auto_picks_the_fastest_correct_implementation(family, text, vision, flash_installed):
    key = f"models.{family}.attn_implementation"
    assert choose_attention(family, AUTO, "cuda", key) == {TEXT: text, VISION: vision}
    assert choose_attention(family, AUTO, "cpu", key)[TEXT] in (SDPA, EAGER)  # flash only on CUDA


def test_auto_without_flash_attn_is_sdpa():
    assert choose_attention("qwen2_5_vl", AUTO, "cuda", "k") == {TEXT: SDPA, VISION: SDPA}


def test_a_wrong_explicit_choice_is_refused_naming_the_family_and_why():
    with pytest.raises(
        ConfigError,
        match=r"models\.g\.attn_implementation: flash_attention_2 .* text model of the gemma3 family: .*bidirectional",
    ):
        check_attention("gemma3", FLASH_2, "models.g.attn_implementation")
    with pytest.raises(
        ConfigError, match=r"vision model of the fast_vlm family: .*timm.*\{text: flash_attention_3, vision: auto\}"
    ):
        check_attention("fast_vlm", FLASH_3, "k")
    with pytest.raises(ConfigError, match=r"unknown sub-model\(s\) text_config"):
        check_attention("qwen2_5_vl", {"text_config": SDPA}, "k")
    with pytest.raises(ConfigError, match=r"'flash' for the vision model is no attention implementation"):
        check_attention("qwen2_5_vl", {"vision": "flash"}, "k")
    with pytest.raises(ConfigError, match=r"remote code chooses its own attention"):
        check_attention("molmo", SDPA, "k")


def test_per_sub_model_choices_reach_each_config(tiny_checkpoint):
    settings = ModelSettings.from_config(
        "gemma3",
        {
            "model": str(tiny_checkpoint("gemma3")),
            "device": "cpu",
            "dtype": "float32",
            "attn_implementation": {TEXT: EAGER, VISION: SDPA},
        },
    )
    loaded = load_model(settings)
    config = loaded.model.config
    assert (config.text_config._attn_implementation, config.vision_config._attn_implementation) == (EAGER, SDPA)
    assert attention.loaded_attention(loaded.model, "gemma3") == {TEXT: EAGER, VISION: SDPA}
    assert loaded.attn_implementation == EAGER
