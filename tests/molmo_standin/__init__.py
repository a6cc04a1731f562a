"""A small STAND-IN for Molmo's remote code, for the tests of the vlmstates Molmo adapter.

The real allenai/Molmo-7B-O-0924 and MolmoE-1B-0924 exist only as remote code whose vision tower is a
hard-coded CLIP ViT-L/14-336, so no tiny checkpoint of them can be built. This package holds small
implementations of our own (configuration_molmo.py, modeling_molmo.py, preprocessing_molmo.py) that
reproduce the interface the adapter uses (module paths, `processor.process` outputs,
`generate_from_batch`), and `build_standin_checkpoint` writes a local folder that loads through the real
remote-code path of transformers:

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

# Language-model settings in the keys of Molmo-7B-O's config.json (tiny values).
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


def _write_tokenizer(out_dir: Path) -> tuple[int, int]:
    """A byte-level BPE with Molmo's extra tokens; returns (vocabulary size, eos id)."""
    from tokenizers import AddedToken

    from vlmstates.tiny.tokenizer import train_byte_level_bpe

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
    return backend.get_vocab_size(with_added_tokens=True), backend.token_to_id("<|endoftext|>")


def build_standin_checkpoint(out_dir: str | Path, seed: int = 0) -> Path:
    """Write the stand-in checkpoint into `out_dir` (replaced if present) and return its path.

    Name the folder with letters, digits and underscores: transformers imports the remote files as a
    module named after it.
    """
    from safetensors.torch import save_file

    from .configuration_molmo import MolmoConfig
    from .modeling_molmo import VISION, MolmoForCausalLM

    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)

    vocab_size, eos_id = _write_tokenizer(out_dir)
    config_values = dict(TEXT_CONFIG, vocab_size=vocab_size, embedding_size=vocab_size + 8, eos_token_id=eos_id)
    torch.manual_seed(seed)
    model = MolmoForCausalLM(MolmoConfig(**config_values))
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
        architectures=["MolmoForCausalLM"],
        auto_map={
            "AutoConfig": "configuration_molmo.MolmoConfig",
            "AutoModelForCausalLM": "modeling_molmo.MolmoForCausalLM",
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
