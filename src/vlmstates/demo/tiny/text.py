"""What several tiny checkpoints' text sides share: the tiny decoder's sizes, the Llama 3 and Qwen2 special
tokens, and the text configs of the Llama 3 and Qwen2 decoders that several families are built on."""

from __future__ import annotations

TEXT_HIDDEN = 64

# Llama 3's special tokens (ids 128000-128010 in the real vocabulary); each family lists those its tokenizer has.
BEGIN_OF_TEXT, END_OF_TEXT = "<|begin_of_text|>", "<|end_of_text|>"
START_HEADER, END_HEADER, EOM, EOT = "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>"

# Qwen2's special tokens, which SmolLM2's tokenizer has too.
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"


def decoder_config(vocab_size: int, **settings) -> dict:
    """The tiny text_config: 4 blocks of width 64, 4 heads sharing 2 kv heads, SiLU, fp32; ``settings`` add a
    family's fields or replace these."""
    return (
        dict(
            vocab_size=vocab_size,
            hidden_size=TEXT_HIDDEN,
            intermediate_size=2 * TEXT_HIDDEN,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            hidden_act="silu",
            dtype="float32",
        )
        | settings
    )


def llama3_text_config(vocab_size: int, **settings) -> dict:
    """A tiny Llama 3 (8B's settings: RMSNorm eps 1e-5, 8192 positions, rope theta 500000)."""
    return decoder_config(
        vocab_size,
        model_type="llama",
        rms_norm_eps=1e-5,
        max_position_embeddings=8192,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        **settings,
    )


def qwen2_text_config(vocab_size: int, **settings) -> dict:
    """A tiny Qwen2 / Qwen2.5 (7B's settings: RMSNorm eps 1e-6, 32768 positions, rope theta 1e6, untied)."""
    return decoder_config(
        vocab_size,
        model_type="qwen2",
        rms_norm_eps=1e-6,
        max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        tie_word_embeddings=False,
        **settings,
    )
