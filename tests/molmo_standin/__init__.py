"""A small STAND-IN for Molmo's remote code, for the tests of the vlmstates Molmo adapter.

The real allenai/Molmo-7B-O-0924 and MolmoE-1B-0924 exist only as remote code whose vision tower is a
hard-coded CLIP ViT-L/14-336, so no tiny checkpoint of them can be built. This package holds small
implementations of our own (configuration_molmo.py, modeling_molmo.py, preprocessing_molmo.py), written
from what a trial against the real remote code (transformers 4.48.3) showed: the interface the adapter
uses (module paths, `processor.process` outputs, `generate_from_batch` over `GenerationMixin.generate`)
and the real code's behaviours that punish a wrong use of it (see modeling_molmo.py).
`build_standin_checkpoint` writes a local folder, in 7B-O's config layout or MolmoE's (OLMo-style keys,
mixture-of-experts blocks), that loads through the real remote-code path of transformers:

    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    AutoProcessor.from_pretrained(folder, trust_remote_code=True)

config.json has model_type "molmo" and an `auto_map` pointing at the copies of those three files in the
folder. Nothing here is allenai's code, and passing tests against it says nothing about the numbers of the
real model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REMOTE_FILES = ("configuration_molmo.py", "modeling_molmo.py", "preprocessing_molmo.py")
SPECIAL_TOKENS = ("<|endoftext|>", "<im_start>", "<im_end>", "<im_patch>", "<im_col>", "<|image|>")

# Language-model settings in the keys of Molmo-7B-O's config.json (tiny values), and in MolmoE-1B's
# OLMo-style keys (the real one: d_model 2048, n_layers 16, moe_num_experts 64, moe_top_k 8). Neither has
# an eos_token_id, as the real configs have none.
TEXT_CONFIG = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    layer_norm_eps=1e-6,
    rope_theta=10000.0,
    qkv_bias=False,
    use_position_ids=True,
    weight_tying=False,
    initializer_range=0.02,
    use_cache=True,
)
MOLMOE_TEXT_CONFIG = dict(
    d_model=32,
    n_layers=4,
    n_heads=4,
    n_kv_heads=4,
    mlp_hidden_size=16,
    moe_num_experts=4,
    moe_top_k=2,
    block_type="moe",
    max_sequence_length=1024,
    layer_norm_eps=1e-5,
    rope_theta=10000.0,
    include_bias=False,
    use_position_ids=True,
    weight_tying=False,
    init_std=0.02,
    use_cache=True,
)
#: layout -> (config class, model class, language-model settings)
LAYOUTS = {
    "molmo": ("MolmoConfig", "MolmoForCausalLM", TEXT_CONFIG),
    "molmoe": ("MolmoEConfig", "MolmoEForCausalLM", MOLMOE_TEXT_CONFIG),
}


def _write_tokenizer(out_dir: Path) -> int:
    """A byte-level BPE with Molmo's extra tokens; returns the vocabulary size."""
    from tokenizers import AddedToken

    from vlmstates.demo.tiny.tokenizer import train_byte_level_bpe

    backend = train_byte_level_bpe(vocab_size=320)
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    backend.save(str(out_dir / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|endoftext|>",
        "model_max_length": 1024,
        "clean_up_tokenization_spaces": False,
        "auto_map": {"AutoProcessor": "preprocessing_molmo.MolmoProcessor"},
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    return backend.get_vocab_size(with_added_tokens=True)


def build_standin_checkpoint(out_dir: str | Path, seed: int = 0, layout: str = "molmo") -> Path:
    """Write the stand-in checkpoint into `out_dir` (replaced if present) and return its path; `layout`
    "molmo" (7B-O's config keys, dense blocks) or "molmoe" (MolmoE's OLMo-style keys, MoE blocks).

    Name the folder with letters, digits and underscores: transformers imports the remote files as a
    module named after it.
    """
    from safetensors.torch import save_file

    from . import configuration_molmo, modeling_molmo
    from .modeling_molmo import VISION

    config_class, model_class, text_config = LAYOUTS[layout]

    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)

    vocab_size = _write_tokenizer(out_dir)
    config_values = dict(text_config, vocab_size=vocab_size, embedding_size=vocab_size + 8)
    if layout == "molmoe":  # MolmoE states its vision settings (the projector's input width among them)
        config_values["vision_backbone"] = {
            "image_emb_dim": VISION.image_emb_dim,
            "image_num_layers": VISION.image_num_layers,
        }
    torch.manual_seed(seed)
    model = getattr(modeling_molmo, model_class)(getattr(configuration_molmo, config_class)(**config_values))
    with torch.no_grad():  # weights large enough that every block, norm and pad embedding matters
        for name, param in model.named_parameters():
            if name.endswith(("norm.weight", "ln_f.weight", "pre_ln.weight")):
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            elif param.dim() >= 2:
                param.copy_(torch.randn_like(param) / param.shape[-1] ** 0.5)
            else:
                param.copy_(0.5 * torch.randn_like(param))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})

    config = dict(
        config_values,
        model_type="molmo",
        architectures=[model_class],
        auto_map={
            "AutoConfig": f"configuration_molmo.{config_class}",
            "AutoModelForCausalLM": f"modeling_molmo.{model_class}",
            "AutoProcessor": "preprocessing_molmo.MolmoProcessor",
        },
        tie_word_embeddings=False,
    )
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    preprocessor = {
        "auto_map": {"AutoProcessor": "preprocessing_molmo.MolmoProcessor"},
        "crop_size": VISION.image_num_patch[0] * VISION.image_patch_size,
        "patch_size": VISION.image_patch_size,
        "pooling": VISION.image_pooling_h,
        "max_tiles": 2,
        "image_mean": 0.5,
        "image_std": 0.5,
    }
    (out_dir / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    for name in REMOTE_FILES:
        shutil.copyfile(HERE / name, out_dir / name)
    return out_dir
