"""Tiny random Gemma 3n (``Gemma3nForConditionalGeneration``), as ``google/gemma-3n-E4B-it``.

The real model: a MobileNetV5 vision tower (timm's ``mobilenetv5_300m_enc`` behind ``TimmWrapperModel``)
whose multi-scale fusion adapter (msfa) always outputs 2048 channels on a 16x16 grid for the 768x768 image
(256 soft tokens); ``get_image_features`` flattens it to ``[images, 256, 2048]``, scales it by sqrt(2048) and
gives it to ``embed_vision`` (soft-embedding RMSNorm, projection into the decoder, post-projection norm).
The decoder is Gemma 3n's: four AltUp streams (every block's output and every ``hidden_states`` entry is
``[4, B, T, D]``, stream 0 the active one), per-layer inputs, LAuReL, KV sharing of the last layers, a
sliding/full attention pattern and an audio tower (conformer) beside the vision one. The processor replaces
each ``<image_soft_token>`` the chat template writes by ``\\n\\n<start_of_image>`` + 256 x
``<image_soft_token>`` + ``<end_of_image>\\n\\n``, whatever the image size.

Token ids as the real layout: ``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2, ``<unk>`` 3; the turn tokens, then
``<start_of_image>`` and ``<start_of_audio>`` at the end of the text vocabulary (real 255999, 256000, of a
262144-entry text vocabulary); the vision vocabulary follows it (128 ids from ``<end_of_image>``, then
``<image_soft_token>``: real 262144, 262145), then the audio one (128 ids from ``<end_of_audio>``, then
``<audio_soft_token>``: real 262272, 262273). Ids from the vision offset on are embedded by
``embed_vision``/``embed_audio`` (hard embeddings), not by the text table. Generation stops at ``<eos>`` or
``<end_of_turn>``.

Tiny geometry: a 4-stage MobileNetV5 (edge residual, universal inverted residual and multi-query attention
blocks, as the real stages, one or three blocks each, 8-32 channels), msfa at a 4x4 grid: 128-px images
(real 768) give 16 soft tokens (real 256); the msfa stays 2048 wide, as timm builds it whatever the
channels. The decoder has 4 layers (sliding, full, sliding, full; the last two share the KV of the first
two, as the real last 15 of 35 do), activation sparsity in layer 0 (real: the first 10).
"""

from __future__ import annotations

import copy
from pathlib import Path

from vlmstates.demo.tiny import generation_config, save_checkpoint, seeded_model
from vlmstates.demo.tiny.gemma3 import gemma_chat_template
from vlmstates.demo.tiny.tokenizer import build_tokenizer

PAD, EOS, BOS, UNK = "<pad>", "<eos>", "<bos>", "<unk>"
START_OF_TURN, END_OF_TURN = "<start_of_turn>", "<end_of_turn>"
BOI, BOA = "<start_of_image>", "<start_of_audio>"
EOI, IMAGE_SOFT = "<end_of_image>", "<image_soft_token>"
EOA, AUDIO_SOFT = "<end_of_audio>", "<audio_soft_token>"
MODALITY_VOCAB = 128  # ids per modality vocabulary (real)
# fillers so that each modality vocabulary holds its real 128 ids (tiny-only names)
VISION_VOCAB = (EOI, IMAGE_SOFT, *(f"<vision_reserved_{i}>" for i in range(MODALITY_VOCAB - 2)))
AUDIO_VOCAB = (EOA, AUDIO_SOFT, *(f"<audio_reserved_{i}>" for i in range(MODALITY_VOCAB - 2)))

IMAGE_SIZE = 128  # real 768
GRID = 4  # msfa output resolution: real 16
SOFT_TOKENS = GRID * GRID
VISION_HIDDEN = 2048  # timm's msfa width, fixed
# MobileNetV5 stages in timm's block notation (real: 3, 5, 10 and 38 blocks, 128-1280 channels)
ARCH = [
    ["er_r1_k3_s2_e4_c8"],
    ["uir_r1_a3_k5_s2_e6_c16"],
    ["uir_r1_a5_k5_s2_e6_c16", "mqa_r1_k3_h2_s1_d8_c16", "uir_r1_a0_k0_s1_e2_c16"],
    ["uir_r1_a5_k5_s2_e6_c32", "mqa_r1_k3_h2_s1_d8_c32", "uir_r1_a0_k0_s1_e2_c32"],
]

TEXT_HIDDEN = 64
NUM_LAYERS = 4
LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]

# Modelled on the real Gemma 3n chat template: Gemma 3's, the image written as <image_soft_token>, the audio as
# <audio_soft_token>.
CHAT_TEMPLATE = gemma_chat_template(
    "{% if item['type'] == 'image' %}<image_soft_token>"
    "{% elif item['type'] == 'audio' %}<audio_soft_token>"
    "{% elif item['type'] == 'text' %}{{ item['text'] | trim }}"
    "{% endif %}"
)


def build(out_dir: Path, seed: int = 0) -> Path:
    from timm.models._efficientnet_builder import decode_arch_def
    from transformers import (
        Gemma3nAudioFeatureExtractor,
        Gemma3nConfig,
        Gemma3nForConditionalGeneration,
        Gemma3nProcessor,
        SiglipImageProcessor,
    )

    tokenizer = build_tokenizer(
        leading_special_tokens=(PAD, EOS, BOS, UNK),
        trailing_special_tokens=(START_OF_TURN, END_OF_TURN, BOI, BOA, *VISION_VOCAB, *AUDIO_VOCAB),
        named_special_tokens={
            "pad_token": PAD,
            "eos_token": EOS,
            "bos_token": BOS,
            "unk_token": UNK,
            "boi_token": BOI,
            "eoi_token": EOI,
            "image_token": IMAGE_SOFT,
            "boa_token": BOA,
            "eoa_token": EOA,
            "audio_token": AUDIO_SOFT,
        },
        chat_template=CHAT_TEMPLATE,
        add_bos_token=True,
        padding_side="left",
    )
    ids = tokenizer.convert_tokens_to_ids
    text_vocab = ids(EOI)  # the vision vocabulary starts where the text one ends
    assert ids(EOA) == text_vocab + MODALITY_VOCAB and len(tokenizer) == text_vocab + 2 * MODALITY_VOCAB
    image_processor = SiglipImageProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        resample=2,
        do_normalize=False,  # timm's cfg: mean 0, std 1
    )
    processor = Gemma3nProcessor(
        feature_extractor=Gemma3nAudioFeatureExtractor(),
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
        image_seq_length=SOFT_TOKENS,
    )
    model_args = {"block_args": decode_arch_def(ARCH), "stem_size": 8, "msfa_output_resolution": GRID}
    vision = dict(
        architecture="mobilenetv5_300m_enc",
        do_pooling=False,
        hidden_size=VISION_HIDDEN,
        model_args=copy.deepcopy(model_args),
        vocab_size=MODALITY_VOCAB,
        vocab_offset=text_vocab,
        rms_norm_eps=1e-6,
    )
    audio = dict(
        vocab_size=MODALITY_VOCAB,
        vocab_offset=text_vocab + MODALITY_VOCAB,
        hidden_size=32,
        conf_num_attention_heads=2,
        conf_num_hidden_layers=1,
        sscp_conv_channel_size=[8, 4],
    )
    text = dict(
        vocab_size=len(tokenizer),
        vocab_size_per_layer_input=text_vocab,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=[2 * TEXT_HIDDEN] * NUM_LAYERS,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        hidden_size_per_layer_input=16,
        laurel_rank=8,
        sliding_window=32,
        layer_types=LAYER_TYPES,
        num_kv_shared_layers=2,
        activation_sparsity_pattern=[0.95, 0.0, 0.0, 0.0],
        max_position_embeddings=32768,
        pad_token_id=ids(PAD),
        bos_token_id=ids(BOS),
        eos_token_id=[ids(EOS), ids(END_OF_TURN)],
        dtype="float32",
    )
    config = Gemma3nConfig(
        text_config=text,
        vision_config=vision,
        audio_config=audio,
        vision_soft_tokens_per_image=SOFT_TOKENS,
        boi_token_id=ids(BOI),
        eoi_token_id=ids(EOI),
        image_token_id=ids(IMAGE_SOFT),
        boa_token_id=ids(BOA),
        eoa_token_id=ids(EOA),
        audio_token_id=ids(AUDIO_SOFT),
        dtype="float32",
    )
    model = seeded_model(Gemma3nForConditionalGeneration, config, seed)
    # timm edits block_args in place when it builds the tower: save the arguments as given
    model.config.vision_config.model_args = copy.deepcopy(model_args)
    model.generation_config = generation_config(ids(BOS), ids(PAD), [ids(EOS), ids(END_OF_TURN)])
    return save_checkpoint(model, processor, out_dir)
