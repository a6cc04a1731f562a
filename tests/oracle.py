"""The independent check every family's tests share: captured vectors against transformers' own
`output_hidden_states` from an unbatched forward of the same sample."""

from __future__ import annotations

import numpy as np
import torch

from vlmstates.store import PAPER_VISION_TOKEN, layer_key


def rel_error(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def assert_decoder_vectors_match(
    extractor, result, hidden, label, tolerance: float = 1e-4, stream: int | None = None, last_normed: bool = True
) -> None:
    """VT and QT of every recorded layer equal `hidden[k + 1]` at the result's positions (and so does VT at
    the paper code's position, when recorded), and the multimodal mean (which the tests record) its mean
    over the prompt. `hidden[n]` has the final norm applied and the last block's recorded output has not,
    so the norm is applied to the captured vector before comparing, unless `last_normed` is false (Gemma
    3n's `hidden[n]` is the last block's raw output). `stream`: every entry of `hidden` is [streams, B, T, D]
    (Gemma 3n's AltUp) and that stream is compared."""
    model = extractor.loaded.model
    last = extractor.num_layers - 1
    norm = extractor.adapter.final_norm(model)
    assert len(hidden) == extractor.num_layers + 1
    if stream is not None:
        assert all(h.dim() == 4 for h in hidden), [tuple(h.shape) for h in hidden]
        hidden = [h[stream] for h in hidden]
    targets = [
        ("vision_token_representation", result.vision_token_position),
        ("query_token_representation", result.query_token_position),
    ]
    if result.paper_vision_token_position is not None:
        targets.append((PAPER_VISION_TOKEN, result.paper_vision_token_position))
    for k in extractor.layers:
        for representation, position in targets:
            captured = torch.from_numpy(result.vectors[layer_key(representation, k)])
            if k == last and last_normed:
                captured = norm(captured[None, None].to(model.dtype))[0, 0]
            assert rel_error(captured, hidden[k + 1][0, position]) < tolerance, (label, representation, k)
        multimodal = layer_key("multimodal_representation", k)
        if k < last or not last_normed:
            assert rel_error(result.vectors[multimodal], hidden[k + 1][0].mean(dim=0)) < tolerance, (label, multimodal)


def assert_same_results(got, expected, exact: bool = False) -> None:
    """Same rows in the same order, same answers and positions, and the same vectors: bit-identical when
    `exact`, else within fp32 tolerance."""
    assert [r.question_id for r in got] == [r.question_id for r in expected]
    for a, b in zip(got, expected):
        assert (a.status, a.answer, a.vision_token_position, a.query_token_position) == (
            b.status,
            b.answer,
            b.vision_token_position,
            b.query_token_position,
        )
        assert a.vectors.keys() == b.vectors.keys()
        for key in a.vectors:
            if exact:
                assert np.array_equal(a.vectors[key], b.vectors[key]), (a.question_id, key)
            else:
                assert rel_error(a.vectors[key], b.vectors[key]) < 1e-4, (a.question_id, key)


def fold_in_lora(model: torch.nn.Module, adapter_dir) -> int:
    """Add a saved peft LoRA to `model`'s weights by its definition, W + (lora_alpha / r) B A, read from
    the adapter's files (not through peft, which the code under test uses). Returns the modules changed."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    # the plain LoRA of that definition; other variants scale or combine differently
    assert config["peft_type"] == "LORA" and not config["use_dora"] and not config["use_rslora"]
    assert not config["rank_pattern"] and not config["alpha_pattern"] and not config["fan_in_fan_out"]
    scale = config["lora_alpha"] / config["r"]
    weights = load_file(adapter_dir / "adapter_model.safetensors")
    modules = dict(model.named_modules())
    prefix, a_suffix = "base_model.model.", ".lora_A.weight"
    changed = 0
    with torch.no_grad():
        for key, a in weights.items():
            if not key.endswith(a_suffix):
                continue
            b = weights[key.removesuffix(a_suffix) + ".lora_B.weight"]
            weight = modules[key.removeprefix(prefix).removesuffix(a_suffix)].weight
            weight += (scale * (b.double() @ a.double())).to(weight.dtype)
            changed += 1
    return changed
