"""Tiny random PaliGemma 2 checkpoint (``PaliGemmaForConditionalGeneration``).

Same architecture and processor as ``google/paligemma2-3b-mix-448``: a SigLIP tower (14-px patches, no pooling
head) on the image resized to one fixed square (real: 448 px, bicubic, so 32x32 = 1024 patches whatever the
image's size), a one-layer linear ``multi_modal_projector`` into a Gemma 2 decoder (alternating sliding-window
and global attention layers, attention-logit softcapping 50 and final-logit softcapping 30, 1-indexed positions).
There is no chat template: the ``PaliGemmaProcessor`` writes the prompt itself, as
``<image>`` x image_seq_length + ``<bos>`` + text + ``\\n``, and returns ``token_type_ids`` (0 for the whole
prompt, the prefix), with which the model attends bidirectionally over the prefix (image and text) and causally
over what follows (the answer): a prefix-LM. The mix checkpoints answer a task prefix, e.g. ``answer en
{question}`` for VQA. The tokenizer is Gemma's: ``<pad>``, ``<eos>``, ``<bos>``, ``<unk>`` take ids 0-3, the
turn tokens follow (real 106, 107), then the ordinary vocabulary, the 1024 ``<locNNNN>`` and 128 ``<segNNN>``
tokens (ordinary added tokens, as the processor adds them) and ``<image>`` (real 257152) after them. The
checkpoint stops on ``<eos>`` and ``<end_of_turn>`` (as the real config.json's text_config: eos [1, 107]) and
pads with ``<pad>`` (0). Gemma 2 has no sdpa kernel (softcapping): the family runs eager attention.

Tiny geometry: 56-px images of 14-px patches (4x4 = 16 image tokens; real 448 px, 32x32 = 1024); a sliding
window of 16 tokens, shorter than a prompt (real 4096, longer than one), so the sliding-window path really cuts.
Special-token ids past the first four are not the real ones: the vocabulary is small; their names and order are.
"""

from __future__ import annotations

from pathlib import Path

from vlmstates.demo.tiny import generation_config, save_checkpoint, seeded_model
from vlmstates.demo.tiny.image import SIGLIP_MEAN, SIGLIP_STD, siglip_vision_config
from vlmstates.demo.tiny.tokenizer import build_tokenizer

FAMILY = "paligemma"

PAD, EOS, BOS, UNK = "<pad>", "<eos>", "<bos>", "<unk>"
START_OF_TURN, END_OF_TURN = "<start_of_turn>", "<end_of_turn>"
IMAGE = "<image>"
LOC_SEG = [f"<loc{i:0>4}>" for i in range(1024)] + [f"<seg{i:0>3}>" for i in range(128)]

IMAGE_SIZE = 56  # real 448
PATCH_SIZE = 14
IMAGE_SEQ_LENGTH = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 16; real 1024

TEXT_HIDDEN = 64
HEAD_DIM = 16
NUM_LAYERS = 4
SLIDING_WINDOW = 16


def build_processor():
    from transformers import PaliGemmaProcessor, SiglipImageProcessor

    tokenizer = build_tokenizer(
        leading_special_tokens=(PAD, EOS, BOS, UNK, START_OF_TURN, END_OF_TURN),
        named_special_tokens={"pad_token": PAD, "eos_token": EOS, "bos_token": BOS, "unk_token": UNK},
        chat_template="",
        add_bos_token=True,  # Gemma's tokenizer starts a plain tokenizer(text) with <bos>; the processor turns it off
    )
    tokenizer.chat_template = None  # PaliGemma has none
    tokenizer.add_tokens(LOC_SEG)
    # after the ordinary vocabulary and the <loc>/<seg> tokens, as the real <image> (257152); listed with the
    # unnamed special tokens, so that decode(skip_special_tokens=True) drops all three
    tokenizer.add_special_tokens({"additional_special_tokens": [START_OF_TURN, END_OF_TURN, IMAGE]})
    image_processor = SiglipImageProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        resample=3,
        image_mean=SIGLIP_MEAN,
        image_std=SIGLIP_STD,
        do_convert_rgb=True,
    )
    image_processor.image_seq_length = IMAGE_SEQ_LENGTH
    return PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)


def build(out_dir: Path, seed: int = 0) -> Path:
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration

    processor = build_processor()
    tokenizer = processor.tokenizer
    ids = tokenizer.convert_tokens_to_ids
    pad_id, bos_id, eos_ids = ids(PAD), ids(BOS), [ids(EOS), ids(END_OF_TURN)]
    text = dict(
        model_type="gemma2",
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=2 * TEXT_HIDDEN,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=HEAD_DIM,
        query_pre_attn_scalar=HEAD_DIM,
        hidden_activation="gelu_pytorch_tanh",
        max_position_embeddings=8192,
        rms_norm_eps=1e-6,
        sliding_window=SLIDING_WINDOW,
        layer_types=["sliding_attention", "full_attention"] * (NUM_LAYERS // 2),
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
        pad_token_id=pad_id,
        bos_token_id=bos_id,
        eos_token_id=eos_ids,
        dtype="float32",
    )
    config = PaliGemmaConfig(
        text_config=text,
        vision_config=siglip_vision_config(IMAGE_SIZE, PATCH_SIZE, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6),
        image_token_id=ids(IMAGE),
        projection_dim=TEXT_HIDDEN,
        pad_token_id=pad_id,
        bos_token_id=bos_id,
        eos_token_id=eos_ids[0],
        dtype="float32",
    )
    model = seeded_model(PaliGemmaForConditionalGeneration, config, seed)
    model.generation_config = generation_config(bos_id, pad_id, eos_ids)
    return save_checkpoint(model, processor, out_dir)
